"""Gradient graphs: their cost against the forward pass, and saliency / IG-50 against Captum.

- graph / forward: one run of the gradient graph (`xaid gradgraph`'s output, in the server's
  session factory) over one run of the plain model, batch 1 and 32, for each demo model and
  the small ResNet, in this process.
- saliency and integrated gradients (50 Gauss-Legendre steps) of one 64x64 input of the small
  ResNet: the client's `explain` over gRPC to `python -m xaid_server` in its own process, end
  to end, against Captum's `Saliency` and `IntegratedGradients` (same steps and method) on the
  torch network the ONNX file was exported from, torch limited to the same cores. Targets:
  xaid <= 0.5x Captum. Both are timed in the same rounds, interleaved, each right after an
  untimed call of its own that follows a pause (the median over the rounds).

    .venv/bin/python bench/bench_gradients.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.common import (
    SETTLE_S,
    SMALL_RESNET,
    Stats,
    captum_available,
    cores,
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
from xaid_server.explainers.gradients import gradient_session
from xaid_server.graphs.gradient import TARGET
from xaid_server.model_config import load_config
from xaid_server.runtime.model import LoadedModel, SessionFactory, example_input, load_model
from xaid_server.runtime.providers import CPU
from xaid_server.settings import DEMO_MODELS

BATCHES = (1, 32)
REPEATS = 20
ROUNDS = 15
IG_STEPS = 50
SEED = 0
#: Acceptance targets: xaid end to end over gRPC against Captum on the same network.
TARGET_CAPTUM = 0.5
#: onnxruntime float32 against torch float32: gradients of the same network.
RTOL, ATOL = 1e-3, 1e-4


def graph_over_forward(model: LoadedModel, repeats: int) -> dict[str, Any]:
    """Median times of the forward and of the gradient graph at each batch size, and the ratio."""
    graph = gradient_session(model, model.config.output)
    rows: dict[str, Any] = {}
    for batch in BATCHES:
        x = example_input(model.input, batch)
        x[:] = np.random.default_rng(SEED).standard_normal(x.shape)
        feeds = {model.input.name: x}
        graph_feeds = {**feeds, TARGET: np.zeros(batch, np.int64)}
        forward = measure(partial(model.session.run, None, feeds), repeats=repeats)
        gradient = measure(partial(graph.run, None, graph_feeds), repeats=repeats)
        rows[str(batch)] = {
            "forward": forward.as_dict(),
            "gradient_graph": gradient.as_dict(),
            "ratio": ratio(gradient.median_s, forward.median_s),
        }
    return {"model": model.name, "batches": rows}


def demo_model(name: str, factory: SessionFactory) -> LoadedModel:
    folder = DEMO_MODELS / name
    return load_model(
        name, "1", folder / "1" / "model.onnx", load_config(folder / "config.yaml"), factory
    )


class CaptumCase:
    """Captum's Saliency and IntegratedGradients on the small ResNet's torch network."""

    def __init__(self, x: np.ndarray, target: int) -> None:
        import torch
        from captum.attr import IntegratedGradients, Saliency

        from bench import small_resnet

        net = small_resnet.build()
        self.saliency = Saliency(net)
        self.ig = IntegratedGradients(net)
        self.x = torch.from_numpy(x)
        self.target = target

    def run_saliency(self) -> np.ndarray:
        result = self.saliency.attribute(self.x, target=self.target, abs=False)
        return np.asarray(result.detach().numpy())

    def run_ig(self) -> np.ndarray:
        result = self.ig.attribute(
            self.x, target=self.target, n_steps=IG_STEPS, method="gausslegendre"
        )
        return np.asarray(result.detach().numpy())


def grpc_versus_captum(client: Client, x: np.ndarray, rounds: int) -> dict[str, Any]:
    def saliency() -> np.ndarray:
        return client.explain(SMALL_RESNET, x, "saliency").attribution

    def ig() -> np.ndarray:
        explanation = client.explain(SMALL_RESNET, x, "integrated_gradients", n_steps=IG_STEPS)
        return explanation.attribution

    first = client.explain(SMALL_RESNET, x, "saliency")
    target = int(first.target.class_indices[0])
    timed: dict[str, Callable[[], object]] = {"xaid_saliency": saliency, "xaid_ig": ig}
    row: dict[str, Any] = {"model": SMALL_RESNET, "target": target, "ratios": {}, "targets": {}}
    captum: CaptumCase | None = CaptumCase(x, target) if captum_available() else None
    if captum is not None:
        timed["captum_saliency"] = captum.run_saliency
        timed["captum_ig"] = captum.run_ig
    samples: dict[str, list[float]] = defaultdict(list)
    for fn in timed.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in timed.items():
            # the other contender's threads fall quiet, then an untimed call of its own wakes
            # this one's threads and vCPUs: a pause before the timed call would cost xaid's
            # several threads in two processes more than torch's (+7 ms after 50 ms here)
            time.sleep(SETTLE_S)
            fn()
            samples[name].append(measure(fn, repeats=1, warmup=0).median_s)
    stats = {name: Stats.of(values) for name, values in samples.items()}
    row["stats"] = {name: s.as_dict() for name, s in stats.items()}
    if captum is None:
        row["captum_skipped"] = "torch or captum is not installed"
        return row
    for method, xaid_fn, captum_fn in (
        ("saliency", saliency, captum.run_saliency),
        ("ig", ig, captum.run_ig),
    ):
        key = f"{method}_xaid_over_captum"
        row["ratios"][key] = ratio(
            stats[f"xaid_{method}"].median_s, stats[f"captum_{method}"].median_s
        )
        row["targets"][key] = {"limit": TARGET_CAPTUM, "met": row["ratios"][key] <= TARGET_CAPTUM}
        row[f"{method}_equals_captum"] = bool(
            np.allclose(xaid_fn(), captum_fn(), rtol=RTOL, atol=ATOL)
        )
    return row


def run(repository: Path, *, rounds: int = ROUNDS, repeats: int = REPEATS) -> dict[str, Any]:
    """Both parts; the gRPC part serves `repository` (the shapes model and the small ResNet)."""
    if captum_available():
        import torch

        torch.set_num_threads(cores())
    x = np.random.default_rng(SEED).standard_normal((1, 3, 64, 64), dtype=np.float32)
    with serving(repository) as (server, client):
        infos = client.models()
        providers = served_providers(infos)
        grpc_row = (
            grpc_versus_captum(client, x, rounds)
            if any(i.name == SMALL_RESNET for i in infos)
            else None
        )
        factory = SessionFactory(
            tuple(dict.fromkeys((*providers, CPU))), server.settings.intra_op_threads
        )
        models = [demo_model(name, factory) for name in ("shapes", "tabular")]
        models += [
            local_model(repository, i, server.settings) for i in infos if i.name == SMALL_RESNET
        ]
    return {
        "providers": providers,
        "repeats": repeats,
        "rounds": rounds,
        "ig_steps": IG_STEPS,
        "graph_over_forward": [graph_over_forward(m, repeats) for m in models],
        "grpc_versus_captum": grpc_row,
    }


def markdown(results: dict[str, Any]) -> list[str]:
    lines = ["### Gradient graph against the forward pass (median, in-process)", ""]
    rows = []
    for entry in results["graph_over_forward"]:
        for batch, row in entry["batches"].items():
            rows.append(
                [
                    entry["model"],
                    batch,
                    ms(row["forward"]["median_s"]),
                    ms(row["gradient_graph"]["median_s"]),
                    times(row["ratio"]),
                ]
            )
    lines += table(["model", "batch", "forward", "gradient graph", "graph / forward"], rows)
    row = results["grpc_versus_captum"]
    if row is None:
        return lines
    lines += ["", f"### Saliency and IG-{results['ig_steps']} through gRPC against Captum", ""]
    stats = row["stats"]
    cells = []
    for method in ("saliency", "ig"):
        captum = stats.get(f"captum_{method}")
        key = f"{method}_xaid_over_captum"
        cells.append(
            [
                method,
                ms(stats[f"xaid_{method}"]["median_s"]),
                ms(captum["median_s"]) if captum else "-",
                times(row["ratios"][key]) if key in row["ratios"] else "-",
                f"<= {TARGET_CAPTUM}",
                str(row.get(f"{method}_equals_captum", "-")),
            ]
        )
    lines += table(
        ["method", "xaid (gRPC)", "Captum", "xaid / Captum", "target", "equals Captum"], cells
    )
    return lines


def report(results: dict[str, Any]) -> str:
    return "\n".join(markdown(results))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="xaid-bench-") as tmp:
        results = run(model_repository(Path(tmp)))
    print("\n".join(machine_markdown(machine(results["providers"]))))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
