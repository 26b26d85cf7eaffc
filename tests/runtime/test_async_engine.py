"""AsyncLLM: the engine loop on its own thread, driven from asyncio: outputs, cancellation that
frees KV blocks at once, failures that stay with their request, overload, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from kiln import LLM, SamplingParams
from kiln.runtime.async_engine import AsyncLLM, EngineDeadError, EngineOverloadedError
from kiln.runtime.config import EngineConfig

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(llama_path):
    engine = AsyncLLM.from_config(EngineConfig(model=llama_path, max_model_len=256))
    finished: list[str] = []
    engine.stat_loggers.append(lambda it, stats: finished.extend(it.finish_reasons))
    engine.finish_reasons = finished  # for the tests to read
    yield engine
    engine.shutdown()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def settle(llm: AsyncLLM) -> None:
    """Wait until the engine holds no request and its KV cache is all free. Commands run in the
    order they were submitted, so a check submitted after an abort sees it done."""
    def idle(engine) -> bool:
        return not engine.parents and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    for _ in range(500):
        if await llm.call(idle):
            await llm.call(lambda e: None)  # runs on a later loop turn: the stat loggers have run
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine did not go idle: {llm.stats}")


def test_generate_streams_cumulative_outputs(llm, llama_path):
    ref = LLM(llama_path, max_model_len=256).generate("Hello, my name is", SamplingParams(max_tokens=10, **GREEDY),
                                                      use_tqdm=False)[0]

    async def main():
        outs = [o async for o in llm.generate("Hello, my name is", SamplingParams(max_tokens=10, **GREEDY), "a")]
        return outs

    outs = run(main())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 10
    assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
    assert outs[-1].outputs[0].text == ref.outputs[0].text


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_a_consumer_that_stops_aborts_its_request(llm, how):
    async def main():
        aborted = llm.finish_reasons.count("abort")
        gen = llm.generate("Once upon a time", SamplingParams(max_tokens=200, **GREEDY), f"stop-{how}")
        if how == "break":
            async for out in gen:
                break
            await gen.aclose()
        else:
            first = asyncio.Event()

            async def consume():
                async for _ in gen:
                    first.set()

            task = asyncio.ensure_future(consume())
            await first.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await settle(llm)
        assert llm.finish_reasons.count("abort") == aborted + 1  # aborted, not run to 200 tokens

    run(main())


def test_bad_input_fails_alone(llm):
    async def main():
        good = asyncio.ensure_future(_collect(llm.generate("Hello", SamplingParams(max_tokens=20, **GREEDY), "good")))
        with pytest.raises(ValueError, match="max_model_len"):
            await _collect(llm.generate("word " * 400, SamplingParams(), "too-long"))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await _collect(llm.generate({"prompt_token_ids": [10**6]}, SamplingParams(), "bad-id"))
        with pytest.raises(ValueError, match="already in use"):
            await _collect(llm.generate("Hello", SamplingParams(), "good"))  # a duplicate id leaves the first alone
        out = await good
        assert out.finished and len(out.outputs[0].token_ids) == 20

    run(main())


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(llm):
    async def main():
        def break_once(engine):
            execute = engine.runner.execute

            def failing(*args, **kwargs):
                engine.runner.execute = execute
                raise RuntimeError("injected failure")

            engine.runner.execute = failing

        await llm.call(break_once)
        with pytest.raises(RuntimeError, match="injected failure"):
            await _collect(llm.generate("Hello", SamplingParams(max_tokens=4, **GREEDY), "doomed"))
        out = await _collect(llm.generate("Hello", SamplingParams(max_tokens=4, **GREEDY), "after"))
        assert len(out.outputs[0].token_ids) == 4
        await settle(llm)

    run(main())


def test_abort_by_id_and_overload(llm):
    async def main():
        stream = await llm.add_request("long", "Hello", SamplingParams(max_tokens=200, **GREEDY))
        llm.max_pending_requests = 1
        try:
            with pytest.raises(EngineOverloadedError, match="max_pending_requests=1"):
                await llm.add_request("second", "Hello", SamplingParams(max_tokens=2))
        finally:
            llm.max_pending_requests = None
        await llm.abort("long")
        outs = [o async for o in stream]  # ends without a finished output
        assert not outs or not outs[-1].finished
        await settle(llm)

    run(main())


def test_call_runs_on_the_engine_thread(llm):
    import threading

    assert run(llm.call(lambda e: threading.current_thread().name)) == "kiln-engine"
    with pytest.raises(ZeroDivisionError):
        run(llm.call(lambda e: 1 / 0))


def test_shutdown_fails_new_requests(llama_path):
    llm = AsyncLLM.from_config(EngineConfig(model=llama_path, max_model_len=64))
    llm.shutdown()
    assert not llm.is_alive
    with pytest.raises(EngineDeadError):
        run(_collect(llm.generate("Hello", SamplingParams(), "late")))


async def _collect(gen):
    out = None
    async for out in gen:
        pass
    return out
