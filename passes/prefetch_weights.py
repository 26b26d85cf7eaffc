"""Name, on each attention, the weight of the second linear after it, as a hint:

    attention(q, k, v, layer, scale, ...)  ->  attention(q, k, v, layer, scale, ..., prefetch=w)

w is the first weight of the second weight-reading op that follows the attention (before the next
attention), in graph order: in a transformer layer, the MLP's gate/up projection, the output
projection being the first. Why: at batch 1 on a GPU the decode attention reads little memory and
waits on a chain of dependent loads for several microseconds a layer, while the output
projection's gemv, launched beside it (PDL), has loaded its weights already; the memory system is
idle. So the attention's programs ask L2 for w's first bytes (`kernels/decode_attention.py`,
`kernels/prefetch.py`), and the gate/up gemv finds them there. The output is the same: a prefetch
moves no value, and elsewhere the hint is ignored. The kernel asks for nothing by default
(`decode_attention.PREFETCH_BYTES` = 0): on an H100 the attention's own loads waited longer behind
the prefetch than the gate/up gemv gained (codegen/NOTES.md, session 24).

Runs last: it names the weights of the fused ops the passes before it make.
"""

from __future__ import annotations

from torch import fx

from kiln.ir.graph import Graph, is_kiln_op

NAME = "prefetch_weights"

# kiln op -> the first weight it reads, from its arguments (a list of weights: its first)
_FIRST_WEIGHT = {
    "linear": lambda a: a[1],
    "logits": lambda a: a[1],
    "weight_only_linear": lambda a: a[1],
    "scaled_linear": lambda a: a[2],
    "merged_linear": lambda a: a[1][0],
    "act_and_mul_linear": lambda a: a[2][0],
    "linear_all_reduce": lambda a: a[2][0],
    "rms_norm_linear": lambda a: a[3][0],
    "rms_norm_linear_rope": lambda a: a[3][0],
    "add_rms_norm_linear": lambda a: a[4][0],
    "add_rms_norm_linear_rope": lambda a: a[4][0],
}


def _first_weight(node: fx.Node) -> fx.Node | None:
    for name, weight in _FIRST_WEIGHT.items():
        if is_kiln_op(node, name):
            return weight(node.args)
    return None


def run(graph: Graph) -> Graph:
    nodes = list(graph.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for att in graph.calls("attention"):
        if "prefetch" in att.kwargs:
            continue
        weights = []
        for node in nodes[order[att] + 1:]:
            if is_kiln_op(node, "attention") or len(weights) == 2:
                break
            weight = _first_weight(node)
            if weight is not None:
                weights.append(weight)
        if len(weights) < 2 or not isinstance(weights[1], fx.Node):
            continue
        weight = weights[1]
        if order[weight] > order[att]:
            if weight.op != "get_attr":  # (a weight the graph computes after the attention: none to name)
                continue
            att.prepend(weight)  # (a constant reads nothing: the quantize pass puts its 8-bit weights late)
            order[weight] = order[att] - 0.5
        att.kwargs = {**att.kwargs, "prefetch": weight}
    return graph.finish()
