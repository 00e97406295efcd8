"""``mini-vllm bench serve`` and ``bench plot``: the ONLINE-1000 workload, arrivals, the client-side
metrics on hand-built timelines, and runs against an in-process server, a running one, a sweep."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest_serving import build_engine, running_server, wait_blocks_released

from mini_vllm import cli
from mini_vllm.bench import serve as bench_serve
from mini_vllm.bench.serve import (
    ServeBenchConfig,
    ServeRequest,
    Tracker,
    distribution,
    load_dataset,
    online_requests,
    parse_goodput,
    percentile,
    run_one_rate,
    summarize,
)
from mini_vllm.engine.errors import ConfigError
from mini_vllm.engine.workloads import arrival_times, online_1000

pytestmark = pytest.mark.timeout(120)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- ONLINE-1000 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [259, 32_000, 151_936])
def test_online_1000_is_exact_for_any_vocab(vocab: int) -> None:
    reqs = online_1000(vocab)
    assert len(reqs) == 1000
    prompt_lens = [len(r.prompt_token_ids) for r in reqs]
    output_lens = [r.output_len for r in reqs]
    assert sum(prompt_lens) == 564_925 and sum(output_lens) == 274_888
    assert min(prompt_lens) >= 128 and max(prompt_lens) <= 1024
    assert min(output_lens) >= 32 and max(output_lens) <= 512
    # Lengths: random.Random(0), prompt then output, request by request.
    lengths = random.Random(0)
    assert [(p, o) for p, o in zip(prompt_lens, output_lens, strict=True)] == [
        (lengths.randint(128, 1024), lengths.randint(32, 512)) for _ in range(1000)
    ]
    # Ids: one random.Random(1) stream across requests.
    ids = random.Random(1)
    for r in reqs[:3]:
        assert r.prompt_token_ids == [ids.randrange(vocab) for _ in range(len(r.prompt_token_ids))]
    assert all(0 <= t < vocab for r in reqs for t in r.prompt_token_ids)


def test_online_1000_prefixes_and_serve_requests_agree() -> None:
    full = online_1000(259)
    assert [(len(r.prompt_token_ids), r.output_len) for r in full[:5]] == [
        (992, 229), (904, 487), (558, 52), (393, 293), (625, 239)
    ]  # fmt: skip
    for n in (1, 7, 250):
        assert online_1000(259, n) == full[:n]
    serve = online_requests(259, 10)
    assert [(r.prompt, list(r.prompt_token_ids or ()), r.output_len) for r in serve] == [
        (None, r.prompt_token_ids, r.output_len) for r in full[:10]
    ]
    # Lengths never depend on the vocabulary, ids do.
    other = online_1000(50_000, 10)
    assert [r.output_len for r in other] == [r.output_len for r in full[:10]]
    assert [len(r.prompt_token_ids) for r in other] == [len(r.prompt_token_ids) for r in full[:10]]
    assert other[0].prompt_token_ids != full[0].prompt_token_ids


def test_serve_request_frame() -> None:
    text = json.loads(ServeRequest("hi", None, 7).frame("r1", None, ignore_eos=True))
    assert text == {
        "type": "generate",
        "id": "r1",
        "max_tokens": 7,
        "temperature": 0,
        "ignore_eos": True,
        "prompt": "hi",
    }
    ids = json.loads(ServeRequest(None, (3, 4), 2).frame("r2", "m", ignore_eos=False))
    assert ids == {
        "type": "generate",
        "id": "r2",
        "max_tokens": 2,
        "temperature": 0,
        "model": "m",
        "prompt_token_ids": [3, 4],
    }


# ---- arrivals -------------------------------------------------------------------------------------------


def test_arrival_times_all_at_once() -> None:
    assert arrival_times(5, math.inf) == [0.0] * 5
    assert arrival_times(3, math.inf, burstiness=0.3) == [0.0] * 3
    assert arrival_times(0, 2.0) == []


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 3.0])
def test_arrival_times_mean_gap_is_one_over_rate(burstiness: float) -> None:
    for rate in (4.0, 50.0):
        times = arrival_times(20_000, rate, burstiness)
        assert times[0] == 0.0 and times == sorted(times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)


def test_arrival_times_rederived_from_seed_2() -> None:
    """Send, then draw the gap to the next: gamma(shape=burstiness, mean=1/rate) from random.Random(2)."""
    for rate, burstiness in ((2.0, 1.0), (5.0, 0.5)):
        gaps = random.Random(2)
        expected, clock = [], 0.0
        for _ in range(50):
            expected.append(clock)
            clock += gaps.gammavariate(burstiness, 1.0 / (rate * burstiness))
        assert arrival_times(50, rate, burstiness) == expected


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 3.0])
def test_arrival_times_same_pattern_stretched_by_rate(burstiness: float) -> None:
    at1 = arrival_times(500, 1.0, burstiness)
    # Scaling by a power of two is exact in binary floating point.
    assert arrival_times(500, 2.0, burstiness) == [t / 2 for t in at1]
    assert arrival_times(500, 3.0, burstiness) == pytest.approx([t / 3 for t in at1], rel=1e-12, abs=1e-12)
    assert arrival_times(500, 1.0, burstiness) == at1  # deterministic


def test_burstier_arrivals_vary_more() -> None:
    def cv(burstiness: float) -> float:
        times = arrival_times(5000, 10.0, burstiness)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return statistics.pstdev(gaps) / statistics.fmean(gaps)

    poisson, bursty, regular = cv(1.0), cv(0.25), cv(4.0)
    assert poisson == pytest.approx(1.0, rel=0.1)  # exponential gaps
    assert bursty == pytest.approx(2.0, rel=0.15) and bursty > 1.5 * poisson  # gamma: CV = 1/sqrt(shape)
    assert regular < 0.7 * poisson


@pytest.mark.parametrize("rate,burstiness", [(0, 1), (-1, 1), (math.nan, 1), (1, 0), (1, -0.5), (1, math.nan)])
def test_arrival_times_rejects_bad_arguments(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        arrival_times(3, rate, burstiness)


# ---- goodput targets and datasets ---------------------------------------------------------------------------


def test_parse_goodput() -> None:
    assert parse_goodput([]) == {}
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000.5"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    assert parse_goodput(["ttft:1", "ttft:2"]) == {"ttft": 2.0}


@pytest.mark.parametrize(
    "item,message",
    [
        ("foo:1", "METRIC:MS"),
        ("ttft", "METRIC:MS"),
        ("TTFT:5", "METRIC:MS"),
        ("ttft:abc", "is not a number"),
        ("ttft:", "is not a number"),
        ("tpot:0", "must be > 0"),
        ("e2el:-3", "must be > 0"),
        ("ttft:nan", "must be > 0"),
    ],
)
def test_parse_goodput_errors(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_goodput(["ttft:5", item])
    assert repr(item) in str(info.value)


def test_load_dataset_text_and_token_prompts(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "Hello there", "max_tokens": 3}\n'
        "\n"
        '{"prompt_token_ids": [5, 6, 7]}\n'
        "   \n"
        '{"prompt": "abc", "max_tokens": 1, "extra": "ignored"}\n'
    )
    assert load_dataset(path, None, 9) == [
        ServeRequest("Hello there", None, 3),
        ServeRequest(None, (5, 6, 7), 9),
        ServeRequest("abc", None, 1),
    ]
    assert load_dataset(path, 2, 9) == load_dataset(path, None, 9)[:2]
    assert load_dataset(path, 50, 4)[1].output_len == 4


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"text"', "must be a JSON object"),
        ("{}", "exactly one of"),
        ('{"prompt": "a", "prompt_token_ids": [1]}', "exactly one of"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string"),
        ('{"prompt": 5}', "'prompt' must be a non-empty string"),
        ('{"prompt_token_ids": []}', "'prompt_token_ids' must be a non-empty list of integers"),
        ('{"prompt_token_ids": [1, "a"]}', "'prompt_token_ids' must be a non-empty list of integers"),
        ('{"prompt_token_ids": [true]}', "'prompt_token_ids' must be a non-empty list of integers"),
        ('{"prompt_token_ids": [1.5]}', "'prompt_token_ids' must be a non-empty list of integers"),
        ('{"prompt_token_ids": "abc"}', "'prompt_token_ids' must be a non-empty list of integers"),
        ('{"prompt": "a", "max_tokens": 0}', "'max_tokens' must be an integer >= 1"),
        ('{"prompt": "a", "max_tokens": "5"}', "'max_tokens' must be an integer >= 1"),
        ('{"prompt": "a", "max_tokens": true}', "'max_tokens' must be an integer >= 1"),
        ('{"prompt": "a", "max_tokens": 2.0}', "'max_tokens' must be an integer >= 1"),
    ],
)
def test_load_dataset_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + '\n{"prompt": "after"}\n')
    with pytest.raises(ConfigError) as info:
        load_dataset(path, None, 8)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ") and message in text


def test_load_dataset_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read dataset"):
        load_dataset(tmp_path / "missing.jsonl", None, 8)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(ConfigError, match="cannot read dataset"):
        load_dataset(binary, None, 8)
    empty = tmp_path / "empty.jsonl"
    for content in ("", "\n  \n\n"):
        empty.write_text(content)
        with pytest.raises(ConfigError, match="holds no requests"):
            load_dataset(empty, None, 8)


# ---- metrics from hand-built timelines --------------------------------------------------------------------


def test_percentile_and_distribution() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # order does not matter
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # (4-1)*0.9 = 2.7 -> 3 + 0.7
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    assert distribution(values) == {"mean": 2.5, "median": 2.5, "p90": 3.7, "p99": 3.97, "max": 4.0}
    assert distribution([]) == {"mean": None, "median": None, "p90": None, "p99": None, "max": None}


def _token(n: int = 1) -> dict[str, Any]:
    return {"type": "token", "id": "x", "index": 0, "token_ids": list(range(n)), "text": "t" * n}


def _done(reason: str, prompt_tokens: int | None = None, **more: Any) -> dict[str, Any]:
    usage = None if prompt_tokens is None else {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
    return {"type": "done", "id": "x", "index": 0, "finish_reason": reason, "usage": usage, **more}


def _timeline(
    index: int, sent: float, events: Sequence[tuple[float, dict[str, Any]]], prompt_len: int | None = None
) -> Tracker:
    t = Tracker(index, prompt_len, 16)
    t.sent = sent
    for now, frame in events:
        t.on_frame(now, frame)
    return t


def _trackers() -> list[Tracker]:
    return [
        # 4 tokens in 3 frames: TTFT 100, E2E 500, TPOT (500-100)/3, ITL 100 and 200.
        _timeline(
            0,
            10.0,
            [(10.1, _token()), (10.2, _token(2)), (10.25, _token(0)), (10.4, _token()), (10.5, _done("length", 7))],
        ),
        # 2 tokens: TTFT 300, E2E 800, TPOT 500, ITL 100; the last 'done' of the run.
        _timeline(1, 10.2, [(10.5, _token()), (10.6, _token()), (11.0, _done("stop", 3))]),
        # 1 token: no TPOT, no ITL; prompt length from the request (no usage).
        _timeline(2, 10.3, [(10.35, _token()), (10.4, _done("length"))], prompt_len=5),
        # Failures, by kind.
        _timeline(
            3, 10.4, [(10.45, _token()), (10.6, _done("error", 9, error={"code": "internal", "message": "boom: x"}))]
        ),
        _timeline(4, 10.4, [(10.45, {"type": "error", "id": "x", "code": "overloaded", "message": "busy"})]),
        _timeline(5, 10.5, [(10.55, _token())]),
        _timeline(6, 10.5, [(10.7, _done("abort", 4))]),
        _timeline(7, 10.5, [(10.6, _done("length", 4))]),  # no token: not a success
    ]


def test_tracker_timeline() -> None:
    t = _trackers()
    assert t[0].tokens == 4 and len(t[0].token_times) == 3  # an empty token frame is not a token frame
    assert t[0].ttft_ms == pytest.approx(100) and t[0].e2e_ms == pytest.approx(500)
    assert t[0].tpot_ms == pytest.approx(400 / 3) and t[0].itls_ms() == pytest.approx([100, 200])
    assert t[1].tpot_ms == pytest.approx(500) and t[2].tpot_ms is None and t[2].itls_ms() == []
    assert [x.ok for x in t] == [True, True, True, False, False, False, False, False]
    assert t[3].error == "internal: boom: x" and t[4].error == "overloaded: busy"
    assert t[4].finished.is_set() and not t[5].finished.is_set()
    t[5].fail("connection closed: gone")
    t[5].fail("something later")  # the first reason stays
    assert t[5].error == "connection closed: gone" and t[5].finished.is_set()
    t[0].fail("late")  # a finished request cannot fail afterwards
    assert t[0].ok and t[0].error is None


def test_summarize_known_timelines() -> None:
    trackers = _trackers()
    trackers[5].fail("connection closed: gone")
    s = summarize(trackers, {})
    assert (s["num_requests"], s["completed"], s["failed"]) == (8, 3, 5)
    assert s["errors"] == {
        "internal": 1,
        "overloaded": 1,
        "connection closed": 1,
        "finish_reason=abort": 1,
        "finish_reason=length": 1,
    }
    assert s["duration_s"] == pytest.approx(1.0)  # first send 10.0, last done 11.0
    assert (s["prompt_tokens"], s["output_tokens"]) == (7 + 3 + 5, 4 + 2 + 1)
    assert s["request_throughput"] == pytest.approx(3.0)
    assert s["output_throughput"] == pytest.approx(7.0)
    assert s["total_token_throughput"] == pytest.approx(22.0)
    assert s["goodput"] is None and s["goodput_targets_ms"] == {}
    assert s["token_frames"] == 3 + 2 + 1
    ttft = s["ttft_ms"]  # [100, 300, 50]
    assert (ttft["mean"], ttft["median"], ttft["max"]) == (pytest.approx(150), pytest.approx(100), pytest.approx(300))
    assert ttft["p90"] == pytest.approx(260) and ttft["p99"] == pytest.approx(296)
    assert s["tpot_ms"]["mean"] == pytest.approx((400 / 3 + 500) / 2, abs=1e-3)
    assert s["tpot_ms"]["median"] == pytest.approx((400 / 3 + 500) / 2, abs=1e-3)
    assert s["itl_ms"]["mean"] == pytest.approx(400 / 3, abs=1e-3) and s["itl_ms"]["median"] == pytest.approx(100)
    assert s["itl_ms"]["max"] == pytest.approx(200)
    assert s["e2el_ms"]["mean"] == pytest.approx(1400 / 3, abs=1e-3) and s["e2el_ms"]["median"] == pytest.approx(500)
    per = s["requests"]
    assert per["ttft_ms"] == [pytest.approx(100), pytest.approx(300), pytest.approx(50), None, None, None, None, None]
    assert per["tpot_ms"] == [pytest.approx(133.333), pytest.approx(500), None, None, None, None, None, None]
    assert per["e2el_ms"] == [pytest.approx(500), pytest.approx(800), pytest.approx(100), *[None] * 5]


def test_summarize_goodput_against_targets() -> None:
    trackers = _trackers()
    # TTFT 100/300/50 and E2E 500/800/100: requests 0 and 2 meet both, over 1 s.
    assert summarize(trackers, {"ttft": 200, "e2el": 600})["goodput"] == pytest.approx(2.0)
    # TPOT 133/500/undefined: a single-token request has no TPOT to miss.
    assert summarize(trackers, {"tpot": 200})["goodput"] == pytest.approx(2.0)
    assert summarize(trackers, {"tpot": 100})["goodput"] == pytest.approx(1.0)
    assert summarize(trackers, {"ttft": 1000, "tpot": 1000, "e2el": 1000})["goodput"] == pytest.approx(3.0)
    assert summarize(trackers, {"ttft": 10})["goodput"] == 0.0
    assert summarize(trackers, {"ttft": 200})["goodput_targets_ms"] == {"ttft": 200}


def test_summarize_nothing() -> None:
    s = summarize([], {"ttft": 5})
    assert (s["num_requests"], s["completed"], s["duration_s"], s["request_throughput"]) == (0, 0, 0.0, 0.0)
    assert s["goodput"] == 0.0 and s["ttft_ms"]["median"] is None
    never = Tracker(0, 3, 4)  # never sent
    never.fail("cancelled")
    s = summarize([never], {})
    assert (s["failed"], s["errors"], s["duration_s"], s["output_throughput"]) == (1, {"cancelled": 1}, 0.0, 0.0)


# ---- against servers ----------------------------------------------------------------------------------------


class Spy:
    """Records the trackers ``run_one_rate`` hands to ``summarize``, one list per run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs: list[list[Tracker]] = []
        real = bench_serve.summarize

        def spy(trackers: Sequence[Tracker], targets: dict[str, float]) -> dict[str, Any]:
            self.runs.append(list(trackers))
            return real(trackers, targets)

        monkeypatch.setattr(bench_serve, "summarize", spy)


