"""Run every benchmark once and write bench/results/<device>-<cores>core.{json,md}.

    make bench        (= .venv/bin/python bench/run_all.py)

The results name the machine (CPU model, cores, library versions, providers, date) and record
how busy the machine was with other work before and after, because on a shared host that, not
xaid, is the usual cause of a bad number. A few minutes at most on two cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bench_batching, bench_gradients, bench_lime, bench_occlusion, bench_predict
from bench.bench_occlusion import ROUNDS
from bench.bench_predict import CALLS
from bench.common import (
    RESULTS,
    ROOT,
    OthersWatch,
    busy_share,
    cores,
    machine,
    machine_markdown,
    model_repository,
    times,
    write_json,
)

#: Above this share of the cores busy with other work, a run is flagged as disturbed.
BUSY_WARNING = 0.10
#: The 2-core CPU reference figures, when the shared checkout is next to this one.
REFERENCE = ROOT.parent / "shared" / "reference" / "cpu-anchors-2core.json"


def wait_quiet(limit_s: float) -> float | None:
    """Wait (up to `limit_s`) until other work uses under BUSY_WARNING of the cores.

    Returns the last busy share seen. Two-thread kernels slow down badly when one of their
    threads is descheduled, so a busy neighbour skews every ratio, not only absolute times.
    """
    deadline = time.monotonic() + limit_s
    while True:
        busy = busy_share()
        if busy is None or busy <= BUSY_WARNING or time.monotonic() >= deadline:
            return busy


def default_name(providers: Sequence[str]) -> str:
    device = "gpu" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
    return f"{device}-{cores()}core"


def gradients_summary(gradients: dict[str, Any]) -> dict[str, Any]:
    """The gradient methods' ratios to Captum and whether each target was met."""
    row = gradients["grpc_versus_captum"] or {}
    return {"ratios": row.get("ratios", {}), "targets": row.get("targets", {})}


def summary(predict: dict[str, Any], occlusion: dict[str, Any]) -> dict[str, Any]:
    """The headline ratios and whether each acceptance target was met."""
    out: dict[str, Any] = {"predict_xaid_over_plain": {}, "occlusion": {}, "targets_met": True}
    for row in predict["models"]:
        out["predict_xaid_over_plain"][row["model"]] = {
            "median": row["ratio_median"],
            "p99": row["ratio_p99"],
        }
    for row in occlusion["models"]:
        keys = [k for k in ("xaid_over_floor", "xaid_over_captum") if k in row["ratios"]]
        entry: dict[str, Any] = {key: row["ratios"][key] for key in keys}
        entry["targets"] = row["targets"]
        if "equals_captum" in row:
            entry["equals_captum"] = row["equals_captum"]["allclose"]
        out["occlusion"][row["model"]] = entry
        out["targets_met"] = out["targets_met"] and all(t["met"] for t in row["targets"].values())
    return out


