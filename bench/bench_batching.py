"""Dynamic batching: 16 concurrent clients on the demo CNN, batched against unbatched server.

Two server processes serve the same `shapes` model with the same config, one with
`dynamic_batching` added. Each of 16 client threads (one channel each) sends batch-1 Predicts
back to back for a fixed time; throughput is requests per second over that time, and the mean
executed batch size comes from the server's own `xaid_batch_size` histogram (runs and rows
during the timed window), and the server's CPU time per request from its
`process_cpu_seconds_total`: on a CPU the server's own work per request, not the model run,
bounds the throughput. Targets: mean batch above 4, throughput at least 2x unbatched.

    .venv/bin/python bench/bench_batching.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnxruntime as ort
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    SHAPES,
    ServerProcess,
    free_port,
    machine,
    machine_markdown,
    measure,
    ms,
    ratio,
    table,
    times,
)
from xaid import Client
from xaid_server.runtime.providers import CPU
from xaid_server.settings import DEMO_MODELS

CLIENTS = 16
SECONDS = 6.0
WARMUP_S = 1.5
BATCHING = "dynamic_batching:\n  max_queue_delay_microseconds: 3000\n  preferred_batch_size: [8]\n"
TARGET_BATCH = 4.0
TARGET_SPEEDUP = 2.0


def repository(folder: Path, batching: bool) -> Path:
    """The demo `shapes` model with its config, plus `dynamic_batching` when asked."""
    shutil.copytree(DEMO_MODELS / SHAPES, folder / SHAPES)
    if batching:
        config = folder / SHAPES / "config.yaml"
        config.write_text(config.read_text(encoding="utf-8") + BATCHING, encoding="utf-8")
    return folder


def batch_counts(metrics_url: str) -> tuple[float, float, float]:
    """(runs, rows) so far of the model's executed-batch histogram, and the server's CPU
    seconds."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    found = {"count": 0.0, "sum": 0.0}
    cpu = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "process_cpu_seconds":
                cpu = sample.value
            if family.name == "xaid_batch_size" and sample.labels.get("model") == SHAPES:
                for key in found:
                    if sample.name.endswith("_" + key):
                        found[key] = sample.value
    return found["count"], found["sum"], cpu


def load(address: str, metrics_url: str, seconds: float) -> dict[str, Any]:
    """CLIENTS threads sending Predicts back to back; counts only the timed window."""
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
    stop = threading.Event()
    timing = threading.Event()
    done = [0] * CLIENTS
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with Client(address) as c:
                while not stop.is_set():
                    c.predict(SHAPES, x, top_k=1)
                    if timing.is_set():
                        done[index] += 1
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(WARMUP_S)
    runs0, rows0, cpu0 = batch_counts(metrics_url)
    timing.set()
    began = time.perf_counter()
    time.sleep(seconds)
    timing.clear()
    elapsed = time.perf_counter() - began
    runs1, rows1, cpu1 = batch_counts(metrics_url)
    stop.set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    runs, rows = runs1 - runs0, rows1 - rows0
    return {
        "requests": sum(done),
        "seconds": elapsed,
        "throughput_per_s": sum(done) / elapsed,
        "runs": runs,
        "mean_batch": ratio(rows, runs),
        "server_cpu_per_request_s": ratio(cpu1 - cpu0, sum(done)),
    }


def serve_and_load(folder: Path, batching: bool, seconds: float) -> dict[str, Any]:
    metrics_port = free_port()
    server = ServerProcess(
        repository(folder, batching), options=["--metrics-port", str(metrics_port)]
    )
    try:
        with Client(server.address) as c:
            provider = c.models()[0].execution_provider
        result = load(server.address, f"http://127.0.0.1:{metrics_port}/metrics", seconds)
    finally:
        server.stop()
    result["provider"] = provider
    return result


