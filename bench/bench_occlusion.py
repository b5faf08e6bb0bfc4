"""Occlusion of one 64x64 input (window 8x8, stride 4: 225 windows) against its floor and Captum.

- xaid: the client's `explain` over gRPC to `python -m xaid_server` in its own process, end to
  end, as a caller on the same host sees it.
- floor: N / peak batched throughput of plain `session.run` (batch 64, inputs built beforehand),
  with the server's providers and session options: what N forward passes cost at best here.
- Captum: `Occlusion` on the torch small ResNet, perturbations_per_eval 64, torch limited to the
  same cores.

All three are timed in the same rounds, interleaved, so drift on a noisy machine hits each alike,
and one after the other, so the bench's sessions never compete with the server for the cores.
Each is timed right after an untimed call of its own (see AFTER_IDLE): a steady state, as the
floor is, since otherwise the server process alone would start every call from a round idle.
Three more timings in this process split xaid's time, on the same file loaded through the
server's loader and session factory: plain `session.run` over the server's chunks of copies
built beforehand, the occlusion evaluation graph (built as the server builds it) alone in those
chunks, and the graph after a batch-1 forward on the model's session, as the server runs them.
The server also reports its own total and compute seconds in every answer.

    .venv/bin/python bench/bench_occlusion.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnx
import onnxruntime as ort

from bench.common import (
    SETTLE_S,
    SMALL_RESNET,
    Stats,
    captum_available,
    cores,
    local_model,
    machine,
    machine_markdown,
    model_repository,
    ms,
    ratio,
    served_providers,
    serving,
    table,
    times,
)
from xaid import Client, Explanation
from xaid_server.graphs.occlusion import (
    BASELINE,
    STARTS,
    TARGET,
    WINDOW,
    X,
    build_occlusion_graph,
)
from xaid_server.runtime.model import LoadedModel
from xaid_server.runtime.runner import BatchRunner

WINDOW_HW = (8, 8)
STRIDE_HW = (4, 4)
BASELINE_VALUE = 0.0
PEAK_BATCH = 64
PEAK_RUNS = 4  # batch-64 runs timed per round
#: Each contender is timed twice a round: first after the round's other work (its threads and
#: caches, and for xaid the whole server process, idle since the last round), then right
#: after that call. The second is the headline, a steady state like the floor's; the first is
#: kept under this suffix, since a caller after a quiet spell sees it.
AFTER_IDLE = "_after_idle"
ROUNDS = 9
CAPTUM_PPE = 64
SEED = 0
#: Acceptance targets: xaid end to end over gRPC against the floor and against Captum.
TARGET_FLOOR = 1.3
TARGET_CAPTUM = 0.4
#: onnxruntime against torch: attributions are differences of logits of both.
RTOL = 1e-3
ATOL = 1e-4


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Window starts along one dimension as the server places them: the last flush with the end."""
    starts = np.arange(0, size - window + 1, stride, dtype=np.int64)
    if starts[-1] + window < size:
        starts = np.append(starts, size - window)
    return starts


def occlusion_starts(height: int, width: int) -> np.ndarray:
    """[N, 2] window starts over (H, W), row-major, as the server enumerates them."""
    rows = window_starts(height, WINDOW_HW[0], STRIDE_HW[0])
    cols = window_starts(width, WINDOW_HW[1], STRIDE_HW[1])
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)


