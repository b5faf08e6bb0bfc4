"""Load new model files in a child process first: a file that crashes onnxruntime kills the child.

A crafted model can make onnxruntime abort, crash, hang or allocate without bound while it builds
a session. The child builds the session and runs one warm-up, under a time limit and (on the CPU)
an address-space cap; only a file whose child exits cleanly is loaded into the server. Run as
`python -m xaid_server.probe` with the model bytes on stdin.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from xaid_server.runtime.providers import CUDA


@dataclass(frozen=True)
class Prober:
    providers: tuple[str, ...]
    timeout: float = 60.0
    memory_bytes: int = 0

    def command(self, folder: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "xaid_server.probe",
            "--folder",
            str(folder),
            "--memory-bytes",
            str(self.memory_bytes if CUDA not in self.providers else 0),
            *(f"--provider={p}" for p in self.providers),
        ]

    def probe(self, data: bytes, folder: Path) -> str | None:
        """None when the file loads and runs in a child; else why it was refused."""
        child = subprocess.Popen(
            self.command(folder),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = child.communicate(data, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            return f"loading took longer than {self.timeout:g} s in the probe process"
        except BrokenPipeError:  # the child died before reading the whole file
            child.communicate()
            err = b""
        if child.returncode == 0:
            return None
        if child.returncode < 0:
            return f"the probe process died of {signal.Signals(-child.returncode).name}"
        reason = err.decode(errors="replace").strip().splitlines()
        return reason[-1] if reason else f"the probe process exited with {child.returncode}"

    def probe_all(self, files: Sequence[tuple[bytes, Path]]) -> list[str | None]:
        """Probe files in parallel, so start-up with many models costs about one probe."""
        if not files:
            return []
        with ThreadPoolExecutor(min(len(files), os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda file: self.probe(*file), files))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xaid_server.probe")
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--memory-bytes", type=int, default=0)
    ap.add_argument("--provider", action="append", default=[])
    args = ap.parse_args(argv)
    data = sys.stdin.buffer.read()
    if args.memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_bytes, args.memory_bytes))
    from xaid_server.runtime.model import SessionFactory, example_input  # after the cap
    from xaid_server.runtime.tensors import spec_of

    try:
        session = SessionFactory(tuple(args.provider), 1).create(data, folder=args.folder)
        feeds = {i.name: example_input(spec_of(i)) for i in session.get_inputs()}
        session.run(None, feeds)
    except Exception as exc:  # the reason goes to the parent's log, never to a client
        print(f"onnxruntime refused the model: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
