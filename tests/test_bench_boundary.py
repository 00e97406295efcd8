"""``mini-vllm bench boundary``: one step's message across the engine core's boundary, timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mini_vllm import cli
from mini_vllm.bench.boundary import measure

pytestmark = pytest.mark.timeout(60)


def test_every_part_is_timed_and_the_message_carries_every_sequence() -> None:
    small, large = measure(4, 5), measure(64, 5)
    for result in (small, large):
        parts = ("encode", "pickle", "send_receive", "unpickle", "apply")
        frames = ("frame_json", "frame_ws", "frame_send")
        assert all(result[k] >= 0 for k in (*parts, *frames))
        assert result["boundary_total"] == pytest.approx(sum(result[k] for k in parts), abs=0.2)
        assert result["frames_total"] == pytest.approx(sum(result[k] for k in frames), abs=0.2)
        assert result["frame_us"] > 0
    assert large["bytes"] > small["bytes"] + 60 * 20  # at least ~20 bytes per sequence more


def test_the_command_writes_its_json_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "boundary", "--sequences", "8", "--steps", "3"]) == 0
    (path,) = tmp_path.glob("boundary-*.json")
    record = json.loads(path.read_text())
    assert record["sequences"] == 8 and record["steps"] == 3
    assert set(record["microseconds_per_step"]) == {
        "encode", "pickle", "send_receive", "unpickle", "apply", "boundary_total",
        "frame_json", "frame_ws", "frame_send", "frames_total",
    }
    assert record["microseconds_per_client_frame"] > 0
    assert "8 sequences" in capsys.readouterr().out
    assert cli.main(["bench", "boundary", "--steps", "0"]) == 2
