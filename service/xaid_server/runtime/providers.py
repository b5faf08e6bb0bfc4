"""Which execution providers actually work here, probed once with one tiny session.

The onnxruntime-gpu wheel lists CUDA even on machines without a GPU and prints an error for every
session that asks for it; probing once keeps the log clean and makes the fallback visible.
"""

from __future__ import annotations

import importlib.util
import logging

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from xaid_server.errors import ModelLoadError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def _tiny_model() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def probe_providers(require_gpu: bool) -> list[str]:
    """The provider list every session is created with; CUDA first when it really works."""
    providers = [CPU]
    if CUDA in ort.get_available_providers():
        if importlib.util.find_spec("nvidia") is not None:
            # CUDA and cuDNN installed as pip packages (nvidia-*): put them on the loader's path
            ort.preload_dlls()
        ort.set_default_logger_severity(4)  # a failed CUDA load is reported by our own line
        try:
            session = ort.InferenceSession(_tiny_model(), providers=[CUDA, CPU])
            if session.get_providers()[0] == CUDA:
                providers = [CUDA, CPU]
        except Exception:
            log.debug("CUDA probe session failed", exc_info=True)
        finally:
            ort.set_default_logger_severity(2)
    if require_gpu and providers[0] != CUDA:
        raise ModelLoadError("--require-gpu is set but the CUDA execution provider is not usable")
    fallback = "" if providers[0] == CUDA else " (CUDA is not usable on this machine)"
    log.info("execution providers: %s%s", ", ".join(providers), fallback)
    return providers