def occluded_copies(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """[N, C, H, W]: one copy of `x` per window, the window filled with the baseline."""
    copies = np.repeat(x, len(starts), axis=0)
    h, w = WINDOW_HW
    for copy, (top, left) in zip(copies, starts, strict=True):
        copy[:, top : top + h, left : left + w] = BASELINE_VALUE
    return copies


class Case:
    """One model's timed callables and the fixed inputs they share.

    `model` is the served model loaded again in this process: its session and the occlusion
    graph's are configured as the server's, but idle while the server computes.
    """

    def __init__(self, client: Client, model: LoadedModel, runner: BatchRunner) -> None:
        self.name = model.name
        self.client = client
        self.model = model
        self.session = model.session
        self.graph = _occlusion_session(model)
        self.input_name = model.input.name
        _, channels, height, width = model.input.shape
        rng = np.random.default_rng(SEED)
        self.x = rng.standard_normal((1, channels, height, width), dtype=np.float32)
        self.peak_batch = rng.standard_normal((PEAK_BATCH, channels, height, width), np.float32)
        self.starts = occlusion_starts(height, width)
        self.copies = occluded_copies(self.x, self.starts)
        self.chunk = runner.balanced_chunk(
            len(self.starts), model.config.max_batch_size, self.x[0].nbytes
        )
        self.first = self.explain()
        self.target = int(self.first.target.class_indices[0])
        self.timing = self.first.timing

    @property
    def evaluations(self) -> int:
        return len(self.starts)

    def explain(self) -> Explanation:
        return self.client.explain(
            self.name,
            self.x,
            "occlusion",
            window=WINDOW_HW,
            stride=STRIDE_HW,
            baseline=BASELINE_VALUE,
        )

    def xaid(self) -> None:
        """`explain`, keeping the server's own account of the call for the split."""
        self.timing = self.explain().timing

    def peak(self) -> None:
        self.session.run(None, {self.input_name: self.peak_batch})

    def plain_chunked(self) -> None:
        """The server's schedule on copies built beforehand, one session: a forward, N in chunks."""
        self.session.run(None, {self.input_name: self.x})
        for start in range(0, self.evaluations, self.chunk):
            self.session.run(None, {self.input_name: self.copies[start : start + self.chunk]})

    def graph_alone(self) -> None:
        """The server's occlusion graph over the server's chunks, nothing else."""
        fixed = {
            X: self.x,
            WINDOW: np.asarray(WINDOW_HW, dtype=np.int64),
            BASELINE: np.asarray(BASELINE_VALUE, dtype=np.float32),
            TARGET: np.asarray(self.target, dtype=np.int64),
        }
        for start in range(0, self.evaluations, self.chunk):
            self.graph.run(None, {STARTS: self.starts[start : start + self.chunk], **fixed})

    def graph_after_forward(self) -> None:
        """What the server computes: a forward on the model's session, then the graph's chunks.

        Two sessions, each with its own intra-op thread pool, one right after the other.
        """
        self.session.run(None, {self.input_name: self.x})
        self.graph_alone()


def _occlusion_session(model: LoadedModel) -> ort.InferenceSession:
    """The occlusion graph for the model's output, built and cached as the server does at load.

    `evaluation_graph` composes the model's bytes with `build_occlusion_graph` and opens the
    result with the model's `SessionFactory`, under the key the occlusion explainer uses.
    """
    output = model.config.output

    def build(proto: onnx.ModelProto) -> onnx.ModelProto:
        return build_occlusion_graph(proto, model.input.name, output)

    return model.evaluation_graph(f"occlusion:{output}", build)


class CaptumCase:
    """Captum's `Occlusion` on the torch network the small ResNet's ONNX file was exported from."""

    def __init__(self, x: np.ndarray, target: int) -> None:
        import torch
        from captum.attr import Occlusion

        from bench import small_resnet

        self.torch = torch
        self.occlusion = Occlusion(small_resnet.build())
        self.x = torch.from_numpy(x)
        self.target = target

    def attribute(self) -> np.ndarray:
        with self.torch.no_grad():
            result = self.occlusion.attribute(
                self.x,
                sliding_window_shapes=(self.x.shape[1], *WINDOW_HW),
                strides=(self.x.shape[1], *STRIDE_HW),
                baselines=BASELINE_VALUE,
                target=self.target,
                perturbations_per_eval=CAPTUM_PPE,
            )
        return np.asarray(result.numpy())


def _duration(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def run(repository: Path, *, rounds: int = ROUNDS) -> dict[str, Any]:
    """Every model in the repository: xaid, floor and (small ResNet) Captum, interleaved."""
    if captum_available():
        import torch

        torch.set_num_threads(cores())
    with serving(repository) as (server, client):
        infos = client.models()
        runner = BatchRunner(server.settings.max_chunk_bytes)
        rows = []
        for info in infos:  # one model at a time: only its sessions are loaded beside the server
            model = local_model(repository, info, server.settings)
            rows.append(_bench_model(Case(client, model, runner), rounds))
        return {
            "window": list(WINDOW_HW),
            "stride": list(STRIDE_HW),
            "baseline": BASELINE_VALUE,
            "peak_batch": PEAK_BATCH,
            "captum_perturbations_per_eval": CAPTUM_PPE,
            "rounds": rounds,
            "settle_s": SETTLE_S,
            "torch_threads": cores() if captum_available() else None,
            "server": {
                "process": "own",
                "intra_op_threads": server.settings.intra_op_threads,
                "workers": server.settings.workers,
                "max_chunk_bytes": server.settings.max_chunk_bytes,
            },
            "targets": {"xaid_over_floor": TARGET_FLOOR, "xaid_over_captum": TARGET_CAPTUM},
            "providers": served_providers(infos),
            "models": rows,
        }


def _bench_model(case: Case, rounds: int) -> dict[str, Any]:
    name = case.name
    reference = name == SMALL_RESNET  # the model of the reference figures the targets refer to
    captum: CaptumCase | None = None
    skipped = ""
    if name != SMALL_RESNET:
        skipped = "no torch twin of this model"
    elif not captum_available():
        skipped = "torch or captum is not installed"
    else:
        captum = CaptumCase(case.x, case.target)
    timed: dict[str, Callable[[], object]] = {
        "xaid": case.xaid,
        "plain_chunked": case.plain_chunked,
        "graph_alone": case.graph_alone,
        "graph_after_forward": case.graph_after_forward,
    }
    if captum is not None:
        timed["captum"] = captum.attribute
    for fn in [case.peak, case.peak, *timed.values()]:  # warm-up round, untimed
        fn()
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        time.sleep(SETTLE_S)
        for run in range(PEAK_RUNS + 1):  # back to back, the first one untimed: the best case
            duration = _duration(case.peak)
            if run:
                samples["peak"].append(duration)
        for key, fn in timed.items():
            for suffix in (AFTER_IDLE, ""):  # after a round of other work, then right after itself
                time.sleep(SETTLE_S)
                samples[key + suffix].append(_duration(fn))
                if key == "xaid":
                    samples["server_total" + suffix].append(case.timing.total_seconds)
                    samples["server_compute" + suffix].append(case.timing.compute_seconds)
    stats = {key: Stats.of(values) for key, values in samples.items()}
    throughput = PEAK_BATCH / stats["peak"].median_s
    floor = case.evaluations / throughput
    xaid = stats["xaid"].median_s
    row: dict[str, Any] = {
        "model": name,
        "input_shape": list(case.x.shape),
        "evaluations": case.evaluations,
        "server_evaluations": case.first.model_evaluations,
        "response_bytes": case.first.response.ByteSize(),
        "chunk": case.chunk,
        "target_class": case.target,
        "peak_throughput_per_s": throughput,
        "floor_s": floor,
        "timings": {key: value.as_dict() for key, value in stats.items()},
        "ratios": {
            "xaid_over_floor": ratio(xaid, floor),
            "server_total_over_floor": ratio(stats["server_total"].median_s, floor),
            "server_compute_over_floor": ratio(stats["server_compute"].median_s, floor),
            "plain_chunked_over_floor": ratio(stats["plain_chunked"].median_s, floor),
            "graph_alone_over_floor": ratio(stats["graph_alone"].median_s, floor),
            "graph_after_forward_over_floor": ratio(stats["graph_after_forward"].median_s, floor),
        },
        # the targets are set on the reference model; the demo models' ratios are information
        "targets": {
            "xaid_over_floor": {"limit": TARGET_FLOOR, "met": xaid / floor <= TARGET_FLOOR},
        }
        if reference
        else {},
        "captum_skipped": skipped or None,
    }
    if captum is not None:
        expected = captum.attribute()
        got = case.first.attribution
        diff = float(np.abs(got - expected).max())
        row["ratios"]["xaid_over_captum"] = ratio(xaid, stats["captum"].median_s)
        row["ratios"]["captum_over_floor"] = ratio(stats["captum"].median_s, floor)
        row["targets"]["xaid_over_captum"] = {
            "limit": TARGET_CAPTUM,
            "met": row["ratios"]["xaid_over_captum"] <= TARGET_CAPTUM,
        }
        row["equals_captum"] = {
            "max_abs_diff": diff,
            "max_abs_attribution": float(np.abs(expected).max()),
            "rtol": RTOL,
            "atol": ATOL,
            "allclose": bool(np.allclose(got, expected, rtol=RTOL, atol=ATOL)),
        }
    return row


def report(results: dict[str, Any]) -> str:
    """The headline ratios and the breakdown, for the console."""
    lines = [
        f"Occlusion, window {results['window']} stride {results['stride']}, "
        f"median of {results['rounds']} interleaved rounds:"
    ]
    for row in results["models"]:
        t, r = row["timings"], row["ratios"]
        lines.append(
            f"  {row['model']} ({row['evaluations']} windows): xaid {ms(t['xaid']['median_s'])}  "
            f"floor {ms(row['floor_s'])} ({row['peak_throughput_per_s']:.0f} img/s at batch "
            f"{results['peak_batch']})  xaid/floor {times(r['xaid_over_floor'])}"
        )
        if "captum" in t:
            check = row["equals_captum"]
            lines.append(
                f"    Captum {ms(t['captum']['median_s'])}  xaid/captum "
                f"{times(r['xaid_over_captum'])}  captum/floor {times(r['captum_over_floor'])}  "
                f"equals Captum: {check['allclose']} (max abs diff {check['max_abs_diff']:.2e})"
            )
        else:
            lines.append(f"    Captum skipped: {row['captum_skipped']}")
        lines.append(
            "    split: "
            + ", ".join(f"{label} {ms(t[key]['median_s'])}" for key, label in SPLIT[1:])
        )
        lines.append(
            "    first call of a round: "
            + ", ".join(
                f"{label} {ms(t[key + AFTER_IDLE]['median_s'])}"
                for key, label in IDLE_SPLIT
                if key + AFTER_IDLE in t
            )
        )
        for key, target in row["targets"].items():
            verdict = "met" if target["met"] else "MISSED"
            lines.append(f"    target {key} <= {target['limit']}: {verdict}")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> list[str]:
    headline = []
    split = []
    idle = []
    for row in results["models"]:
        t, r = row["timings"], row["ratios"]
        captum = "captum" in t
        headline.append(
            [
                f"`{row['model']}`",
                str(row["evaluations"]),
                ms(t["xaid"]["median_s"]),
                ms(row["floor_s"]),
                ms(t["captum"]["median_s"]) if captum else "-",
                _verdict(r["xaid_over_floor"], TARGET_FLOOR)
                if row["targets"]
                else times(r["xaid_over_floor"]),
                _verdict(r["xaid_over_captum"], TARGET_CAPTUM) if captum else "-",
                (
                    f"{row['equals_captum']['allclose']} "
                    f"({row['equals_captum']['max_abs_diff']:.1e})"
                    if captum
                    else "-"
                ),
            ]
        )
        split.append(
            [f"`{row['model']}`", f"{ms(row['floor_s'])} (1.00x)"]
            + [_of_floor(t[key]["median_s"], row["floor_s"]) for key, _ in SPLIT[1:]]
        )
        idle.append(
            [f"`{row['model']}`"]
            + [
                _of_floor(t[key + AFTER_IDLE]["median_s"], row["floor_s"])
                if key + AFTER_IDLE in t
                else "-"
                for key, _ in IDLE_SPLIT
            ]
        )
    server = results["server"]
    sizes = ", ".join(
        f"`{row['model']}` {row['response_bytes'] / 1e3:.1f} kB" for row in results["models"]
    )
    return [
        f"### Occlusion, one 64x64 input, window {results['window']}, stride "
        f"{results['stride']}, baseline {results['baseline']}",
        "",
        f"Median of {results['rounds']} interleaved rounds; in each, every contender is timed "
        f"right after an untimed call of its own, {results['settle_s'] * 1e3:.0f} ms after "
        "it, a steady state like the floor's. xaid: the client's `explain` over gRPC to "
        "`python -m xaid_server` running in its own process, end to end. Floor: "
        f"N / peak throughput of plain `session.run` at batch {results['peak_batch']} in the "
        "bench's process (inputs built beforehand; the model file loaded through the server's "
        "loader and session factory, so the same providers, threads and session options). "
        f"Captum: `Occlusion`, perturbations_per_eval {results['captum_perturbations_per_eval']}, "
        f"torch on {results['torch_threads']} threads. Targets, on `{SMALL_RESNET}` (the "
        "reference figures' architecture; the demo `shapes` model has a quarter of its compute, "
        f"so fixed per-call costs weigh four times more): xaid/floor <= {TARGET_FLOOR}, "
        f"xaid/Captum <= {TARGET_CAPTUM}.",
        "",
        *table(
            [
                "model",
                "windows",
                "xaid",
                "floor",
                "Captum",
                "xaid/floor",
                "xaid/Captum",
                "equals Captum (max abs diff)",
            ],
            headline,
        ),
        "",
        "Where xaid's time goes: each column adds one thing to the one before it (ratio to "
        "the floor). The floor and the next three run in the bench's process while the server "
        "is idle: plain `session.run` on the server's chunk schedule (copies built beforehand, one "
        "session); the occlusion evaluation graph, built as the server builds it, alone in "
        "those chunks; the same after a batch-1 forward on the model's own session, as the "
        "server computes it (two sessions, two intra-op thread pools). Then the server's "
        "compute and total seconds as it reports them, and the client's wall time over gRPC "
        "(server in its own process), which adds the request and the response "
        f"({sizes}) crossing gRPC. Server: "
        f"intra_op_threads {server['intra_op_threads']} (0 = all cores), workers "
        f"{server['workers']}; chunks: equal, at most max_batch_size.",
        "",
        *table(["model", *(label for _, label in SPLIT)], split),
        "",
        "The untimed call before each timed one, timed apart: the first call of a round, "
        "after the round's other work, when the contender's threads and caches (for xaid the "
        "whole server process) sat idle for the round (ratio to the floor).",
        "",
        *table(["model", *(label for _, label in IDLE_SPLIT)], idle),
    ]


def _of_floor(seconds: float, floor: float) -> str:
    return f"{ms(seconds)} ({times(seconds / floor)})"


#: The split of xaid's time, in the order each step adds to the one before.
SPLIT = (
    ("floor", "floor"),
    ("plain_chunked", "plain, chunked"),
    ("graph_alone", "graph alone"),
    ("graph_after_forward", "forward + graph"),
    ("server_compute", "server compute"),
    ("server_total", "server total"),
    ("xaid", "client (gRPC)"),
)


#: The first call of a round, after the round's other work: the contenders and the split.
IDLE_SPLIT = (
    ("graph_after_forward", "forward + graph"),
    ("server_compute", "server compute"),
    ("server_total", "server total"),
    ("xaid", "client (gRPC)"),
    ("captum", "Captum"),
)


def _verdict(value: float, limit: float) -> str:
    return f"{times(value)} ({'met' if value <= limit else 'missed'})"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xaid-bench-") as tmp:
        repository = model_repository(Path(tmp))
        results = run(repository)
    print("\n".join(machine_markdown(machine(results["providers"]))))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
