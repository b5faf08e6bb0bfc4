"""A loaded model version: its session, resolved config and the evaluation graphs built from it."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from xaid._codec import dtype_of
from xaid_server.errors import FailedPrecondition, ModelLoadError
from xaid_server.model_config import ImageConfig, ModelConfig
from xaid_server.runtime.blas import single_threaded_blas
from xaid_server.runtime.providers import CPU, CUDA
from xaid_server.runtime.runner import Lanes
from xaid_server.runtime.tensors import TensorSpec, spec_of

log = logging.getLogger(__name__)

GraphBuilder = Callable[[onnx.ModelProto], onnx.ModelProto]


@dataclass(frozen=True)
class SessionFactory:
    """Creates every session of the server with the probed providers and thread settings."""

    providers: tuple[str, ...]
    intra_op_threads: int = 0
    gradient_cache: Path | None = None  # where built gradient graphs are kept; None: nowhere
    env_allocators: bool = False  # share the process-wide CPU arena (capped by arena_max_bytes)

    def __post_init__(self) -> None:
        single_threaded_blas()  # the process runs xaid's sessions: they own its cores

    @property
    def lane_count(self) -> int:
        """Runs a graph may take side by side (runner.Lanes): one per core the server may use,
        on the CPU provider only; 0 where that is one core or an accelerator runs the graphs."""
        if self.providers[0] != CPU:
            return 0
        cores = self.intra_op_threads or len(os.sched_getaffinity(0))
        return cores if cores > 1 else 0

    def create(
        self,
        model: bytes,
        precision: str = "",
        *,
        folder: Path | None = None,
        single_threaded: bool = False,
    ) -> ort.InferenceSession:
        """A session; `precision` (strict or tf32) sets TF32 on CUDA and does nothing on the CPU.

        `folder` is where the model's external data lies (checked by `model_files`); without
        it onnxruntime would look relative to the working directory. `single_threaded` runs
        each operator on the calling thread (a lane's session).
        """
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1 if single_threaded else self.intra_op_threads
        options.log_severity_level = 3
        if folder is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(folder)
            )
        if self.env_allocators:
            options.add_session_config_entry("session.use_env_allocators", "1")
        # Each session has its own intra-op pool whose threads spin after a run; on few cores a
        # spinning pool starves the next session's run (an explanation's forward, then its graph).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        providers: list[str | tuple[str, dict[str, str]]] = [
            (name, {"use_tf32": "1" if precision == "tf32" else "0"})
            if name == CUDA and precision
            else name
            for name in self.providers
        ]
        return ort.InferenceSession(model, options, providers=providers)


@dataclass
class LoadedModel:
    name: str
    version: str
    path: Path
    sha256: str
    config: ModelConfig
    session: ort.InferenceSession
    factory: SessionFactory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_bytes: bytes  # what the session was built from: the file may change under us
    _graphs: dict[str, ort.InferenceSession] = field(default_factory=dict)
    _graph_errors: dict[str, str] = field(default_factory=dict)
    graph_sources: dict[str, str] = field(default_factory=dict)  # key -> shipped, cache, built
    chunks: dict[str, int] = field(default_factory=dict)  # key -> measured fastest chunk size
    lanes: dict[str, Lanes] = field(default_factory=dict)  # key -> measured side-by-side runs
    _lane_sessions: dict[str, ort.InferenceSession] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def provider(self) -> str:
        return str(self.session.get_providers()[0])

    @property
    def input(self) -> TensorSpec:
        """The input explanations attribute to (config `input`, else the first)."""
        return self.input_spec(self.config.input)

    def input_spec(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == (name or self.config.input or self.inputs[0].name):
                return spec
        raise KeyError(name)

    def output_index(self, name: str) -> int:
        wanted = name or self.config.output or self.outputs[0].name
        for index, spec in enumerate(self.outputs):
            if spec.name == wanted:
                return index
        raise KeyError(name)

    def evaluation_graph(self, key: str, build: GraphBuilder) -> ort.InferenceSession:
        """A session for a graph derived from this model, built once and cached by `key`."""

        def produce() -> tuple[bytes, str]:
            return build(onnx.load_from_string(self.model_bytes)).SerializeToString(), "built"

        return self.graph_session(key, produce)

    def graph_session(
        self,
        key: str,
        produce: Callable[[], tuple[bytes, str]],
        precision: str = "",
        *,
        lanes: bool = False,
    ) -> ort.InferenceSession:
        """A session for the graph `produce` returns with its source, made once per `key`; a
        FailedPrecondition is remembered, so a graph that cannot be built is tried once.

        With `lanes`, where the factory allows side-by-side runs and the arena is not capped
        (a second session holds its own copy of the weights), a single-threaded session of the
        same graph is made too: `lane_session(key)`."""
        with self._lock:
            if key in self._graphs:
                return self._graphs[key]
            if key in self._graph_errors:
                raise FailedPrecondition(self._graph_errors[key])
            try:
                graph, source = produce()
                try:
                    session = self.factory.create(graph, precision)
                except Exception as exc:
                    raise FailedPrecondition(
                        f"onnxruntime could not load the {source} graph: {type(exc).__name__}"
                    ) from exc
            except FailedPrecondition as exc:
                self._graph_errors[key] = exc.message
                raise
            if lanes and self.factory.lane_count and not self.factory.env_allocators:
                self._lane_sessions[key] = self.factory.create(
                    graph, precision, single_threaded=True
                )
            self._graphs[key] = session
            self.graph_sources[key] = source
            return session

    def lane_session(self, key: str) -> ort.InferenceSession | None:
        return self._lane_sessions.get(key)


def load_model(
    name: str,
    version: str,
    path: Path,
    config: ModelConfig,
    factory: SessionFactory,
    data: bytes | None = None,
) -> LoadedModel:
    """Create the session, complete the config from the graph and warm the model up.

    `data` is the file's content already read and checked (the file may change under us).
    """
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"model file cannot be read: {type(exc).__name__}") from None
    try:
        session = factory.create(data, folder=path.parent)
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime could not load the model: {type(exc).__name__}") from exc
    inputs = tuple(spec_of(i) for i in session.get_inputs())
    outputs = tuple(spec_of(o) for o in session.get_outputs())
    model = LoadedModel(
        name=name,
        version=version,
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        config=infer_config(config, inputs, outputs),
        session=session,
        factory=factory,
        inputs=inputs,
        outputs=outputs,
        model_bytes=data,
    )
    warm_up(model)
    return model


def infer_config(
    config: ModelConfig, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]
) -> ModelConfig:
    """Fill what the config leaves open from the graph: 4-D float is image-like, 2-D tabular."""
    names = {i.name for i in inputs}
    if config.input and config.input not in names:
        raise ModelLoadError(f"config input {config.input!r} is not a model input")
    if config.output and config.output not in {o.name for o in outputs}:
        raise ModelLoadError(f"config output {config.output!r} is not a model output")
    first = next(i for i in inputs if i.name == (config.input or inputs[0].name))
    kind = config.kind
    if not kind:
        if first.datatype in ("INT64", "INT32"):
            kind = "text"
        elif first.rank == 4:
            kind = "image"
        else:
            kind = "tabular"
    image = config.image
    if kind == "image" and image is None:
        image = infer_image_config(first)
    return replace(
        config, kind=kind, input=first.name, output=config.output or outputs[0].name, image=image
    )


def infer_image_config(spec: TensorSpec) -> ImageConfig | None:
    """Encoded images for a config-less 4-D model: pixels scaled to [0, 1], no normalisation."""
    if spec.rank != 4:
        return None
    _, a, b, c = spec.shape
    if a in (1, 3) and b > 0 and c > 0:
        return ImageConfig(height=b, width=c, channels=a, layout="NCHW", scale=255.0)
    if c in (1, 3) and a > 0 and b > 0:
        return ImageConfig(height=a, width=b, channels=c, layout="NHWC", scale=255.0)
    return None


def example_input(spec: TensorSpec, batch: int = 1) -> np.ndarray:
    """A zero tensor for the spec, dynamic dims set to 1 (batch dim to `batch`)."""
    shape = [batch] + [d if d > 0 else 1 for d in spec.shape[1:]]
    return np.zeros(shape, dtype=dtype_of(spec.datatype))


def warm_up(model: LoadedModel) -> None:
    """One real run, so that a version is switched in only when it can answer."""
    feeds = {spec.name: example_input(spec) for spec in model.inputs}
    try:
        model.session.run(None, feeds)
    except Exception as exc:
        raise ModelLoadError(f"warm-up run failed: {type(exc).__name__}") from exc
    log.debug("warmed up %s version %s", model.name, model.version)