def _write_dataset(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DATASET = [
    {"prompt": "Hello there", "max_tokens": 6},
    {"prompt_token_ids": [5, 6, 7, 8, 9], "max_tokens": 3},
    {"prompt": "The quick brown fox"},  # --dataset-max-tokens
    {"prompt_token_ids": [40, 41], "max_tokens": 9},
]
DATASET_MAX_TOKENS = 5
DATASET_OUTPUT = 6 + 3 + 5 + 9


def test_bench_serve_in_process_writes_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = _write_dataset(tmp_path / "small.jsonl", DATASET)
    out = tmp_path / "run" / "x.json"
    argv = [
        "bench",
        "serve",
        "--dataset",
        str(dataset),
        "--dataset-max-tokens",
        str(DATASET_MAX_TOKENS),
        "--request-rate",
        "inf",
        "--warmup-requests",
        "2",
        "--connections",
        "2",
        "--max-model-len",
        "2048",
        "--goodput",
        "ttft:600000",
        "e2el:600000",
        "--label",
        "tiny run",
        "--output",
        str(out),
    ]
    spy = Spy(monkeypatch)
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "tiny run: dataset:small.jsonl" in stdout

    record = json.loads(out.read_text())
    assert record["benchmark"] == "serve" and record["label"] == "tiny run" and record["model"] == "demo"
    assert record["workload"] == "dataset:small.jsonl"
    assert (
        record["command"].startswith("mini-vllm bench serve --dataset ") and "--label 'tiny run'" in record["command"]
    )
    assert len(record["date"]) == 20 and record["date"].endswith("Z")
    assert {"python", "torch", "trio", "mini-vllm"} <= set(record["versions"])
    assert record["goodput_targets_ms"] == {"ttft": 600000.0, "e2el": 600000.0} and record["burstiness"] == 1.0
    assert record["model_info"]["max_model_len"] == 2048
    assert record["server_config"]["in_process"] is True
    assert record["server_config"]["engine_args"]["max_model_len"] == 2048
    assert record["warmup"] == {"num_requests": 2, "completed": 2, "duration_s": record["warmup"]["duration_s"]}
    assert "sweep" not in record

    [run] = record["runs"]
    assert run["request_rate"] is None and run["num_requests"] == run["completed"] == 4 and run["failed"] == 0
    assert run["errors"] == {} and run["output_tokens"] == DATASET_OUTPUT
    assert run["goodput"] == run["request_throughput"] > 0  # targets of ten minutes: every request meets them
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = run[metric]
        assert set(d) == {"mean", "median", "p90", "p99", "max"}
        assert 0 < d["median"] <= d["p90"] <= d["p99"] <= d["max"], (metric, d)
    assert run["ttft_ms"]["max"] <= run["e2el_ms"]["max"]
    assert all(x is not None for x in run["requests"]["e2el_ms"]) and len(run["requests"]["tpot_ms"]) == 4
    server = run["server"]
    assert server["loop_lag_ms"]["samples"] >= 0 and "p99_ms" in server["loop_lag_ms"]
    engine = server["engine"]
    assert engine["generation_tokens"] == DATASET_OUTPUT  # the warm-up is not counted
    assert engine["num_preemptions"] == 0 and engine["steps"] >= 9
    assert server["frames_sent"] >= run["token_frames"] + 4

    # Every request streamed exactly its max_tokens (ignore_eos), warm-up included.
    warm, measured = spy.runs
    assert [t.tokens for t in warm] == [min(r.get("max_tokens", DATASET_MAX_TOKENS), 8) for r in DATASET[:2]]
    assert [t.tokens for t in measured] == [r.get("max_tokens", DATASET_MAX_TOKENS) for r in DATASET]
    assert [t.finish_reason for t in measured] == ["length"] * 4
    assert measured[1].prompt_tokens == 5 and measured[3].prompt_tokens == 2


async def test_load_generator_against_a_running_server(
    demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spy = Spy(monkeypatch)
    requests = [ServeRequest(None, tuple(range(10 + i, 20 + 3 * i)), 2 + i) for i in range(5)]
    async with running_server([build_engine(demo_model_dir)]) as (service, server):
        # One in flight at a time, spread over three connections.
        run = await run_one_rate(
            server.url,
            requests,
            model=None,
            request_rate=math.inf,
            burstiness=1.0,
            max_concurrency=1,
            connections=3,
            targets={"e2el": 600_000},
            label="serial",
            progress_interval=None,
        )
        await wait_blocks_released(service)
        assert (run["num_requests"], run["completed"], run["max_concurrency"]) == (5, 5, 1)
        assert (
            run["output_tokens"] == sum(r.output_len for r in requests) == run["server"]["engine"]["generation_tokens"]
        )
        assert run["prompt_tokens"] == sum(len(r.prompt_token_ids or ()) for r in requests)
        assert run["goodput"] == run["request_throughput"] > 0
        [trackers] = spy.runs
        assert [t.tokens for t in trackers] == [r.output_len for r in requests]
        by_send = sorted(trackers, key=lambda t: t.sent)
        for a, b in itertools.pairwise(by_send):
            assert b.sent >= a.done  # never two in flight

        # Open loop at a finite rate: sends follow the arrival times.
        rate = 200.0
        run = await run_one_rate(
            server.url,
            requests,
            model="demo",
            request_rate=rate,
            burstiness=1.0,
            max_concurrency=None,
            connections=2,
            targets={},
            label="paced",
            progress_interval=None,
        )
        await wait_blocks_released(service)
        assert run["request_rate"] == rate and run["completed"] == 5 and run["goodput"] is None
        sent = [t.sent for t in spy.runs[1]]
        offsets = arrival_times(5, rate)
        assert max(sent) - min(sent) >= offsets[-1] - run["send_lag_ms"]["max"] / 1e3
        assert run["send_lag_ms"]["mean"] >= 0

        # The command's coroutine: ONLINE-1000's first request, sized for the server's vocabulary.
        config = ServeBenchConfig(
            url=server.url,
            model=None,
            dataset=None,
            num_prompts=1,
            dataset_max_tokens=8,
            request_rates=(math.inf,),
            burstiness=1.0,
            max_concurrency=None,
            connections=2,
            targets={},
            sweep=False,
            label="remote",
            warmup_requests=1,
        )
        record = await bench_serve._bench(config, server.url)
        await wait_blocks_released(service)
        assert record["workload"] == "ONLINE-1000[:1]" and record["model_info"]["name"] == "demo"
        assert record["warmup"]["completed"] == 1
        [run] = record["runs"]
        first = online_1000(record["model_info"]["vocab_size"], 1)[0]
        assert run["completed"] == 1 and run["output_tokens"] == first.output_len == 229
        assert run["prompt_tokens"] == len(first.prompt_token_ids) == 992
        assert run["server"]["engine"]["generation_tokens"] == 229
        assert spy.runs[-1][0].tokens == 229

        # Refusals before any request is sent.
        with pytest.raises(ConfigError, match="has no model 'nope'"):
            await bench_serve._bench(attrs.evolve(config, model="nope"), server.url)
        max_len = record["model_info"]["max_model_len"]
        too_long = _write_dataset(tmp_path / "long.jsonl", [{"prompt_token_ids": [1] * max_len, "max_tokens": 1}])
        with pytest.raises(ConfigError, match="max_model_len"):
            await bench_serve._bench(attrs.evolve(config, dataset=too_long), server.url)
        await wait_blocks_released(service)


# ---- sweeps and plots ---------------------------------------------------------------------------------------


def test_sweep_with_explicit_rates_writes_json_and_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["pytest"])  # the record must come from main's argv, not this
    dataset = _write_dataset(tmp_path / "small.jsonl", DATASET[:3])
    out = tmp_path / "sweep.json"
    argv = [
        "bench",
        "serve",
        "--dataset",
        str(dataset),
        "--dataset-max-tokens",
        "4",
        "--sweep",
        "--request-rate",
        "400",
        "--request-rate",
        "100",
        "--warmup-requests",
        "0",
        "--connections",
        "2",
        "--max-model-len",
        "512",
        "--goodput",
        "tpot:600000",
        "--output",
        str(out),
    ]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    png = out.with_suffix(".png")
    assert f"wrote {png}" in stdout and "highest rate with p99 TPOT <= 600000 ms: 400 req/s" in stdout
    assert png.read_bytes()[:8] == PNG_MAGIC
    record = json.loads(out.read_text())
    # The record holds the arguments given to main, not the test runner's sys.argv.
    assert record["command"].startswith("mini-vllm bench serve --dataset ") and record["warmup"] is None
    assert [r["request_rate"] for r in record["runs"]] == [100.0, 400.0]  # sorted by rate
    assert all(r["completed"] == 3 and r["output_tokens"] == 6 + 3 + 4 for r in record["runs"])
    sweep = record["sweep"]
    assert sweep["highest_rate_within_p99_targets"] == 400.0
    assert sweep["max_output_throughput"] == max(r["output_throughput"] for r in record["runs"])
    assert sweep["its_output_throughput"] == record["runs"][1]["output_throughput"]


def _serve_record(label: str, throughputs: Sequence[float]) -> dict[str, Any]:
    runs = [
        {
            "request_rate": float(i + 1),
            "completed": 3,
            "output_throughput": x,
            "tpot_ms": {"median": 5.0 + i, "p99": 9.0 + i},
            "ttft_ms": {"median": 20.0 + i, "p99": 80.0 + i},
        }
        for i, x in enumerate(throughputs)
    ]
    return {
        "benchmark": "serve",
        "label": label,
        "model": "demo",
        "workload": "ONLINE-1000",
        "runs": runs,
        "goodput_targets_ms": {"tpot": 12.0},
    }


def test_bench_plot_overlays_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_serve_record("first", [100, 200, 250])))
    b.write_text(json.dumps(_serve_record("second", [120, 260])))
    png = tmp_path / "plots" / "x.png"
    assert cli.main(["bench", "plot", str(a), str(b), "--output", str(png), "--labels", "a", "b"]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC
    png.unlink()
    assert cli.main(["bench", "plot", str(a), "--output", str(png), "--title", "one"]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def _throughput_record(model: str) -> dict[str, Any]:
    rows = [{"steps": "prefill-carrying", "measured_steps": 20, "measured_seconds": 0.55, "floor_steps": 1,
             "floor_seconds": 0.24, "over_floor_seconds": 0.31},
            {"steps": "decode 1-32", "measured_steps": 99, "measured_seconds": 0.19, "floor_steps": 99,
             "floor_seconds": 0.09, "over_floor_seconds": 0.1},
            {"steps": "decode 33-64", "measured_steps": 0, "measured_seconds": 0.0, "floor_steps": 3,
             "floor_seconds": 0.01, "over_floor_seconds": -0.01}]
    return {"workload": "OFFLINE-256", "model": model, "floor_seconds": 0.34, "floor_fraction": 0.46,
            "offline": {"seconds": 0.74, "against_floor": rows}}


def test_bench_plot_draws_throughput_runs_against_the_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_throughput_record("qwen3-0.6b")))
    b.write_text(json.dumps(_throughput_record("llama3-8b")))
    png = tmp_path / "floor.png"
    assert cli.main(["bench", "plot", str(a), str(b), "--output", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_bench_plot_refuses_mixed_or_unplottable_throughput_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    serve, tput, cpu_run = tmp_path / "serve.json", tmp_path / "tput.json", tmp_path / "cpu.json"
    serve.write_text(json.dumps(_serve_record("g", [1.0])))
    tput.write_text(json.dumps(_throughput_record("m")))
    cpu_run.write_text(json.dumps({"workload": "OFFLINE-256", "model": "demo", "offline": {"seconds": 1.0}}))
    png = tmp_path / "x.png"
    cases = [
        ([str(serve), str(tput)], "not both"),
        ([str(tput), "--labels", "a"], "--labels names bench serve runs"),
        ([str(cpu_run)], "nor a bench throughput result set against the floor"),
    ]
    for args, message in cases:
        assert cli.main(["bench", "plot", *args, "--output", str(png)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("mini-vllm bench plot: error: ") and message in err and "Traceback" not in err
    assert not png.exists()


def test_bench_plot_bad_inputs_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, other, broken = tmp_path / "good.json", tmp_path / "other.json", tmp_path / "broken.json"
    good.write_text(json.dumps(_serve_record("g", [1.0])))
    other.write_text(json.dumps({"benchmark": "throughput", "runs": []}))
    broken.write_text("{")
    png = tmp_path / "x.png"
    cases = [
        ([str(other)], "is not a bench serve result"),
        ([str(broken)], "cannot read"),
        ([str(tmp_path / "missing.json")], "cannot read"),
        ([str(good), str(good), "--labels", "only-one"], "one --labels entry per file"),
        ([str(good), "--labels", "a", "b"], "one --labels entry per file"),
    ]
    for args, message in cases:
        assert cli.main(["bench", "plot", *args, "--output", str(png)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("mini-vllm bench plot: error: ") and message in err and "Traceback" not in err
    assert not png.exists()


# ---- configuration errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--burstiness", "0"], "--burstiness must be > 0"),
        (["--burstiness", "-1"], "--burstiness must be > 0"),
        (["--goodput", "foo:1"], "--goodput takes METRIC:MS"),
        (["--goodput", "ttft:fast"], "is not a number"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["--connections", "0"], "--connections must be >= 1"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
        (["--warmup-requests", "-1"], "--warmup-requests must be >= 0"),
        (["--dataset-max-tokens", "0"], "--dataset-max-tokens must be >= 1"),
        (["--no-ignore-eos"], "--no-ignore-eos needs --dataset"),
    ],
)
def test_config_errors_exit_2(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.json"
    assert cli.main(["bench", "serve", *flags, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mini-vllm bench serve: error: ") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("rate", ["0", "-2", "fast", "nan"])
def test_bad_request_rate_is_a_usage_error(rate: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "serve", "--request-rate", rate])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--request-rate" in err and ("a rate must be > 0" in err or "not a rate" in err)
    assert "Traceback" not in err


def test_unreachable_server_is_an_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{s.getsockname()[1]}"
        dataset = _write_dataset(tmp_path / "d.jsonl", DATASET[:1])
        code = cli.main(["bench", "serve", "--url", url, "--dataset", str(dataset), "--output", str(tmp_path / "x")])
    assert code == 1
    err = capsys.readouterr().err
    assert f"mini-vllm bench serve: error: cannot connect to {url}" in err and "Traceback" not in err
