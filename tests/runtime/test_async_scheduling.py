"""async_scheduling=True launches each decode step before reading back the previous one's tokens
(they reach the next step on the device). Whatever the schedule does — stops, lengths, stop
strings, preemption, chunked prefill, prefix hits, aborts, a request that needs the synchronous
path, and (property-tested) any order of arrivals, steps and aborts — the outputs must be exactly
the synchronous engine's, and every block must come back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln import LLM, SamplingParams

PROMPTS = ["Hello, my name is", "The capital of France is", "one two three four five six",
           "Paged attention keeps keys and values in fixed-size blocks", "a", "the quick brown fox"]


def outputs(outs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def mixed_params() -> list[SamplingParams]:
    """Greedy with EOS allowed, lengths 1..24, a stop string, seeded sampling with n = 2."""
    return [SamplingParams(temperature=0, max_tokens=24),
            SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=17, ignore_eos=True, stop=["e"]),
            SamplingParams(temperature=0.8, top_p=0.9, seed=7, n=2, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
            SamplingParams(temperature=1.0, top_k=5, seed=3, max_tokens=20)]


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 5},  # chunked prefill beside decodes
    {"block_size": 4, "num_gpu_blocks_override": 16, "max_model_len": 64, "enable_prefix_caching": False},  # preemption
    {"max_num_seqs": 2},  # requests admitted as others finish
    {"max_model_len": 36},  # some requests stop at the model's length
], ids=["plain", "chunked", "preempting", "two-seqs", "max-len"])
def test_same_outputs_as_the_synchronous_engine(llama_path, engine_args):
    params = mixed_params()
    sync = LLM(llama_path, async_scheduling=False, **engine_args).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(llama_path, async_scheduling=True, **engine_args)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert outputs(got) == outputs(sync)
    engine = llm.llm_engine
    if "num_gpu_blocks_override" in engine_args:
        assert engine.scheduler.num_preemptions > 0
    assert engine._inflight is None and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_steps_overlap_and_prefix_hits_still_happen(llama_path):
    llm = LLM(llama_path, async_scheduling=True)
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", PROMPTS[3], greedy)
    engine.step()  # the prefill, launched: its token is still on the device
    assert engine._inflight is not None and engine.requests["a"].num_pending == 1
    engine.step()  # the first decode launched, then the prefill's token read back
    req = engine.requests["a"]
    assert req.num_pending == 1 and len(req.output_token_ids) == 1
    while engine.has_unfinished_requests():
        engine.step()
    # the same prompt again: its full blocks were registered although tokens arrived a step late
    again = llm.generate(PROMPTS[3], greedy, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0


def test_abort_while_a_step_is_in_flight(llama_path):
    llm = LLM(llama_path, async_scheduling=True)
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for rid, prompt in zip("abc", PROMPTS):
        engine.add_request(rid, prompt, greedy)
    engine.step()
    engine.step()
    engine.abort_request("b")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["a", "c"]
    want = LLM(llama_path, async_scheduling=False).generate([PROMPTS[0], PROMPTS[2]], greedy, use_tqdm=False)
    assert [finished[r].outputs[0].token_ids for r in "ac"] == [o.outputs[0].token_ids for o in want]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_that_reads_its_history_runs_the_steps_in_turn(llama_path):
    """logprobs and penalties need the previous token on the host: while such a request lives,
    steps are not overlapped, and everyone's outputs stay the synchronous engine's."""
    params = mixed_params()[:3] + [SamplingParams(temperature=0, max_tokens=10, logprobs=2, repetition_penalty=1.2)]
    sync = LLM(llama_path, async_scheduling=False).generate(PROMPTS[:4], params, use_tqdm=False)
    got = LLM(llama_path, async_scheduling=True).generate(PROMPTS[:4], params, use_tqdm=False)
    assert outputs(got) == outputs(sync)
    assert [o.outputs[0].logprobs for o in got] == [o.outputs[0].logprobs for o in sync]


@pytest.fixture(scope="module")
def engine_pair(llama_path):
    """(synchronous, async) engines with a tight cache, so that runs preempt."""
    args = dict(block_size=4, num_gpu_blocks_override=24, max_model_len=64, max_num_seqs=4)
    return (LLM(llama_path, async_scheduling=False, **args).llm_engine,
            LLM(llama_path, async_scheduling=True, **args).llm_engine)


def _drive(engine, script) -> dict:
    """Play a script of ("add", id, prompt, params) / ("step",) / ("abort", id) on an engine, then
    run it dry; the finished outputs by id (aborted requests excluded)."""
    done = {}

    def step():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(c.token_ids, c.text, c.finish_reason) for c in out.outputs]

    for op in script:
        if op[0] == "add":
            engine.add_request(*op[1:])
        elif op[0] == "step":
            step()
        elif op[1] in engine.parents:
            engine.abort_request(op[1])
    while engine.has_unfinished_requests():
        step()
    return done


_PARAMS = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=ignore, stop=stop)
           for m, ignore, stop in ((3, True, None), (11, False, None), (7, True, ["e"]), (1, True, None))]
_PARAMS.append(SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=6, ignore_eos=True))


@settings(max_examples=12, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, len(PROMPTS) - 1), st.integers(0, len(_PARAMS) - 1)),
    st.tuples(st.just("step")), st.tuples(st.just("abort"), st.integers(0, 7))), max_size=24))
def test_any_arrival_and_abort_order_gives_the_synchronous_outputs(engine_pair, ops):
    """Requests arriving between steps, aborts, preemption: every request both engines finish has
    the same outputs. (An abort lands at the same call on both, but the async engine is a step
    behind in what it has reported, so a request one engine finished the other may have aborted.)"""
    script, ids = [], []
    for op in ops:
        if op[0] == "add":
            ids.append(f"r{len(ids)}")
            script.append(("add", ids[-1], PROMPTS[op[1]], _PARAMS[op[2]]))
        elif op[0] == "abort" and ids:
            script.append(("abort", ids[op[1] % len(ids)]))
        elif op[0] == "step":
            script.append(op)
    sync, fast = (_drive(engine, script) for engine in engine_pair)
    both = set(sync) & set(fast)
    assert {rid: sync[rid] for rid in both} == {rid: fast[rid] for rid in both}
    unaborted = {op[1] for op in script if op[0] == "add"} - {op[1] for op in script if op[0] == "abort"}
    assert unaborted <= both  # a request nobody aborted finishes on both
    for engine in engine_pair:
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_staged_inputs_land_whole_and_aligned():
    """An eager step's inputs go to the device in one buffer (pinned on CUDA, one asynchronous
    copy): each field whole, flattened, on a 64-byte boundary; empty fields stay empty."""
    import numpy as np
    import torch

    from kiln.runtime.model_runner import _staged, fill_in

    table = np.arange(6).reshape(2, 3)
    ids, empty, tables, pairs = _staged(torch.device("cpu"), [[5, 6, 7], [], table, [[1, 2], [0, 0]]])
    assert ids.tolist() == [5, 6, 7] and empty.numel() == 0
    assert tables.view(2, 3).tolist() == table.tolist() and pairs.view(2, -1).tolist() == [[1, 2], [0, 0]]
    assert all(t.dtype == torch.int64 and t.storage_offset() % 8 == 0 for t in (ids, tables, pairs))
    # async scheduling's fill: rows 1 and 2 of the step take the in-flight step's token 0
    tokens, target = torch.tensor([40, 41]), torch.zeros(4, dtype=torch.long)
    fill_in(target, tokens, [1, 2], [0, 0], pairs.view(2, -1))
    assert target.tolist() == [0, 40, 40, 0]
    fill_in(target, torch.tensor([9, 8, 7]), [0, 2], [2, 1])  # (no index given: staged here)
    assert target.tolist() == [7, 40, 8, 0]


def test_pending_tokens_are_read_without_waiting_for_the_next_step():
    """The tokens of a launched step are read back through their own copy and event: on CUDA,
    reading them must not wait for work queued after them (the next step, here a sleeping kernel)."""
    import torch

    from kiln.runtime.model_runner import PendingTokens

    assert PendingTokens(torch.tensor([3, 4]), {}).token_ids() == [3, 4]  # (CPU: read directly)
    if not torch.cuda.is_available():
        pytest.skip("the overlap needs a CUDA device")
    pending = PendingTokens(torch.tensor([5, 6, 7], device="cuda"), {})
    torch.cuda._sleep(2_000_000_000)  # about a second of device time queued behind the tokens
    assert pending.token_ids() == [5, 6, 7]
    assert not torch.cuda.current_stream().query()  # the sleep is still running: it was not waited for
    torch.cuda.synchronize()


def test_on_by_default_only_where_the_host_and_the_device_are_two(llama_path):
    """Unset, async scheduling is on for a CUDA device (as vLLM has it) and off on the CPU, where
    the host is the device and there is nothing to overlap; either way an explicit setting wins."""
    import torch

    assert LLM(llama_path, device="cpu").llm_engine.async_scheduling is False
    assert LLM(llama_path, async_scheduling=True).llm_engine.async_scheduling is True
    if torch.cuda.is_available():
        assert LLM(llama_path, device="cuda").llm_engine.async_scheduling is True
        assert LLM(llama_path, device="cuda", async_scheduling=False).llm_engine.async_scheduling is False


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "FalconForCausalLM",
                                  "BloomForCausalLM"])
def test_every_native_family_gives_the_steps_in_turn_outputs(arch, checkpoints):
    """Sliding windows, yarn, q/k norms, Falcon's parallel layout, ALiBi: with async scheduling
    (the default on CUDA) each family gives the synchronous engine's outputs (Llama: above)."""
    params = mixed_params()
    sync = LLM(checkpoints[arch], async_scheduling=False).generate(PROMPTS, params, use_tqdm=False)
    assert outputs(LLM(checkpoints[arch], async_scheduling=True).generate(PROMPTS, params, use_tqdm=False)) == outputs(sync)
