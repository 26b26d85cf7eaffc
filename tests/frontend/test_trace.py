"""The compiled path: torch.compile with kiln's backend, the vocabulary check, the passes, Inductor
and the compile cache; compiled and eager give the same greedy tokens."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln import LLM, SamplingParams
from kiln.frontend.trace import trace
from kiln.ir import set_forward_context
from kiln.ir.verify import VocabularyError
from kiln.models import supported_architectures
from kiln.passes import PIPELINE
from kiln.runtime.cuda_graphs import DecodeGraphs

PROMPTS = ["Hello, my name is", "The capital of France is a city that", "Once upon a time there was"]
FAMILIES = sorted(a for a, e in supported_architectures().items() if e.tasks == ("generate",))


def greedy_tokens(llm) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("arch", FAMILIES)
def test_compiled_and_eager_give_the_same_tokens(arch, checkpoints, tmp_path):
    eager = LLM(checkpoints[arch], enforce_eager=True)
    compiled = LLM(checkpoints[arch], enforce_eager=False, compilation_config={"dump_ir": str(tmp_path)})
    assert compiled.llm_engine.compiled and not eager.llm_engine.compiled
    assert greedy_tokens(compiled) == greedy_tokens(eager)
    graphs = sorted(os.listdir(tmp_path))
    # one trace: prompts and decode steps share the graph, and the model's floats do not make
    # Dynamo restart its analysis (a second trace of the whole model)
    assert graphs == ["graph0"], graphs
    dumps = sorted(os.listdir(tmp_path / graphs[0]))
    assert dumps == ["00-input.txt"] + [f"{i:02d}-{name}.txt" for i, name in enumerate(PIPELINE, start=1)]
    final = (tmp_path / graphs[0] / dumps[-1]).read_text()
    if supported_architectures()[arch].module == "llama":  # (Falcon's q/k/v are one projection, its MLP GELU)
        # q/k/v and gate/up each merged into one linear, and that fused with the norm before it;
        # rotary and the cache write fused into the q/k/v one (not Qwen3's: it normalizes q and
        # k per head before rotary); SwiGLU's activation fused into the down projection; the first
        # layer's norm + q/k/v gathering its row from the embedding table itself
        assert "kiln.merged_linear" in (tmp_path / graphs[0] / "01-merge_linears.txt").read_text()
        assert "kiln.merged_linear(" not in final and "kiln.silu_and_mul(" not in final
        rope = "_rope" if arch != "Qwen3ForCausalLM" else ""
        assert f"kiln.embedding_rms_norm_linear{rope}(" in final and f"kiln.add_rms_norm_linear{rope}(" in final
        assert "kiln.embedding(" not in final
        assert ("kiln.rotary_kv_write(" in final) == (not rope)
        assert "kiln.act_and_mul_linear(" in final


def test_passes_are_chosen_by_name(checkpoints, tmp_path):
    llm = LLM(checkpoints["LlamaForCausalLM"], enforce_eager=False,
              compilation_config={"passes": ["noop_elimination"], "backend": "eager", "dump_ir": str(tmp_path)})
    # first a forward on the decode graphs' static inputs, as their capture does on CUDA (the capture
    # itself needs CUDA): the prompts after it must not trace again
    runner = llm.llm_engine.runner
    graphs = DecodeGraphs(runner.forward, runner.kv_caches, llm.llm_engine.config.block_size, 4,
                          runner.num_blocks - 1, 4, torch.device("cpu"))
    with torch.inference_mode(), set_forward_context(graphs._context(2)):
        runner.forward(graphs.input_ids[:2], graphs.positions[:2])
    frozen = gc.get_freeze_count()  # (LLM froze the heap at its start; the forward above then compiled)
    greedy_tokens(llm)
    # the first step after a compile froze what Dynamo left out of the collector's reach, so that
    # full collections do not walk it (engine.freeze_gc_heap)
    assert gc.get_freeze_count() > frozen + 1000
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=3), use_tqdm=False)  # decode steps of one token
    # the token dimension is unbacked: one graph serves one token and many (no recompile for 1),
    # and the graphs' inputs are tensors of the same kind as the eager steps' (no recompile either)
    assert len(runner.forward.kiln_backend.graphs) == 1
    graph, = sorted(os.listdir(tmp_path))
    assert sorted(os.listdir(tmp_path / graph)) == ["00-input.txt", "01-noop_elimination.txt"]
    with pytest.raises(ValueError, match="unknown keys"):
        LLM(checkpoints["LlamaForCausalLM"], enforce_eager=False, compilation_config={"pases": []})


class UsesFLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return F.linear(x, self.w)  # outside the vocabulary


def test_an_op_outside_the_vocabulary_is_named_with_its_line():
    compiled = trace(UsesFLinear(), lambda graph: graph.gm.forward)
    with pytest.raises(VocabularyError, match=r"linear is outside kiln's op vocabulary: use ops.linear .*test_trace.py"):
        compiled(torch.randn(3, 4))


_CACHE_PROBE = """
import json, sys, torch
from torch._dynamo.utils import counters
from kiln import LLM, SamplingParams
llm = LLM(sys.argv[1], enforce_eager=False)
llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def test_second_start_hits_the_compile_cache(checkpoints, tmp_path):
    env = {**os.environ, "KILN_CACHE_DIR": str(tmp_path)}
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _CACHE_PROBE, checkpoints["Qwen2ForCausalLM"]], env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["misses"] > 0
    assert runs[1]["hits"] > 0 and runs[1]["misses"] == 0
    assert os.listdir(tmp_path / "compile")
