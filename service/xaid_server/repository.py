"""The model repository on disk (Triton's layout) and hot reload by polling.

A new or changed version is loaded beside the one serving, warmed up, then switched in; a version
that fails to load is reported and the previous one keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xaid_server.audit.log import AuditLog
from xaid_server.audit.records import model_event
from xaid_server.errors import ModelLoadError, NotFound, XaidError
from xaid_server.metrics import Metrics
from xaid_server.model_config import load_config
from xaid_server.model_files import read_model_file
from xaid_server.probe import Prober
from xaid_server.runtime.model import LoadedModel, SessionFactory, load_model

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.yaml"

Fingerprint = tuple[str, int, int, int, int]


@dataclass(frozen=True)
class Candidate:
    name: str
    version: str
    model_path: Path
    config_path: Path

    def fingerprint(self) -> Fingerprint:
        """Cheap change detection: version and the files' mtimes and sizes."""
        model = self.model_path.stat()
        config = self.config_path.stat() if self.config_path.exists() else None
        return (
            self.version,
            model.st_mtime_ns,
            model.st_size,
            config.st_mtime_ns if config else 0,
            config.st_size if config else 0,
        )


def newest_version(folder: Path) -> Candidate | None:
    versions = sorted(
        (int(p.name), p)
        for p in folder.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file()
    )
    if not versions:
        return None
    _, path = versions[-1]
    return Candidate(folder.name, path.name, path / MODEL_FILE, folder / CONFIG_FILE)


