"""AsyncEngine in process: a failing step fails its requests, not the engine."""
from __future__ import annotations

import asyncio
import time

import pytest

from kvflow import SamplingParams
from kvflow.engine.args import EngineArgs
from kvflow.engine.async_engine import (MAX_CONSECUTIVE_STEP_FAILURES, PROBE_PREFIX,
                                        AsyncEngine, EngineDeadError, RequestFailedError)
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


async def _run(engine: AsyncEngine, request_id: str, prompt: list[int]):  # noqa: ANN202
    prepared = engine.engine.prepare_request(request_id, {"prompt_token_ids": prompt}, PARAMS)
    last = None
    async for output in engine.generate(prepared):
        last = output
    return last


def _fail_steps_with(engine: AsyncEngine, poisoned: str | None) -> list[list[str]]:
    """Every step that holds request `poisoned` fails (every step, with None); returns the
    request ids of every step tried."""
    submit = engine.engine.runner.submit
    steps: list[list[str]] = []

    def flaky(scheduler_output, *args):  # noqa: ANN001, ANN002, ANN202
        ids = [s.req_id for s in scheduler_output.scheduled]
        steps.append(ids)
        if poisoned is None or poisoned in ids:
            raise RuntimeError("injected secret")
        return submit(scheduler_output, *args)

    engine.engine.runner.submit = flaky
    return steps


def test_a_request_that_fails_steps_fails_alone_and_others_finish(engine):
    reference = asyncio.run(_run(engine, "ref", list(range(5, 30))))
    steps = _fail_steps_with(engine, "bad")

    async def scenario():  # noqa: ANN202
        return await asyncio.gather(_run(engine, "good", list(range(5, 30))),
                                    _run(engine, "bad", list(range(40, 50))),
                                    return_exceptions=True)

    good, bad = asyncio.run(scenario())
    assert isinstance(bad, RequestFailedError) and "secret" not in str(bad), bad
    assert good.finished and good.outputs[0].token_ids == reference.outputs[0].token_ids
    # "bad" failed alone (its batch with "good", if they shared one, was split), then a
    # probe ran alone.
    assert ["bad"] in steps and any(s[0].startswith(PROBE_PREFIX) for s in steps if s)
    assert engine.alive
    pool = engine.engine.kv_manager.pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    pool.check_integrity()


def test_many_failing_requests_in_a_row_leave_the_engine_up(engine):
    _fail_steps_with(engine, "bad")
    for _ in range(2 * MAX_CONSECUTIVE_STEP_FAILURES):
        with pytest.raises(RequestFailedError):
            asyncio.run(_run(engine, "bad", list(range(5, 20))))
    assert engine.alive
    after = asyncio.run(_run(engine, "c", list(range(5, 30))))
    assert after.finished and len(after.outputs[0].token_ids) == 4


def test_an_engine_that_cannot_step_is_detected(engine):
    _fail_steps_with(engine, None)
    with pytest.raises((RequestFailedError, EngineDeadError)) as failed:
        asyncio.run(_run(engine, "r", list(range(5, 20))))
    assert "secret" not in str(failed.value)
    deadline = time.monotonic() + 30
    while engine.alive and time.monotonic() < deadline:  # the probe runs after "r" failed
        time.sleep(0.01)
    assert not engine.alive
    with pytest.raises(EngineDeadError) as dead:
        asyncio.run(_run(engine, "late", list(range(5, 20))))
    assert "secret" not in str(dead.value)


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


def test_the_server_reaches_the_engine_only_through_its_client():
    """kvflow/server talks to an EngineClient (engine/client.py), never to the engine's
    scheduler, runner or model, so that an engine core can live elsewhere."""
    import re
    from pathlib import Path

    import kvflow.server

    reaching_in = re.compile(r"\bengine\.(engine|runner|scheduler|kv_manager|executor|call)\b")
    for path in sorted(Path(kvflow.server.__file__).parent.rglob("*.py")):
        found = reaching_in.findall(path.read_text())
        assert not found, f"{path.name} reaches into the engine: {found}"
