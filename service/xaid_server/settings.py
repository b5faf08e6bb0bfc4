"""Server settings: one dataclass, every field documented once; the README table is built from it.

Precedence: command line > XAID_* environment variables > config file (--config / XAID_CONFIG)
> defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEMO_MODELS = Path(__file__).resolve().parent / "demo" / "models"


def _setting(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Settings:
    models: Path = _setting(
        DEMO_MODELS, "Model repository folder (default: the bundled demo models)."
    )
    host: str = _setting("127.0.0.1", "Address the gRPC server binds to.")
    port: int = _setting(50051, "gRPC port; 0 picks a free port.")
    metrics_host: str = _setting("127.0.0.1", "Address of the Prometheus /metrics endpoint.")
    metrics_port: int = _setting(
        9464, "Port of the /metrics endpoint; 0 picks a free one, -1 disables."
    )
    require_gpu: bool = _setting(False, "Refuse to start unless the CUDA execution provider works.")
    poll_interval: float = _setting(
        5.0, "Seconds between model repository scans; 0 disables reload."
    )
    max_message_bytes: int = _setting(64 << 20, "Largest gRPC message received or sent, in bytes.")
    max_evaluations: int = _setting(100_000, "Most model evaluations one explanation may cost.")
    max_chunk_bytes: int = _setting(256 << 20, "Memory budget of one evaluation chunk, in bytes.")
    workers: int = _setting(4, "Threads running model evaluations.")
    intra_op_threads: int = _setting(0, "onnxruntime intra-op threads per session; 0 = all cores.")
    max_deadline: float = _setting(300.0, "Longest a request may run, in seconds.")
    default_deadline: float = _setting(
        120.0, "Deadline of a request that sets none, in seconds (at most --max-deadline)."
    )
    predict_limit: int = _setting(
        64, "Predict calls admitted at once; more get RESOURCE_EXHAUSTED (0 = no limit)."
    )
    explain_limit: int = _setting(
        8, "Explain calls admitted at once; more get RESOURCE_EXHAUSTED (0 = no limit)."
    )
    arena_max_bytes: int = _setting(
        0, "Cap on onnxruntime's CPU memory arena shared by all sessions, in bytes; 0 = none."
    )
    probe_timeout: float = _setting(
        60.0, "Seconds a new model file may take to load in a probe process; 0 skips the probe."
    )
    probe_memory_bytes: int = _setting(
        8 << 30, "Address-space cap of the probe process (CPU provider only; 0 = none)."
    )
    tls_cert: str = _setting("", "PEM certificate chain of the gRPC port; with --tls-key, TLS.")
    tls_key: str = _setting("", "PEM private key of --tls-cert.")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle: clients must present a certificate it signed (mutual TLS)."
    )
    auth_token_file: str = _setting(
        "", "File of bearer tokens, one `subject:token` a line; every RPC but health needs one."
    )
    auth_token_env: str = _setting(
        "", "Environment variable holding bearer tokens as comma-separated `subject:token`."
    )
    health_port: int = _setting(
        -1, "Plaintext port serving only grpc.health.v1; 0 picks a free one, -1 disables."
    )
    grace_period: float = _setting(30.0, "Seconds in-flight requests get to finish on SIGTERM.")
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")
    gradient_cache: Path = _setting(
        Path("~/.cache/xaid/gradients"), "Folder keeping built gradient graphs by model sha256."
    )
    audit_log: str = _setting(
        "", "SQLite file of the audit trail (Predict, Explain and model loads); empty = off."
    )
    audit_fail_closed: bool = _setting(
        False, "Answer only once the request's audit record is durable; else UNAVAILABLE."
    )


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, value: Any) -> Any:
    kind: Any = type(FIELDS[name].default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"{name}: expected a boolean, got {value!r}")
        return lowered in ("1", "true", "yes", "on")
    if isinstance(value, bool) or not isinstance(value, str | int | float | Path):
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from None


def from_file(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path.name}: settings file must be a mapping")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"{path.name}: unknown settings {unknown}")
    return {k: _convert(k, v) for k, v in values.items()}


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    return {
        name: _convert(name, env[f"XAID_{name.upper()}"])
        for name in FIELDS
        if f"XAID_{name.upper()}" in env
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="xaid serve",
        description="Serve Predict and Explain for the ONNX models of a model repository.",
    )
    ap.add_argument("--config", type=Path, help="YAML settings file (also XAID_CONFIG).")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(f.default, bool):
            ap.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["doc"]
            )
        else:
            ap.add_argument(
                flag, type=str, default=None, metavar=name.upper(), help=f.metadata["doc"]
            )
    return ap


def load_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    args = parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    config = args.config or (Path(env["XAID_CONFIG"]) if env.get("XAID_CONFIG") else None)
    if config is not None:
        values.update(from_file(config))
    values.update(from_env(env))
    values.update(
        {k: _convert(k, v) for k, v in vars(args).items() if k in FIELDS and v is not None}
    )
    return Settings(**values)


def settings_table() -> str:
    """The README's settings table, so documentation cannot drift from the code."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for name, f in FIELDS.items():
        default = "bundled demo models" if name == "models" else f.default
        flag = "--" + name.replace("_", "-")
        rows.append(f"| `{flag}` | `XAID_{name.upper()}` | `{default}` | {f.metadata['doc']} |")
    return "\n".join(rows)
