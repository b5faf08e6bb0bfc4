"""Shared benchmark helpers: timing, the machine, the server process, and the results files.

Every figure is a ratio measured in one run against a baseline on the same machine, so the
machine description travels with the numbers: absolute seconds mean little on a noisy host.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from xaid import Client, ModelInfo
from xaid_server import healthcheck
from xaid_server.model_config import load_config
from xaid_server.repository import CONFIG_FILE, MODEL_FILE
from xaid_server.runtime.model import LoadedModel, SessionFactory, load_model
from xaid_server.runtime.providers import CPU
from xaid_server.settings import DEMO_MODELS, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SHAPES = "shapes"
SMALL_RESNET = "small_resnet"
#: The small ResNet's config.yaml: an image model evaluated in chunks of at most 64.
SMALL_RESNET_CONFIG = "kind: image\nmax_batch_size: 64\n"
#: Pause before each timed call, so threads still spinning after the previous work (OpenMP's
#: for torch; onnxruntime's pools stop at once with `session.force_spinning_stop`) steal no
#: core from it: on the 2-core machine of bench/results both processes together use under 7 ms
#: of CPU in the first 5 ms after any timed call, and only background after that. A longer
#: pause lets a VM's vCPUs fall idle, which slows the first milliseconds of the next call
#: there (a primed xaid call: +3 ms after 50 ms, +12 ms after 250 ms, +21 ms after 1 s).
SETTLE_S = 0.05
#: Longest wait for a starting server: it loads, warms up and builds graphs for every model.
STARTUP_S = 300.0


@dataclass(frozen=True)
class Stats:
    """Seconds per call over `n` timed calls (after warm-up): the median is the headline."""

    n: int
    median_s: float
    p99_s: float
    mean_s: float
    min_s: float
    max_s: float

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        values = np.asarray(samples, dtype=np.float64)
        return cls(
            n=len(samples),
            median_s=float(np.median(values)),
            p99_s=float(np.percentile(values, 99)),
            mean_s=float(values.mean()),
            min_s=float(values.min()),
            max_s=float(values.max()),
        )

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def measure(fn: Callable[[], object], *, repeats: int, warmup: int = 3) -> Stats:
    """Time `repeats` calls of `fn` after `warmup` untimed ones (caches, thread pools, JIT)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return Stats.of(samples)


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU model string from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or platform.machine()


#: Instruction-set extensions that decide CPU kernel speed, reported when the CPU has them.
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_features() -> list[str]:
    """The notable flags of the first CPU in /proc/cpuinfo (a VM's model name may say little)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
                return [flag for flag in NOTABLE_FLAGS if flag in flags]
    return []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_jiffies() -> tuple[int, int]:
    """(all, idle) jiffies summed over the cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


def busy_share(seconds: float = 1.0) -> float | None:
    """Share of all cores busy over `seconds` while this process sleeps: other processes' load.

    A benchmark on a shared machine is only as good as the machine is quiet; this is recorded
    with the results so a disturbed run can be told from a regression. None off Linux.
    """
    with OthersWatch() as watch:
        time.sleep(seconds)
    return watch.share


