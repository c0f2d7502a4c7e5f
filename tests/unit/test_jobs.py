"""run_periodically: a failing background job is logged when its failures start and when it
recovers, with a traceback when the failure is a bug, and counted in between (pure logic)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from agentstore.errors import ApiError
from agentstore.jobs import run_periodically

UNAVAILABLE = ApiError(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE", "the database is unavailable")


async def run_rounds(outcomes: list[BaseException | int]) -> None:
    done = asyncio.Event()
    rounds = iter(outcomes)

    async def job() -> int:
        outcome = next(rounds, None)
        if outcome is None:
            done.set()
            await asyncio.Event().wait()  # park until cancelled
        if isinstance(outcome, BaseException):
            raise outcome
        return int(outcome or 0)

    runner = asyncio.create_task(run_periodically("widgets swept", 0, job))
    await asyncio.wait_for(done.wait(), 5)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_an_outage_logs_its_start_and_its_end_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agentstore.jobs")
    await run_rounds([UNAVAILABLE] * 50 + [0, 3])
    ours = [r for r in caplog.records if r.getMessage().startswith("widgets swept")]  # not the server's own jobs
    messages = [(r.getMessage(), getattr(r, "reason", None), getattr(r, "failed_rounds", None)) for r in ours]
    assert messages == [
        ("widgets swept failed", "DATABASE_UNAVAILABLE", None),
        ("widgets swept works again", None, 50),
        ("widgets swept", None, None),
    ]
    assert not any(r.exc_info for r in ours)  # an expected failure needs no traceback


async def test_a_bug_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "agentstore.jobs")
    await run_rounds([KeyError("oops"), KeyError("oops"), UNAVAILABLE])
    failed = [r for r in caplog.records if r.getMessage() == "widgets swept failed"]
    assert len(failed) == 2  # the bug once, then the outage (another kind of failure)
    assert failed[0].exc_info is not None and failed[0].exc_info[0] is KeyError
    assert failed[1].exc_info is None
