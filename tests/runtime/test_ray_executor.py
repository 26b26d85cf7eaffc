"""Tensor parallelism with distributed_executor_backend="ray" on a local Ray cluster started here
(CPU, gloo, 2 ranks): the worker is an actor in a placement group and gives the multiprocessing
backend's greedy tokens and logprobs (and TP=1's); a killed actor is a clear error naming the
worker, and the engine shuts down; a bad backend name, a cluster without the resources and a
missing Ray are clear errors."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.runtime.demo import build_checkpoint

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'kiln[ray]' (or '.[test]')")

PROMPTS = ["Hello, my name is", "The capital of France is",
           "Paged attention keeps keys and values in fixed-size blocks so that memory is never wasted"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
ENGINE = dict(max_model_len=128, kv_cache_memory=1 << 22)


@pytest.fixture(scope="module")
def path(tmp_path_factory, tokenizer):
    # 4 heads, 2 KV heads (one per rank); a vocabulary of 385 pads to 386 over two ranks
    return build_checkpoint(str(tmp_path_factory.mktemp("ray") / "llama"), "LlamaForCausalLM", tokenizer=tokenizer,
                            attention_bias=True, vocab_size=len(tokenizer) + 1)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module (left alone if the process is connected to one already)."""
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_llm(cluster, path):
    """One TP=2 engine on Ray for the module; the failure test ends it, so it comes last."""
    llm = LLM(path, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    yield llm
    llm.shutdown()


@needs_ray
def test_ray_workers_give_the_multiprocessing_backends_tokens(path, ray_llm):
    expected = LLM(path, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    mp_llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        by_mp = mp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        mp_llm.shutdown()
    got = ray_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for a, b, c in zip(expected, by_mp, got):
        assert c.outputs[0].token_ids == b.outputs[0].token_ids == a.outputs[0].token_ids
        for lp_a, lp_b, lp_c in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, c.outputs[0].logprobs):
            assert lp_c.keys() == lp_a.keys() == lp_b.keys()
            for token in lp_a:
                assert lp_c[token].logprob == lp_b[token].logprob  # the same ranks' arithmetic
                assert abs(lp_c[token].logprob - lp_a[token].logprob) < 1e-4
    engine = ray_llm.llm_engine
    assert [c.shape[2] for c in engine.runner.kv_caches[0]] == [1, 1]  # one of the two KV heads on rank 0
    (worker,) = engine.tp.workers
    assert worker.node[0] == ray.util.get_node_ip_address()
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert [(g["strategy"], list(g["bundles"].values())) for g in groups] == [("PACK", [{"CPU": 1.0}])]


@needs_ray
def test_a_killed_actor_is_a_clear_error_and_the_engine_shuts_down(ray_llm):
    engine = ray_llm.llm_engine
    (worker,) = engine.tp.workers
    forward, calls = engine.runner.shard_forward, []

    def kill_mid_step(*args, **kwargs):  # the actor has the step; rank 0 then meets a dead peer in a collective
        calls.append(1)
        if len(calls) == 3:
            ray.kill(worker.actor)
            ray.wait([worker.serve_ref], timeout=10)
        return forward(*args, **kwargs)

    engine.runner.forward = kill_mid_step
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker 1 \(Ray actor \w+\) died: .*ray\.kill"):
        ray_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 30
    assert engine.tp.closed
    with pytest.raises(RuntimeError, match="shut down"):
        ray_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]  # removed


def test_a_bad_backend_name_is_a_clear_error(path):
    with pytest.raises(ValueError, match="distributed_executor_backend='threads' is not supported; "
                                         "supported: 'mp', 'ray'"):
        LLM(path, tensor_parallel_size=2, distributed_executor_backend="threads")


def test_a_missing_ray_names_the_extra(monkeypatch):
    from kiln.runtime.tensor_parallel import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'kiln\[ray\]'"):
        import_ray()


@needs_ray
def test_a_cluster_without_the_workers_resources_is_a_clear_error(cluster, path):
    from kiln.frontend import load_hf_config
    from kiln.models.llama import LlamaForCausalLM
    from kiln.runtime.config import EngineConfig
    from kiln.runtime.tensor_parallel import launch

    config = EngineConfig(path, tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match=r"needs 1 worker actor\(s\) of \{'CPU': 1.0, 'GPU': 1.0\}.*has 0 GPU"):
        launch(config, load_hf_config(path), LlamaForCausalLM, "LlamaForCausalLM", torch.device("cuda"))


@needs_ray
def test_data_parallel_replicas_as_ray_actors(cluster, path):
    """data_parallel_size=2 on Ray: each replica an actor; every request once, in order, with one
    engine's tokens; bad input raises and the pool goes on; a killed replica actor is a clear
    error naming it, and the pool shuts down."""
    expected = LLM(path, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = LLM(path, data_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    try:
        pool = llm._replicas
        assert type(pool).__name__ == "RayReplicaPool"
        assert pool.nodes == [ray.util.get_node_ip_address()] * 2
        got = llm.generate(PROMPTS, GREEDY)
        for a, c in zip(expected, got):
            assert c.outputs[0].token_ids == a.outputs[0].token_ids
            for lp_a, lp_c in zip(a.outputs[0].logprobs, c.outputs[0].logprobs):
                assert lp_c.keys() == lp_a.keys()
                assert all(abs(lp_c[t].logprob - lp_a[t].logprob) < 1e-5 for t in lp_a)
        assert len({o.request_id for o in got}) == len(PROMPTS)
        with pytest.raises(ValueError, match="empty"):
            llm.generate(["fine", {"prompt_token_ids": []}], GREEDY)
        assert len(llm.generate(PROMPTS, SamplingParams(max_tokens=2))) == len(PROMPTS)
        ray.kill(pool.replicas[1])
        with pytest.raises(RuntimeError, match=r"replica 1 \(a Ray actor\) died"):
            llm.generate(PROMPTS, GREEDY)
        assert not pool.replicas
    finally:
        llm.shutdown()


@needs_ray
def test_data_parallel_replicas_of_tensor_parallel_engines_on_ray(cluster, path):
    """data_parallel_size=2 x tensor_parallel_size=2 on Ray: each replica actor is rank 0 of its
    own group and asks the cluster for its worker actor; one engine's tokens, in order; a cluster
    too small for the layout is a clear error before anything starts."""
    with pytest.raises(ValueError, match=r"data_parallel_size=4 x tensor_parallel_size=2 .* needs 8 CPU"):
        LLM(path, data_parallel_size=4, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    expected = LLM(path, **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = LLM(path, data_parallel_size=2, tensor_parallel_size=2, distributed_executor_backend="ray", **ENGINE)
    try:
        got = llm.generate(PROMPTS, GREEDY)
        assert [c.outputs[0].token_ids for c in got] == [a.outputs[0].token_ids for a in expected]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        assert len(groups) == 2  # each replica's worker bundle
    finally:
        llm.shutdown()
    assert not [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