def reference_lines(occlusion: dict[str, Any]) -> list[str]:
    """This run's Captum-to-floor ratio beside the reference machine's, to judge the anchor."""
    if not REFERENCE.exists():
        return []
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    captum, floor = reference["captum_occlusion_225_ppe64_s"], reference["ort_fwd_225_floor_s"]
    here = next((r for r in occlusion["models"] if "captum_over_floor" in r["ratios"]), None)
    if here is None:
        return []
    return [
        "",
        f"Reference 2-core CPU figures (`cpu-anchors-2core.json`): Captum {captum:.3f} s, floor "
        f"{floor:.3f} s, Captum/floor {times(captum / floor)}; this run: Captum/floor "
        f"{times(here['ratios']['captum_over_floor'])}.",
    ]


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    busy = info["busy_share"]
    lines = [
        f"# xaid benchmarks: {results['name']}",
        "",
        *machine_markdown(info),
        "- other work on the machine (share of all cores): "
        f"{_share(busy['before'])} just before, {_share(busy['during'])} during the run",
        f"- wall time of the whole run: {results['seconds']:.0f} s",
        "",
        *(
            [
                f"**Disturbed run**: other work kept {busy['during']:.0%} of the cores busy; "
                "the ratios below are not representative.",
                "",
            ]
            if busy["during"] is not None and busy["during"] > BUSY_WARNING
            else []
        ),
        "The xaid server runs in its own process (`python -m xaid_server`, started and stopped "
        "by the bench); the client and every baseline run in the bench's process, one timing "
        "after the other, never beside the server's work. Every ratio compares timings taken "
        "in this run on this machine. Rerun with `make bench`.",
        "",
        "## Acceptance targets",
        "",
    ]
    for model, entry in results["summary"]["occlusion"].items():
        for key, target in entry["targets"].items():
            verdict = "met" if target["met"] else "**missed**"
            lines.append(
                f"- `{model}` occlusion {key.replace('_over_', ' / ')}: {times(entry[key])} "
                f"(target <= {target['limit']}): {verdict}"
            )
    gradients = results["summary"]["gradients"]
    for key, target in gradients["targets"].items():
        verdict = "met" if target["met"] else "**missed**"
        lines.append(
            f"- `small_resnet` {key.replace('_xaid_over_', ' xaid / ')}: "
            f"{times(gradients['ratios'][key])} (target <= {target['limit']}): {verdict}"
        )
    lines += bench_lime.verdicts(results["lime"])
    lines += [
        "",
        "## Results",
        "",
        *bench_occlusion.markdown(results["occlusion"]),
        *reference_lines(results["occlusion"]),
        "",
        *bench_predict.markdown(results["predict"]),
        "",
        *bench_batching.markdown(results["batching"]),
        "",
        *bench_gradients.markdown(results["gradients"]),
        "",
        *bench_lime.markdown(results["lime"]),
        "",
    ]
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0%}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results files")
    ap.add_argument("--name", help="file name stem (default: <cpu|gpu>-<cores>core)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wait up to this long for other work on the machine to stop (default 60)",
    )
    ap.add_argument("--quick", action="store_true", help="fewer repeats: a smoke test")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    before = wait_quiet(args.wait_quiet)
    if before is not None and before > BUSY_WARNING:
        print(f"warning: {before:.0%} of the cores are busy with other work; numbers will suffer")
    with OthersWatch() as during, tempfile.TemporaryDirectory(prefix="xaid-bench-") as tmp:
        repository = model_repository(Path(tmp))
        occlusion = bench_occlusion.run(repository, rounds=2 if args.quick else ROUNDS)
        print(bench_occlusion.report(occlusion), flush=True)
        predict = bench_predict.run(repository, calls=50 if args.quick else CALLS)
        print(bench_predict.report(predict), flush=True)
        batching = bench_batching.run(seconds=2.0 if args.quick else bench_batching.SECONDS)
        print(bench_batching.report(batching), flush=True)
        gradients = bench_gradients.run(
            repository, rounds=3 if args.quick else bench_gradients.ROUNDS
        )
        print(bench_gradients.report(gradients), flush=True)
        lime = bench_lime.run(repository, rounds=2 if args.quick else bench_lime.ROUNDS)
        print(bench_lime.report(lime), flush=True)
    info = machine(occlusion["providers"])
    info["busy_share"] = {"before": before, "during": during.share}
    name = args.name or default_name(occlusion["providers"])
    results: dict[str, Any] = {
        "name": name,
        "machine": info,
        "seconds": time.perf_counter() - began,
        "summary": {**summary(predict, occlusion), "gradients": gradients_summary(gradients)},
        "occlusion": occlusion,
        "predict": predict,
        "batching": batching,
        "gradients": gradients,
        "lime": lime,
    }
    write_json(results, args.out / f"{name}.json")
    (args.out / f"{name}.md").write_text(markdown(results), encoding="utf-8")
    print("\n".join(machine_markdown(info)))
    if during.share is not None and during.share > BUSY_WARNING:
        print(f"warning: other work kept {during.share:.0%} of the cores busy during the run")
    print(f"wrote {args.out / name}.json and .md ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