class ModelRepository:
    def __init__(
        self,
        root: Path,
        factory: SessionFactory,
        metrics: Metrics,
        prepare: Callable[[LoadedModel], None] = lambda model: None,
        prober: Prober | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.root = root
        self.factory = factory
        self.metrics = metrics
        self.prepare = prepare
        self.prober = prober
        self.audit = audit
        self._served: dict[str, tuple[Fingerprint, LoadedModel]] = {}
        self._failed: dict[str, Fingerprint] = {}
        self._scan_lock = threading.Lock()

    def get(self, name: str, version: str = "") -> LoadedModel:
        entry = self._served.get(name)
        if entry is None:
            raise NotFound(f"model {name!r} is not served; see ListModels", field="model")
        model = entry[1]
        if version and version != model.version:
            raise NotFound(
                f"version {version!r} of model {name!r} is not loaded; served: {model.version}",
                field="version",
            )
        return model

    def models(self) -> list[LoadedModel]:
        return [model for _, (_, model) in sorted(self._served.items())]

    def scan(self) -> None:
        """Load what is new or changed; keep what fails to load out. Safe to call from a thread."""
        with self._scan_lock:
            if not self.root.is_dir():
                raise ModelLoadError(f"model repository {self.root.name!r} is not a folder")
            seen = set()
            changed: list[tuple[Candidate, Fingerprint]] = []
            for folder in sorted(self.root.iterdir()):
                if not folder.is_dir() or not MODEL_NAME.match(folder.name):
                    continue
                candidate = newest_version(folder)
                if candidate is None:
                    continue
                seen.add(candidate.name)
                fingerprint = self._changed(candidate)
                if fingerprint is not None:
                    changed.append((candidate, fingerprint))
            vetted = self._vet([c for c, _ in changed])
            for (candidate, fingerprint), data in zip(changed, vetted, strict=True):
                self._consider(candidate, fingerprint, data)
            for name in set(self._served) - seen:
                log.info("model %s removed from the repository: unloading", name)
                self._unpublish(name)

    def _changed(self, candidate: Candidate) -> Fingerprint | None:
        """The candidate's fingerprint when it is neither served nor known to fail, else None."""
        try:
            fingerprint = candidate.fingerprint()
        except OSError:
            return None  # the file vanished between listing and stat: next scan decides
        served = self._served.get(candidate.name)
        if (served and served[0] == fingerprint) or self._failed.get(candidate.name) == fingerprint:
            return None
        return fingerprint

    def _vet(self, candidates: list[Candidate]) -> list[bytes | ModelLoadError]:
        """Each file's bytes once its paths are checked and a child process loaded it."""
        vetted: list[bytes | ModelLoadError] = []
        for candidate in candidates:
            try:
                vetted.append(read_model_file(candidate.model_path, self.root))
            except ModelLoadError as exc:
                vetted.append(exc)
        if self.prober is not None:
            files = [
                (data, c.model_path.parent)
                for data, c in zip(vetted, candidates, strict=True)
                if isinstance(data, bytes)
            ]
            refusals = iter(self.prober.probe_all(files))
            for i, data in enumerate(vetted):
                if isinstance(data, bytes):
                    refusal = next(refusals)
                    if refusal is not None:
                        vetted[i] = ModelLoadError(refusal)
        return vetted

    def _consider(
        self, candidate: Candidate, fingerprint: Fingerprint, data: bytes | ModelLoadError
    ) -> None:
        served = self._served.get(candidate.name)
        began = time.perf_counter()
        try:
            if isinstance(data, ModelLoadError):
                raise data
            model = self._load(candidate, data)
        except Exception as exc:  # whatever a crafted file provokes, only this model fails
            if not isinstance(exc, ModelLoadError | XaidError):
                exc = ModelLoadError(f"{type(exc).__name__} while preparing the model")
            self._failed[candidate.name] = fingerprint
            self.metrics.model_load.labels(candidate.name, "failure").inc()
            kept = f"; still serving version {served[1].version}" if served else ""
            log.error(
                "model %s version %s failed to load: %s%s",
                candidate.name,
                candidate.version,
                exc,
                kept,
            )
            self._audit("model_load", candidate.name, candidate.version, None, str(exc))
            return
        finally:
            elapsed = time.perf_counter() - began
            self.metrics.model_load_duration.labels(candidate.name).observe(elapsed)
        self._failed.pop(candidate.name, None)
        self._publish(model, fingerprint)

    def load(self, name: str, version: str) -> LoadedModel:
        """Load and serve exactly this version, newest or not: replaying an audit record."""
        if not MODEL_NAME.match(name) or not version.isdigit():
            raise ModelLoadError(f"no model version {name!r}/{version!r} in this repository")
        folder = self.root / name
        candidate = Candidate(name, version, folder / version / MODEL_FILE, folder / CONFIG_FILE)
        model = self._load(candidate, read_model_file(candidate.model_path, self.root))
        self._publish(model, candidate.fingerprint())
        return model

    def _load(self, candidate: Candidate, data: bytes) -> LoadedModel:
        model = load_model(
            candidate.name,
            candidate.version,
            candidate.model_path,
            load_config(candidate.config_path),
            self.factory,
            data,
        )
        self.prepare(model)
        return model

    def _audit(
        self, kind: str, name: str, version: str, model: LoadedModel | None, error: str = ""
    ) -> None:
        if self.audit is not None:
            self.audit.append(model_event(kind, name, version, model, error))

    def _publish(self, model: LoadedModel, fingerprint: Fingerprint) -> None:
        previous = self._served.get(model.name)
        self._served[model.name] = (fingerprint, model)
        self._audit("model_load", model.name, model.version, model)
        if previous is not None:
            self._drop_info(previous[1])  # before the new series: both may share labels
            self._audit("model_unload", model.name, previous[1].version, previous[1])
        self.metrics.model_load.labels(model.name, "success").inc()
        self.metrics.model_ready.labels(model.name).set(1)
        self.metrics.model_info.labels(
            model.name, model.version, model.sha256[:12], model.provider
        ).set(1)
        log.info(
            "serving model %s version %s (sha256 %s) on %s",
            model.name,
            model.version,
            model.sha256[:12],
            model.provider,
        )

    def _unpublish(self, name: str) -> None:
        _, model = self._served.pop(name)
        self._drop_info(model)
        self._audit("model_unload", name, model.version, model)
        self.metrics.model_ready.labels(name).set(0)

    def _drop_info(self, model: LoadedModel) -> None:
        with contextlib.suppress(KeyError):
            self.metrics.model_info.remove(
                model.name, model.version, model.sha256[:12], model.provider
            )