class OthersWatch:
    """Share of all cores that other processes kept busy while the block ran (None off Linux).

    The machine's busy time from /proc/stat minus the CPU time of this process and of its
    children waited for in the block: the server processes the bench starts and stops are the
    bench's own work, not a neighbour's.
    """

    def __init__(self) -> None:
        self.share: float | None = None
        self._start: tuple[int, int, float] | None = None

    def __enter__(self) -> OthersWatch:
        try:
            total, idle = _cpu_jiffies()
        except (OSError, ValueError, IndexError):
            return self
        self._start = (total, idle, _own_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        total0, idle0, own0 = self._start
        try:
            total1, idle1 = _cpu_jiffies()
        except (OSError, ValueError, IndexError):
            return
        elapsed = total1 - total0
        if elapsed <= 0:
            return
        own_jiffies = (_own_seconds() - own0) * os.sysconf("SC_CLK_TCK")
        busy = elapsed - (idle1 - idle0) - own_jiffies
        self.share = min(1.0, max(0.0, busy / elapsed))


def _own_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    own = os.times()
    return own.user + own.system + own.children_user + own.children_system


def machine(providers: list[str]) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, library versions, providers, date."""
    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
        "cores": cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "xaid": _version("xaid"),
            "onnxruntime": ort.__version__,
            "onnx": _version("onnx"),
            "numpy": np.__version__,
            "grpcio": _version("grpcio"),
            "torch": _version("torch"),
            "captum": _version("captum"),
        },
        "available_providers": ort.get_available_providers(),
        "providers": providers,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def model_repository(folder: Path) -> Path:
    """A model repository with the demo `shapes` model and, when torch is here, the small ResNet.

    Returns the repository folder. The shapes model is copied from the bundled demo models
    without a config, so it is served with the defaults inferred from its graph, as in the demo.
    """
    shapes = folder / SHAPES / "1" / "model.onnx"
    shapes.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEMO_MODELS / SHAPES / "1" / "model.onnx", shapes)
    if torch_available():
        from bench import small_resnet

        small_resnet.export(folder / SMALL_RESNET / "1" / "model.onnx")
        (folder / SMALL_RESNET / "config.yaml").write_text(SMALL_RESNET_CONFIG, encoding="utf-8")
    return folder


def torch_available() -> bool:
    return _version("torch") is not None


def captum_available() -> bool:
    return torch_available() and _version("captum") is not None


class ServerProcess:
    """`python -m xaid_server` in its own process on a free local port, as users run it.

    Client and server then share no interpreter lock, so the client's wall time is what a
    caller on the same host sees, not time lost to the bench's own threads.
    """

    def __init__(
        self, models: Path, *, startup_s: float = STARTUP_S, options: Sequence[str] = ()
    ) -> None:
        """`options` are more command-line flags; a flag given again there wins."""
        self.port = free_port()
        self.argv = [
            "--models",
            str(models),
            "--port",
            str(self.port),
            "--metrics-port",
            "-1",
            "--poll-interval",
            "0",
            "--log-level",
            "WARNING",
            *options,
        ]
        #: The settings the server parses from the same command line and environment.
        self.settings = load_settings(self.argv)
        self.process = subprocess.Popen([sys.executable, "-m", "xaid_server", *self.argv])
        try:
            self._wait_serving(startup_s)
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_serving(self, timeout_s: float) -> None:
        """Poll the standard health service until it answers SERVING (models loaded and warm)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the xaid server exited with {code} before serving")
            if healthcheck.check(self.address, timeout=1.0):
                return
            time.sleep(0.1)
        raise TimeoutError(f"the xaid server did not answer SERVING within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM, as a process manager stops it; a clean shutdown exits with 0."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=self.settings.grace_period + 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise RuntimeError("the xaid server did not exit after SIGTERM") from None
        if code != 0:
            raise RuntimeError(f"the xaid server exited with {code} after SIGTERM")


def free_port() -> int:
    """A port nothing listens on now: bound on 127.0.0.1:0, then released for the server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.contextmanager
def serving(models: Path) -> Iterator[tuple[ServerProcess, Client]]:
    """A server process and a client of it, both closed and the server stopped however it ends."""
    server = ServerProcess(models)
    try:
        with Client(server.address) as client:
            yield server, client
    finally:
        server.stop()


def served_providers(infos: list[ModelInfo]) -> list[str]:
    """The execution providers the server's sessions actually run on, as it reports them."""
    return sorted({info.execution_provider for info in infos})


def local_model(repository: Path, info: ModelInfo, settings: Settings) -> LoadedModel:
    """The served model loaded again in this process, through the server's own loader.

    Same file and config, the provider the server reports, and the server's thread settings
    in the server's `SessionFactory` (hence the same session options), so the baselines differ
    from the server in nothing but the process they run in. The file's hash, the version and
    the provider are checked against what the server says it serves.
    """
    folder = repository / info.name
    # the server keeps the CPU provider behind an accelerator's, as the fallback
    providers = tuple(dict.fromkeys((info.execution_provider, CPU)))
    model = load_model(
        info.name,
        info.version,
        folder / info.version / MODEL_FILE,
        load_config(folder / CONFIG_FILE),
        SessionFactory(providers, settings.intra_op_threads),
    )
    served = (info.version, info.sha256, info.execution_provider)
    if (model.version, model.sha256, model.provider) != served:
        raise RuntimeError(f"{info.name}: the bench loaded another model than the server serves")
    return model


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def machine_markdown(info: dict[str, Any]) -> list[str]:
    """The machine as a short Markdown list, for the top of a summary."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v is not None)
    return [
        f"- CPU: {info['cpu']} ({' '.join(info['cpu_features']) or 'no AVX2'}), "
        f"{info['cores']} cores, {info['platform']}",
        f"- Python {info['python']}; {versions}",
        f"- execution providers used: {', '.join(info['providers'])}",
        f"- date: {info['date']}",
    ]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def times(value: float) -> str:
    return f"{value:.2f}x"
