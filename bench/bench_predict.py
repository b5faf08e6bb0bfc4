"""Predict latency at batch 1: the xaid client over gRPC against `session.run` in this process.

The server runs in its own process, as users run it. Both sides run the same ONNX file with the
server's providers and session options (the bench loads it through the server's loader), so the
ratio is what the server adds to one model run: gRPC, tensor (de)coding, input checks, the
thread-pool hop and top-k. Calls are sequential (one in flight), which is the latency a single
caller sees; the plain runs are timed apart from the xaid calls, never beside them.

    .venv/bin/python bench/bench_predict.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import (
    Stats,
    local_model,
    machine,
    machine_markdown,
    measure,
    model_repository,
    ms,
    ratio,
    served_providers,
    serving,
    table,
    times,
)
from xaid import Client
from xaid_server.runtime.model import LoadedModel

CALLS = 500
WARMUP = 50
SEED = 0


def run(repository: Path, *, calls: int = CALLS) -> dict[str, Any]:
    """Median and p99 of `calls` sequential batch-1 Predicts, xaid and plain, per model."""
    with serving(repository) as (server, client):
        infos = client.models()
        rows = [
            _bench_model(client, local_model(repository, info, server.settings), calls)
            for info in infos
        ]
        return {"batch": 1, "calls": calls, "providers": served_providers(infos), "models": rows}


def _bench_model(client: Client, model: LoadedModel, calls: int) -> dict[str, Any]:
    name, session = model.name, model.session
    spec = session.get_inputs()[0]
    shape = [1, *(d if isinstance(d, int) else 1 for d in spec.shape[1:])]
    x = np.random.default_rng(SEED).standard_normal(shape, dtype=np.float32)
    feeds = {spec.name: x}
    expected = np.asarray(session.run(None, feeds)[0])
    got = client.predict(name, x).outputs[session.get_outputs()[0].name]
    max_diff = float(np.abs(got - expected).max())
    plain = measure(lambda: session.run(None, feeds), repeats=calls, warmup=WARMUP)
    xaid = measure(lambda: client.predict(name, x), repeats=calls, warmup=WARMUP)
    return _row(name, xaid, plain, max_diff)


def _row(name: str, xaid: Stats, plain: Stats, max_diff: float) -> dict[str, Any]:
    return {
        "model": name,
        "xaid": xaid.as_dict(),
        "plain": plain.as_dict(),
        "ratio_median": ratio(xaid.median_s, plain.median_s),
        "ratio_p99": ratio(xaid.p99_s, plain.p99_s),
        "overhead_median_s": xaid.median_s - plain.median_s,
        "overhead_p99_s": xaid.p99_s - plain.p99_s,
        "outputs_max_abs_diff": max_diff,
    }


def report(results: dict[str, Any]) -> str:
    """One line per model for the console."""
    lines = [f"Predict, batch 1, {results['calls']} sequential calls (median / p99):"]
    for row in results["models"]:
        xaid, plain = row["xaid"], row["plain"]
        lines.append(
            f"  {row['model']:<13} xaid {ms(xaid['median_s'])} / {ms(xaid['p99_s'])}   "
            f"plain {ms(plain['median_s'])} / {ms(plain['p99_s'])}   "
            f"xaid/plain {times(row['ratio_median'])} / {times(row['ratio_p99'])}"
        )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"`{row['model']}`",
            ms(row["xaid"]["median_s"]),
            ms(row["xaid"]["p99_s"]),
            ms(row["plain"]["median_s"]),
            ms(row["plain"]["p99_s"]),
            times(row["ratio_median"]),
            times(row["ratio_p99"]),
            ms(row["overhead_median_s"]),
            ms(row["overhead_p99_s"]),
        ]
        for row in results["models"]
    ]
    header = [
        "model",
        "xaid median",
        "xaid p99",
        "plain median",
        "plain p99",
        "xaid/plain median",
        "xaid/plain p99",
        "added per call (median)",
        "added per call (p99)",
    ]
    return [
        f"### Predict, batch 1 ({results['calls']} sequential calls)",
        "",
        "xaid: the Python client's `predict` (raw tensor) over gRPC to the server in its own "
        "process; plain: `session.run` in the bench's process on the same file, loaded through "
        "the server's loader (same providers and session options).",
        "",
        *table(header, rows),
    ]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xaid-bench-") as tmp:
        repository = model_repository(Path(tmp))
        results = run(repository)
    print("\n".join(machine_markdown(machine(results["providers"]))))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