def ceiling(provider: str) -> float:
    """Plain onnxruntime rows/s at batch 16 over batch 1: what batching can gain at most."""
    path = str(DEMO_MODELS / SHAPES / "1" / "model.onnx")
    session = ort.InferenceSession(path, providers=list(dict.fromkeys((provider, CPU))))
    name = session.get_inputs()[0].name
    rows_per_s = []
    for batch in (1, CLIENTS):
        feeds = {name: np.zeros((batch, 3, 64, 64), dtype=np.float32)}
        stats = measure(partial(session.run, None, feeds), repeats=30)
        rows_per_s.append(batch / stats.median_s)
    return rows_per_s[1] / rows_per_s[0]


def run(*, seconds: float = SECONDS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="xaid-bench-") as tmp:
        unbatched = serve_and_load(Path(tmp) / "unbatched", False, seconds)
        batched = serve_and_load(Path(tmp) / "batched", True, seconds)
    speedup = ratio(batched["throughput_per_s"], unbatched["throughput_per_s"])
    return {
        "plain_batch16_over_batch1": ceiling(batched["provider"]),
        "clients": CLIENTS,
        "seconds": seconds,
        "config": BATCHING,
        "providers": sorted({unbatched["provider"], batched["provider"]}),
        "unbatched": unbatched,
        "batched": batched,
        "speedup": speedup,
        "targets": {
            "mean_batch": {"limit": TARGET_BATCH, "met": batched["mean_batch"] > TARGET_BATCH},
            "speedup": {"limit": TARGET_SPEEDUP, "met": speedup >= TARGET_SPEEDUP},
        },
    }


def report(results: dict[str, Any]) -> str:
    lines = [f"Dynamic batching, {results['clients']} concurrent clients, shapes, batch-1 Predict:"]
    for name in ("unbatched", "batched"):
        row = results[name]
        lines.append(
            f"  {name:<10} {row['throughput_per_s']:8.1f} req/s   "
            f"mean executed batch {row['mean_batch']:.2f} ({row['runs']:.0f} runs)   "
            f"server CPU {ms(row['server_cpu_per_request_s'])} per request"
        )
    lines.append(
        f"  batched / unbatched throughput {times(results['speedup'])}   (ceiling: plain "
        f"batch {CLIENTS} / batch 1 rows/s {times(results['plain_batch16_over_batch1'])})"
    )
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> list[str]:
    rows = [
        [
            name,
            f"{results[name]['throughput_per_s']:.1f}",
            f"{results[name]['mean_batch']:.2f}",
            f"{results[name]['requests']}",
            ms(results[name]["server_cpu_per_request_s"]),
        ]
        for name in ("unbatched", "batched")
    ]
    targets = results["targets"]
    verdict = {True: "met", False: "**missed**"}
    return [
        f"### Dynamic batching ({results['clients']} concurrent clients, `shapes`)",
        "",
        f"Each client sends batch-1 Predicts back to back for {results['seconds']:.0f} s; the "
        "mean executed batch comes from the server's `xaid_batch_size` histogram. Batched "
        "config: `max_queue_delay_microseconds: 3000`, `preferred_batch_size: [8]`. Ceiling: "
        "plain `session.run` rows/s at batch 16 over batch 1 in the bench's process, the most "
        "any batching can gain on this device's model runs. Server CPU per request: the "
        "server process's CPU seconds (its `process_cpu_seconds_total`) over the window's "
        "requests; the clients run in the bench's process on the same cores.",
        "",
        *table(
            ["server", "requests/s", "mean executed batch", "requests", "server CPU per request"],
            rows,
        ),
        "",
        f"- mean executed batch {results['batched']['mean_batch']:.2f} (target > "
        f"{TARGET_BATCH:g}): {verdict[targets['mean_batch']['met']]}",
        f"- throughput batched / unbatched {times(results['speedup'])} (target >= "
        f"{TARGET_SPEEDUP:g}x): {verdict[targets['speedup']['met']]}; ceiling on this device "
        f"{times(results['plain_batch16_over_batch1'])}",
    ]


def main() -> int:
    results = run()
    print("\n".join(machine_markdown(machine(results["providers"]))))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
