"""AsyncEngine in process: a failing step fails its requests, not the engine."""
from __future__ import annotations

import asyncio

import pytest

from kvflow import SamplingParams
from kvflow.engine.args import EngineArgs
from kvflow.engine.async_engine import (MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine,
                                        EngineDeadError, RequestFailedError)
from kvflow.engine.llm_engine import LLMEngine

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture
def engine(checkpoint):
    llm_engine = LLMEngine(EngineArgs(model=str(checkpoint("llama-gqa")), dtype="float32",
                                      device="cpu", kv_cache_memory="4MiB"))
    async_engine = AsyncEngine(llm_engine)
    async_engine.start()
    yield async_engine
    async_engine.shutdown(grace_s=1.0)


def _fail_next(engine: AsyncEngine, times: int) -> None:
    execute = engine.engine.runner.execute
    left = times

    def flaky(scheduler_output):  # noqa: ANN001, ANN202
        nonlocal left
        if left > 0:
            left -= 1
            raise RuntimeError("injected")
        return execute(scheduler_output)

    engine.engine.runner.execute = flaky


async def _run(engine: AsyncEngine, request_id: str, prompt: list[int]):  # noqa: ANN202
    prepared = engine.engine.prepare_request(request_id, {"prompt_token_ids": prompt}, PARAMS)
    last = None
    async for output in engine.generate(prepared):
        last = output
    return last


def test_a_failed_step_fails_its_requests_and_the_engine_recovers(engine):
    _fail_next(engine, 1)

    async def scenario():  # noqa: ANN202
        return await asyncio.gather(_run(engine, "a", list(range(5, 30))),
                                    _run(engine, "b", list(range(40, 50))),
                                    return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RequestFailedError) for r in results), results
    assert engine.alive
    after = asyncio.run(_run(engine, "c", list(range(5, 30))))
    assert after.finished and len(after.outputs[0].token_ids) == 4
    pool = engine.engine.kv_manager.pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    pool.check_integrity()


def test_failures_in_a_row_end_the_engine(engine):
    _fail_next(engine, MAX_CONSECUTIVE_STEP_FAILURES)
    for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
        with pytest.raises((RequestFailedError, EngineDeadError)):
            asyncio.run(_run(engine, f"r{i}", list(range(5, 20))))
    assert not engine.alive
    with pytest.raises(EngineDeadError):
        asyncio.run(_run(engine, "late", list(range(5, 20))))


def test_a_consumer_that_stops_reading_pins_one_output(engine):
    import gc

    from kvflow.outputs import RequestOutput

    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    prepared = engine.engine.prepare_request("slow", {"prompt_token_ids": [5, 6, 7]}, params)

    async def scenario() -> tuple[int, RequestOutput]:
        outputs = engine.generate(prepared)
        first = await anext(outputs)
        while engine.engine.has_unfinished_requests():  # the engine runs on; we do not read
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        gc.collect()
        pinned = sum(type(o) is RequestOutput for o in gc.get_objects())
        last = [o async for o in outputs][-1]
        assert len(first.outputs[0].token_ids) < 60
        return pinned, last

    pinned, last = asyncio.run(scenario())
    assert pinned <= 3, f"{pinned} outputs held for one unread stream"
    assert last.finished and len(last.outputs[0].token_ids) == 60
