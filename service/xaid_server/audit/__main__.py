"""`python -m xaid_server.audit verify|replay`: what an auditor runs against an audit log."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from xaid_server.audit.replay import ReplayRefused, replay
from xaid_server.audit.verify import verify
from xaid_server.settings import DEMO_MODELS


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m xaid_server.audit", description="Check and replay an xaid audit log."
    )
    commands = ap.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="Walk the hash chain; exit 1 on tampering.")
    check.add_argument("log", type=Path, help="The audit log (SQLite file).")
    again = commands.add_parser(
        "replay", help="Re-run one record on the CPU; exit 1 unless it matches bit for bit."
    )
    again.add_argument("log", type=Path, help="The audit log (SQLite file).")
    again.add_argument("--record", type=int, required=True, help="Sequence number of the record.")
    again.add_argument(
        "--input",
        type=Path,
        required=True,
        help="What the request sent: the image file, a text file, or .npy / .npz tensors.",
    )
    again.add_argument(
        "--models", type=Path, default=DEMO_MODELS, help="The model repository (default: demo)."
    )
    again.add_argument("--gradient-cache", type=Path, help="Folder of built gradient graphs.")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "verify":
        try:
            verdict = verify(args.log)
        except (OSError, ValueError) as exc:
            print(f"verify: {exc}", file=sys.stderr)
            return 2
        head = f"head: record {verdict.head.seq}, hash {verdict.head.hash}"
        if verdict.broken is not None:
            print(f"TAMPERED at record {verdict.broken}: {verdict.reason}")
        if not verdict.triggers:
            print("TAMPERED: the append-only triggers were removed")
        if verdict.intact:
            print(f"intact: {verdict.records} records; {head}")
        return 0 if verdict.intact else 1
    try:
        outcome = asyncio.run(
            replay(args.log, args.record, args.input, args.models, args.gradient_cache)
        )
    except ReplayRefused as exc:
        print(f"replay refused: {exc}", file=sys.stderr)
        return 2
    verdict_text = "matches" if outcome.matches else "DIFFERS"
    print(
        f"record {outcome.seq} ({outcome.kind}): {outcome.what} digest {verdict_text}; "
        f"recorded {outcome.recorded}, replayed {outcome.replayed}"
    )
    return 0 if outcome.matches else 1


if __name__ == "__main__":
    raise SystemExit(main())
