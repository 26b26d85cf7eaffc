"""Tensor parallelism on CPU with gloo and 2 ranks: TP=2 gives TP=1's greedy tokens and logprobs
(native Llama with GQA, biases and a vocabulary that needs padding; Qwen3 with tied embeddings and
q/k norms; the Transformers backend through `base_model_tp_plan`); an embedding model pools over
two ranks as over one; layouts that cannot split are clear errors; a worker that dies or raises
mid-run is a clear error, not a hang, and the engine shuts its workers down; the collectives sum
and gather over two ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.ir import ops
from kiln.ir.parallel import tensor_parallel_group
from kiln.models.bloom import alibi_slopes
from kiln.runtime.demo import build_checkpoint

PROMPTS = ["Hello, my name is", "The capital of France is",
           "Paged attention keeps keys and values in fixed-size blocks so that memory is never wasted"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
ENGINE = dict(max_model_len=128, kv_cache_memory=1 << 22)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("tp")
    # 4 heads, 2 KV heads (GQA: one KV head per rank); a vocabulary of 385 pads to 386 over two ranks
    return {"llama": build_checkpoint(str(root / "llama"), "LlamaForCausalLM", tokenizer=tokenizer,
                                      attention_bias=True, vocab_size=len(tokenizer) + 1),
            "qwen3": build_checkpoint(str(root / "qwen3"), "Qwen3ForCausalLM", tokenizer=tokenizer,
                                      tie_word_embeddings=True),
            # Falcon-40B's layout (two KV groups: one per rank) and BLOOM's ALiBi over six heads
            "falcon": build_checkpoint(str(root / "falcon"), "FalconForCausalLM", tokenizer=tokenizer,
                                       new_decoder_architecture=True, num_kv_heads=2, bias=True),
            "bloom": build_checkpoint(str(root / "bloom"), "BloomForCausalLM", tokenizer=tokenizer,
                                      hidden_size=48, num_attention_heads=6)}


@pytest.fixture(scope="module")
def tp_llm(paths):
    """(checkpoint, model_impl) -> an LLM with tensor_parallel_size=2, made once per module (worker
    processes take seconds to start); the failure tests end the engines they use, so they come last."""
    made = {}

    def get(name: str, model_impl: str = "kiln") -> LLM:
        if (name, model_impl) not in made:
            made[name, model_impl] = LLM(paths[name], model_impl=model_impl, tensor_parallel_size=2, **ENGINE)
        return made[name, model_impl]

    yield get
    for llm in made.values():
        llm.shutdown()
    assert not any(w.process.is_alive() for llm in made.values() for w in llm.llm_engine.tp.workers)


def same_outputs(expected, got) -> None:
    for a, b in zip(expected, got):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        for lp_a, lp_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert lp_b.keys() == lp_a.keys()
            for token in lp_a:
                assert abs(lp_b[token].logprob - lp_a[token].logprob) < 1e-4


@pytest.mark.parametrize("name,model_impl", [("llama", "kiln"), ("qwen3", "kiln"), ("llama", "transformers")])
def test_two_ranks_give_one_rank_tokens_and_logprobs(paths, tp_llm, name, model_impl):
    expected = LLM(paths[name], model_impl=model_impl, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = tp_llm(name, model_impl)
    same_outputs(expected, llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    engine = llm.llm_engine
    assert [c.shape[2] for c in engine.runner.kv_caches[0]] == [1, 1]  # one of the two KV heads on each rank
    head = engine.model.hf.get_output_embeddings() if model_impl == "transformers" else (
        engine.model.model.embed_tokens if name == "qwen3" else engine.model.lm_head)  # (Qwen3's is tied)
    assert head.weight.shape[0] == -(-engine.vocab_size // 2)  # this rank's half of the (padded) vocabulary


@pytest.mark.parametrize("name,kv_heads", [("falcon", 1), ("bloom", 3)])
def test_falcon_and_bloom_over_two_ranks(paths, tp_llm, name, kv_heads):
    """The fused query_key_value split by rows gives each rank whole heads (Falcon: whole KV
    groups); BLOOM's ranks each take the ALiBi slopes of their own three heads."""
    expected = LLM(paths[name], **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = tp_llm(name)
    same_outputs(expected, llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    engine = llm.llm_engine
    assert engine.runner.kv_caches[0][0].shape[2] == kv_heads
    if name == "bloom":
        whole = alibi_slopes(6)
        assert torch.equal(engine.model.transformer.h[0].self_attention.alibi_slopes, whole[:3])


def test_async_scheduling_over_two_ranks(paths):
    """Steps launched before the last one's tokens are read, over two ranks: TP=1's greedy tokens."""
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = LLM(paths["llama"], **ENGINE).generate(PROMPTS, plain, use_tqdm=False)
    llm = LLM(paths["llama"], tensor_parallel_size=2, async_scheduling=True, **ENGINE)
    try:
        assert llm.llm_engine._can_overlap()
        got = llm.generate(PROMPTS, plain, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    finally:
        llm.shutdown()


GRAPH_PEER = """
import datetime, sys, types
import torch
import torch.distributed as dist
from multiprocessing.connection import Client
from kiln.runtime.model_runner import fill_in
from kiln.runtime.tensor_parallel import TensorParallel, _serve

conn = Client(("127.0.0.1", int(sys.argv[2])), authkey=b"kiln-test")
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False, timeout=datetime.timedelta(seconds=60))
group = dist.ProcessGroupGloo(dist.PrefixStore("kiln-tp", store), 1, 2, datetime.timedelta(seconds=60))


class Graphs:  # stands in for the worker's captured graphs: reports the ids it would replay with
    last_tokens = torch.tensor([60, 61, 62, 63])  # (this rank's last argmax)

    def run(self, input_ids, positions, *rest, fill=None):
        ids = torch.tensor(input_ids)
        if fill is not None:
            fill_in(ids, *fill)
        conn.send(("ran", ids.tolist(), positions))
        return torch.zeros(len(input_ids), 4)


runner = types.SimpleNamespace(decode_graphs=Graphs(), device=torch.device("cpu"))
_serve(types.SimpleNamespace(runner=runner), conn, TensorParallel(1, 2, "gloo", store, group=group))
"""


def test_graph_steps_reach_the_workers_with_the_sampled_tokens_broadcast(monkeypatch):
    """A decode step the CUDA graphs cover, under async scheduling: rank 0 sends the step's host
    inputs and broadcasts the tokens still on its device; the worker fills them into its own
    inputs, rank 0's last argmax too; with TP_OWN_TOKENS that one is not broadcast, and the worker
    reads its own graph's (here with stand-in graphs over gloo, since capture needs CUDA)."""
    import datetime
    from multiprocessing.connection import Listener

    import torch.distributed as dist

    from kiln.runtime import tensor_parallel
    from kiln.runtime.tensor_parallel import TensorParallel, _GraphsOverGroup

    class Rank0Graphs:
        last_tokens = torch.tensor([50, 51, 52, 53])

        def takes_own(self, tokens):
            return tokens is self.last_tokens

        def run(self, input_ids, positions, *rest, fill=None):
            return torch.zeros(len(input_ids), 4)

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    with Listener(("127.0.0.1", 0), authkey=b"kiln-test") as listener:
        peer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GRAPH_PEER), str(store.port),
                                 str(listener.address[1])])
        try:
            conn = listener.accept()
            group = dist.ProcessGroupGloo(dist.PrefixStore("kiln-tp", store), 0, 2, datetime.timedelta(seconds=60))
            tp = TensorParallel(0, 2, "gloo", store, group=group)
            tp.workers = [type("W", (), {"send": staticmethod(conn.send)})()]
            graphs = _GraphsOverGroup(tp, Rank0Graphs())
            # rows 0 and 2 wait for the tokens sampled last step (rows 3 and 0 of it)
            graphs.run([0, 11, 0], [7, 8, 9], [1, 2, 3], [[0], [1], [2]], [8, 9, 10], None,
                       fill=(torch.tensor([40, 41, 42, 43]), [0, 2], [3, 0]))
            assert conn.recv() == ("ran", [43, 11, 40], [7, 8, 9])
            graphs.run([5], [3], [4], [[1]], [4], None)  # no tokens pending: nothing broadcast
            assert conn.recv() == ("ran", [5], [3])
            # rank 0's last argmax, which its own graph reads in place: broadcast without TP_OWN_TOKENS
            monkeypatch.setattr(tensor_parallel, "TP_OWN_TOKENS", False)
            graphs.run([0, 6], [4, 5], [5, 6], [[1], [2]], [5, 6], None,
                       fill=(Rank0Graphs.last_tokens, [0], [2]))
            assert conn.recv() == ("ran", [52, 6], [4, 5])
            # with TP_OWN_TOKENS, not broadcast: the worker reads its own (its stand-in's differ, to show whose)
            monkeypatch.setattr(tensor_parallel, "TP_OWN_TOKENS", True)
            graphs.run([0, 6], [4, 5], [5, 6], [[1], [2]], [5, 6], None,
                       fill=(Rank0Graphs.last_tokens, [0], [2]))
            assert conn.recv() == ("ran", [62, 6], [4, 5])
            # (tokens not its graph's: broadcast)
            graphs.run([0], [6], [7], [[1]], [7], None, fill=(torch.tensor([70, 71]), [0], [1]))
            assert conn.recv() == ("ran", [71], [6])
            conn.send(("stop", None))
            assert peer.wait(timeout=60) == 0
        finally:
            peer.kill()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_decode_graphs_over_two_ranks_gather_the_logits_inside(paths, async_scheduling):
    """Decode graphs over two ranks (emulated: `cudagraph="emulate"` replays what a capture
    records, eagerly, as on a GPU without the CUDA graph): TP=1's greedy tokens and logprobs; the
    decode steps go through the graphs, whose logits every rank gathers itself, so rank 0 sends
    the workers one message per decode step ("graph") and asks for logits only after prompts."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = LLM(paths["llama"], **ENGINE).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(paths["llama"], tensor_parallel_size=2, enforce_eager=False, max_num_seqs=4,
              async_scheduling=async_scheduling, compilation_config={"backend": "eager", "cudagraph": "emulate"},
              **ENGINE)
    try:
        engine = llm.llm_engine
        sent, send = [], engine.tp.send
        engine.tp.send = lambda message: (sent.append(message[0]), send(message))
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
        replays = sum(g.replays for g in engine.runner.decode_graphs.graphs.graphs.values())
        assert replays == sent.count("graph") >= 7  # (the decode steps: 7 each, the prompts batched)
        assert sent.count("logits") == sent.count("step")  # only the prompt steps ask for logits
        one = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2),
                           use_tqdm=False)[0].outputs[0]  # (logprobs: steps in turn, logits from the graph)
        want = LLM(paths["llama"], **ENGINE).generate(
            PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2),
            use_tqdm=False)[0].outputs[0]
        assert one.token_ids == want.token_ids
        for a, b in zip(one.logprobs, want.logprobs):
            assert a.keys() == b.keys() and all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("async_scheduling, protocol", [(False, "ll"), (True, "ll"), (True, "flags")])
def test_two_rank_all_reduce_over_two_ranks(paths, monkeypatch, async_scheduling, protocol, tmp_path):
    """KILN_TWO_RANK_ALL_REDUCE=1: the small all-reduces of the step go through kiln's two-rank kernel
    (codegen/kernels/two_rank_all_reduce.py; here under Triton's interpreter, over a shared-memory
    file in place of symmetric memory, inside the emulated decode graphs), in each protocol: TP=1's
    greedy tokens, and (flags) every rank made the same calls (each program's count of them is the
    peer's flag)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("KILN_TWO_RANK_ALL_REDUCE", "1")
    monkeypatch.setenv("KILN_TWO_RANK_PROTOCOL", protocol)  # (the worker reads it when it imports the kernel)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (before the kernel's module is first imported)
    from kiln.codegen.kernels import two_rank_all_reduce

    monkeypatch.setattr(two_rank_all_reduce, "PROTOCOL", protocol)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = LLM(paths["llama"], **ENGINE).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(paths["llama"], tensor_parallel_size=2, enforce_eager=False, max_num_seqs=4,
              async_scheduling=async_scheduling, compilation_config={"backend": "eager", "cudagraph": "emulate",
                                                                     "dump_ir": str(tmp_path)},
              **ENGINE)
    try:
        small = llm.llm_engine.tp.small_all_reduce
        assert type(small).__name__ == "TwoRankAllReduce"
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
        assert small.protocol == protocol
        assert small.epochs[0].item() > 5  # (the prompts' all-reduces are larger: some took the gloo path)
        if protocol == "flags":
            assert torch.equal(small.flags, small.epochs)  # the peer made as many calls of each program
        # the row-parallel linears and their all-reduces are one op each (fuse_linear_all_reduce; on two GPUs one
        # gemv launch), the embedding's all-reduce stays
        fused = (tmp_path / "graph0" / "09-fuse_linear_all_reduce.txt").read_text()
        assert fused.count("kiln.linear_all_reduce(") == 2 * 2 and fused.count("kiln.all_reduce(") == 1  # (2 layers)
        assert fused.count(", 'silu', [") == 2  # (the down projections, with their SwiGLU)
    finally:
        llm.shutdown()


def test_disable_custom_all_reduce_keeps_the_groups_own(paths, monkeypatch):
    """vLLM's `disable_custom_all_reduce=True` reaches every rank's engine: no two-rank kernel, even
    where it is asked for (here under the interpreter, over gloo), and TP=1's tokens."""
    pytest.importorskip("triton")
    monkeypatch.setenv("KILN_TWO_RANK_ALL_REDUCE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = LLM(paths["llama"], **ENGINE).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(paths["llama"], tensor_parallel_size=2, disable_custom_all_reduce=True, **ENGINE)
    try:
        assert llm.llm_engine.tp.small_all_reduce is None
        got = llm.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    finally:
        llm.shutdown()


def test_pooling_over_two_ranks(paths):
    """An embedding model (a decoder through convert="embed") over two ranks gives one rank's
    embeddings: rank 0 pools what the reduced hidden states give."""
    texts = ["Hello, my name is", "The capital of France is", "a"]
    one = LLM(paths["llama"], runner="pooling", convert="embed")
    two = LLM(paths["llama"], runner="pooling", convert="embed", tensor_parallel_size=2)
    try:
        want = torch.tensor([o.outputs.embedding for o in one.embed(texts, use_tqdm=False)])
        got = torch.tensor([o.outputs.embedding for o in two.embed(texts, use_tqdm=False)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        two.shutdown()


def test_layouts_that_do_not_split_are_clear_errors(paths, tmp_path, tokenizer):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the model's num_attention_heads=4"):
        LLM(paths["llama"], tensor_parallel_size=3)
    # a size the model names itself (`tp_sizes`): Falcon-7B's single KV head
    mqa = build_checkpoint(str(tmp_path / "falcon-mqa"), "FalconForCausalLM", tokenizer=tokenizer, multi_query=True)
    with pytest.raises(ValueError, match="does not divide the model's KV heads=1"):
        LLM(mqa, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 does not divide the model's num_key_value_heads=2"):
        LLM(paths["llama"], tensor_parallel_size=4)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(paths["llama"], tensor_parallel_size=0)


def test_more_ranks_than_gpus_is_a_clear_error(paths, monkeypatch):
    from kiln.frontend import load_hf_config
    from kiln.models.llama import LlamaForCausalLM
    from kiln.runtime.config import EngineConfig
    from kiln.runtime.tensor_parallel import launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs, one per rank; this machine has 1"):
        launch(EngineConfig(paths["llama"], tensor_parallel_size=2), load_hf_config(paths["llama"]), LlamaForCausalLM,
               "LlamaForCausalLM", torch.device("cuda"))


def test_a_killed_worker_is_a_clear_error_and_the_engine_shuts_down(tp_llm):
    llm = tp_llm("llama")
    engine = llm.llm_engine
    worker = engine.tp.workers[0].process
    forward, calls = engine.runner.shard_forward, []

    def kill_mid_step(*args, **kwargs):  # the worker has the step; rank 0 then meets a dead peer in a collective
        calls.append(1)
        if len(calls) == 3:
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)
        return forward(*args, **kwargs)

    engine.runner.forward = kill_mid_step
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker 1 \(pid \d+\) died, exit code -9"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 30
    assert engine.tp.closed and not engine.tp.workers[0].process.is_alive()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()


def test_a_worker_that_raises_reports_its_traceback(tp_llm):
    llm = tp_llm("qwen3")
    engine = llm.llm_engine
    engine.tp.send(("step", None))  # a step the worker cannot run: it reports, exits, and rank 0 hears of it
    with pytest.raises(RuntimeError, match="(?s)worker 1 raised:.*AttributeError"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    engine.tp.workers[0].process.join(timeout=10)
    assert not engine.tp.workers[0].process.is_alive()


def gloo_group(store, rank: int):
    import datetime

    import torch.distributed as dist

    return dist.ProcessGroupGloo(dist.PrefixStore("test", store), rank, 2, datetime.timedelta(seconds=60))


PEER = """
import datetime, sys, torch
import torch.distributed as dist
from kiln.ir import ops
from kiln.ir.parallel import tensor_parallel_group
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), 2, is_master=False, timeout=datetime.timedelta(seconds=60))
with tensor_parallel_group(dist.ProcessGroupGloo(dist.PrefixStore("test", store), 1, 2, datetime.timedelta(seconds=60))):
    ops.all_reduce(torch.full((2, 3), 2.0))
    ops.all_gather(torch.full((2, 1), 2.0), -1)
    ops.all_gather(torch.full((1, 3), 2.0), 0)
"""


def test_all_reduce_and_all_gather_over_two_gloo_ranks():
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    peer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PEER), str(store.port)])
    try:
        with tensor_parallel_group(gloo_group(store, 0)):
            assert torch.equal(ops.all_reduce(torch.full((2, 3), 1.0)), torch.full((2, 3), 3.0))
            assert torch.equal(ops.all_gather(torch.full((2, 1), 1.0), -1), torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
            assert torch.equal(ops.all_gather(torch.full((1, 3), 1.0), 0), torch.tensor([[1.0] * 3, [2.0] * 3]))
        assert peer.wait(timeout=60) == 0
    finally:
        peer.kill()


def test_one_rank_collectives_are_identities_and_trace_as_kiln_ops():
    x = torch.randn(3, 4)
    assert torch.equal(ops.all_reduce(x), x) and torch.equal(ops.all_gather(x, -1), x)
    with tensor_parallel_group(None):
        graphs = []

        def record(gm, example_inputs):
            graphs.append(gm)
            return gm

        fn = torch.compile(lambda t: ops.all_gather(ops.all_reduce(t) * 2, -1), backend=record, fullgraph=True)
        assert torch.equal(fn(x), x * 2)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"kiln.all_reduce.default", "kiln.all_gather.default"} <= targets


def test_a_small_all_reduce_takes_the_tensors_it_accepts(monkeypatch):
    """The small all-reduce's dispatch (its kernels need CUDA and NVLink): a tensor the step's small
    all-reduce takes goes to it, one it declines to the group's own all_reduce; over gloo the paths
    stay off by default, and the two-rank one runs there only when asked for under the interpreter."""
    from kiln.runtime.tensor_parallel import TensorParallel

    class Group:  # two ranks (their own all_reduce, dist.all_reduce, is patched to triple)
        def size(self):
            return 2

    calls = []

    class Small:
        def takes(self, x):
            return x.numel() <= 4

        def __call__(self, x):
            calls.append(x.shape)
            return x * 2

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: t.mul_(3))
    with tensor_parallel_group(Group(), Small()):
        assert torch.equal(ops.all_reduce(torch.ones(2, 2)), torch.full((2, 2), 2.0))
        assert torch.equal(ops.all_reduce(torch.ones(2, 3)), torch.full((2, 3), 3.0))
    assert calls == [(2, 2)]
    assert TensorParallel(0, 2, "gloo", None).enable_small_all_reduce(16, torch.float32) == "gloo"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # (the two-rank kernel's default is for NCCL groups only)
    assert TensorParallel(0, 2, "gloo", None).enable_small_all_reduce(16, torch.float32) == "gloo"
    monkeypatch.setenv("KILN_TWO_RANK_ALL_REDUCE", "1")  # (asked for: it would set up its shared memory...)
    assert TensorParallel(0, 2, "gloo", None).enable_small_all_reduce(16, torch.float32, custom=False) == "gloo"
    monkeypatch.setenv("KILN_TWO_RANK_ALL_REDUCE", "0")  # (... unless custom all-reduces are off, either way)
    assert TensorParallel(0, 2, "gloo", None).enable_small_all_reduce(16, torch.float32) == "gloo"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for switch in ("KILN_ONE_SHOT_ALL_REDUCE", "KILN_TWO_RANK_ALL_REDUCE"):  # (NCCL groups; gloo under the interpreter)
        monkeypatch.setenv(switch, "1")
        assert TensorParallel(0, 2, "gloo", None).enable_small_all_reduce(16, torch.float32) == "gloo"


@pytest.mark.parametrize("peer, visible, reachable, expected", [
    ("here uuid-b", ["uuid-a", "uuid-b"], True, True),  # one host, the peer's GPU visible, peer access
    ("here uuid-b", ["uuid-a", "uuid-b"], False, False),  # no peer access between them (PCIe without P2P)
    ("here uuid-b", ["uuid-a"], True, False),  # the peer's GPU not visible to this process (Ray)
    ("there uuid-b", ["uuid-a", "uuid-b"], True, False),  # another host
])
def test_the_two_rank_all_reduce_needs_the_peers_gpu_within_reach(monkeypatch, peer, visible, reachable, expected):
    """Whether the two-rank kernel is the default: each rank names its host and GPU in the store,
    then checks the other's against what this process sees (CUDA faked here)."""
    import socket
    import types

    from kiln.runtime.tensor_parallel import TensorParallel

    class Store:
        def __init__(self):
            self.keys = {"kiln-gpu-1": peer.encode()}

        def set(self, key, value):
            self.keys[key] = value.encode()

        def get(self, key):
            return self.keys[key]

    asked = []
    monkeypatch.setattr(socket, "gethostname", lambda: "here")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(visible))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=visible[i]))
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: asked.append((a, b)) or reachable)
    store = Store()
    assert TensorParallel(0, 2, "nccl", store)._peer_memory_reachable() is expected
    assert store.keys["kiln-gpu-0"] == b"here uuid-a"
    assert asked == ([(0, 1)] if peer.startswith("here") and len(visible) == 2 else [])
