"""kiln's IR: a torch.fx graph of kiln ops and plain tensor code, with the few helpers passes use.

A `Graph` wraps the FX GraphModule that torch.compile hands to kiln's backend, together with the
example inputs (parameters arrive as graph inputs, so a pass that rewrites weights finds them
there). `dump()` prints one line per node, so every stage of the pipeline can be read.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import fx


def is_kiln_op(node: fx.Node, name: str | None = None) -> bool:
    """Whether the node calls a kiln op (optionally the one named, e.g. "linear")."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    ns, op = node.target.namespace, node.target._schema.name.split("::")[-1]
    return ns == "kiln" and (name is None or op == name)


def _writes_in_place(node: fx.Node) -> bool:
    """Dead-code elimination keeps in-place writes whose result nobody reads (FX would drop them):
    HF code fills buffers that way, as latent attention's `query[..., :nope] = q_nope`, which
    traces to a `copy_` into a view."""
    if node.is_impure():
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and (name.endswith("_") or node.target is operator.setitem)


class Graph:
    def __init__(self, gm: fx.GraphModule, example_inputs: list | None = None):
        self.gm = gm
        self.example_inputs = list(example_inputs or [])

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    # ------------------------------------------------------------ queries

    def calls(self, name: str | None = None) -> Iterator[fx.Node]:
        """The kiln-op calls (of one op when named), in order."""
        return (n for n in list(self.graph.nodes) if is_kiln_op(n, name))

    def example_value(self, node) -> object:
        """The value a placeholder stands for (the real parameter tensor for weights), else the
        fake value torch.compile recorded."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            index = [n for n in self.graph.nodes if n.op == "placeholder"].index(node)
            if index < len(self.example_inputs):
                return self.example_inputs[index]
        return node.meta.get("example_value") if isinstance(node, fx.Node) else node

    def is_parameter(self, node) -> bool:
        return isinstance(node, fx.Node) and isinstance(self.example_value(node), torch.nn.Parameter)

    # ------------------------------------------------------------ edits

    def getitem(self, node: fx.Node, index: int) -> fx.Node:
        with self.graph.inserting_after(node):
            return self.graph.call_function(operator.getitem, (node, index))

    def constant(self, tensor: torch.Tensor, before: fx.Node, prefix: str = "_kiln_const") -> fx.Node:
        """A get_attr node, just before `before`, for a tensor made by a pass (registered as a buffer of
        the module under a fresh name)."""
        gm = self.gm
        name = f"{prefix}_{sum(1 for n in self.graph.nodes if n.op == 'get_attr')}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, tensor)
        if hasattr(gm, "_param_name_to_source"):  # AOT autograd (under Inductor) wants a source per buffer
            from torch._dynamo.source import ConstantSource

            gm._param_name_to_source[name] = ConstantSource(f"kiln_{name}")
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        fake_mode = self.fake_mode()
        node.meta["example_value"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
        return node

    def finish(self) -> "Graph":
        """Drop dead nodes, give new nodes their (fake) values, check and regenerate the module's
        code after edits."""
        self.graph.eliminate_dead_code(is_impure_node=_writes_in_place)
        self._propagate()
        self.graph.lint()
        self.gm.recompile()
        return self

    def fake_mode(self):
        """The fake mode torch.compile traced with (None for a graph built by hand)."""
        from torch._subclasses.fake_tensor import FakeTensor

        fakes = [n.meta.get("example_value") for n in self.graph.nodes]
        return next((v.fake_mode for v in fakes if isinstance(v, FakeTensor)), None)

    def _propagate(self) -> None:
        """Nodes a pass created have no recorded value: run them on the fake values of their
        inputs, in the fake mode torch.compile traced with, so later passes can read shapes."""
        fake_mode = self.fake_mode()
        if fake_mode is None:
            return
        for node in self.graph.nodes:
            if node.op != "call_function" or "example_value" in node.meta:
                continue

            def value(a):
                return a.meta.get("example_value") if isinstance(a, fx.Node) else a

            args = fx.node.map_aggregate(node.args, value)
            kwargs = fx.node.map_aggregate(node.kwargs, value)
            try:
                with fake_mode:
                    node.meta["example_value"] = node.target(*args, **kwargs)
            except Exception:  # a value we cannot recompute only hides the node from shape-based rewrites
                pass

    # ------------------------------------------------------------ printing

    def dump(self) -> str:
        lines = []
        for n in self.graph.nodes:
            value = self.example_value(n) if n.op == "placeholder" else n.meta.get("example_value")
            shape = ""
            if isinstance(value, torch.Tensor):
                shape = f" : {list(value.shape)} {str(value.dtype).replace('torch.', '')}"
            if n.op == "placeholder":
                lines.append(f"%{n.name} = input{shape}")
            elif n.op == "get_attr":
                lines.append(f"%{n.name} = constant {n.target}{shape}")
            elif n.op == "output":
                lines.append(f"return {_fmt(n.args[0])}")
            else:
                target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
                if isinstance(n.target, torch._ops.OpOverload):
                    target = str(n.target).replace(".default", "")
                args = ", ".join([_fmt(a) for a in n.args] + [f"{k}={_fmt(v)}" for k, v in n.kwargs.items()])
                lines.append(f"%{n.name} = {target}({args}){shape}")
        return "\n".join(lines) + "\n"


def _fmt(arg) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
    return repr(arg)
