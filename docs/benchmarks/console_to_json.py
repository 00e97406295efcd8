"""Rebuild bench serve records from the tables a run printed, for runs whose JSON was lost.

Only the printed fields are filled in (medians and p99s, throughput, goodput, loop-lag p99); the
record says so in ``source``. Usage: python docs/benchmarks/console_to_json.py CONSOLE.txt TEMPLATE.json
(TEMPLATE: a JSON of the same session, for versions, GPU and date).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HEADER = re.compile(r"^(?P<label>\S+): (?P<workload>\S+) on (?P<gpu>.+), latencies in ms, burstiness (?P<b>[\d.]+)$")
NAMES = {"qwen3-0.6b": "serve-sweep-qwen3-0.6b-20261129.json",
         "no-chunked-prefill": "serve-knob-qwen3-0.6b-no-chunked-prefill-20261129.json"}


def number(text: str) -> float | None:
    return None if text == "-" else float(text.replace(",", ""))


def main(console: Path, template: Path) -> None:
    base = json.loads(template.read_text())
    record: dict | None = None
    for line in console.read_text().splitlines():
        if m := HEADER.match(line):
            record = {
                "benchmark": "serve", "label": m["label"], "model": "qwen3-0.6b", "workload": m["workload"],
                "gpu": m["gpu"], "burstiness": float(m["b"]), "date": base["date"][:10],
                "versions": base["versions"], "goodput_targets_ms": base["goodput_targets_ms"],
                "command": "bash docs/benchmarks/run_h200_serve.sh OUT qwen knobs (see the console file)",
                "source": f"rebuilt from the printed table in {console.name}; the run's JSON was lost",
                "runs": [],
            }
        elif record is not None and (cells := line.split()) and re.fullmatch(r"[\d.]+|inf", cells[0]):
            done, total = cells[1].split("/")
            v = [number(c) for c in cells[2:]]
            record["runs"].append({
                "request_rate": None if cells[0] == "inf" else float(cells[0]),
                "num_requests": int(total), "completed": int(done), "failed": int(total) - int(done),
                "request_throughput": v[0], "output_throughput": v[1],
                "ttft_ms": {"median": v[2], "p99": v[3]}, "tpot_ms": {"median": v[4], "p99": v[5]},
                "itl_ms": {"p99": v[6]}, "e2el_ms": {"median": v[7], "p99": v[8]}, "goodput": v[9],
                "server": {"loop_lag_ms": {"p99_ms": v[10]}},
            })
        elif record is not None and line.startswith("max output throughput"):
            Path(template.parent, NAMES[record["label"]]).write_text(json.dumps(record, indent=1) + "\n")
            record = None


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
