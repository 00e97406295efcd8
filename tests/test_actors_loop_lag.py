"""The event loop stays responsive while the executor thread runs model steps: measured, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from conftest_serving import build_engine

from mini_vllm.actors import LoopLagMonitor, ServiceConfig, measure_loop_lag_under_load, open_service

pytestmark = pytest.mark.timeout(180)


async def test_loop_lag_under_load_is_small_and_reported(
    demo_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = build_engine(demo_model_dir, num_kv_blocks=256)
    async with open_service([engine], ServiceConfig(loop_lag_interval=0.005)) as service:
        result = await measure_loop_lag_under_load(service, requests=16, max_tokens=32, idle_seconds=0)
    assert result.generated_tokens == 16 * 32
    assert result.loaded.samples > 10
    with capsys.disabled():
        print(
            f"\nloop lag under load ({result.requests} requests x {result.max_tokens} tokens, {result.steps} steps, "
            f"{result.mean_step_ms:.1f} ms/step in the executor): p50 {result.loaded.p50_ms:.2f} ms, "
            f"p99 {result.loaded.p99_ms:.2f} ms, max {result.loaded.max_ms:.2f} ms"
        )
    # Generous bound for a loaded CI machine; typical figures are in docs/serving.md.
    assert result.loaded.p99_ms < 250


async def test_lag_monitor_statistics(autojump_clock: trio.testing.MockClock) -> None:
    monitor = LoopLagMonitor(interval=0.01, window=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.sleep(2.0)
        nursery.cancel_scope.cancel()
    stats = monitor.statistics()
    assert stats.samples == 100  # the window is bounded
    assert stats.max_ms == 0.0  # the mock clock never runs late
    monitor.reset()
    assert monitor.statistics().samples == 0
