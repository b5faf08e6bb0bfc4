"""Occlusion equals Captum's `Occlusion` on the same models, windows, baselines and targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import explain, load
from xaid_server.explainers.occlusion import OcclusionExplainer

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"
)

OCCLUSION = OcclusionExplainer()


def cnn() -> Any:
    """Conv-BN-ReLU-MaxPool-Conv-ReLU-GAP-Linear with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    batch_norm = net[1]
    batch_norm.running_mean.uniform_(-0.5, 0.5)
    batch_norm.running_var.uniform_(0.5, 2.0)
    return net.eval()


def mlp() -> Any:
    torch.manual_seed(1)
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def export(net: Any, example: Any, path: Path) -> bytes:
    """ONNX opset 17 with a dynamic batch: the TorchScript exporter, or dynamo where it is gone."""
    names: dict[str, Any] = {"input_names": ["x"], "output_names": ["y"], "opset_version": 17}
    try:
        torch.onnx.export(
            net,
            (example,),
            str(path),
            dynamo=False,
            dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
            **names,
        )
    except (TypeError, NotImplementedError):
        pytest.importorskip("onnxscript")
        dynamic = ({0: torch.export.Dim("b")},)
        torch.onnx.export(net, (example,), str(path), dynamo=True, dynamic_shapes=dynamic, **names)
    return path.read_bytes()


def captum_occlusion(
    net: Any, x: np.ndarray, window: tuple[int, ...], stride: tuple[int, ...], **kwargs: Any
) -> np.ndarray:
    occlusion = captum_attr.Occlusion(net)
    with torch.no_grad():
        result = occlusion.attribute(
            torch.from_numpy(x), sliding_window_shapes=window, strides=stride, **kwargs
        )
    return np.asarray(result.numpy())


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("baseline", [0.0, 0.5])
@pytest.mark.parametrize("targets", [(0, 3), (4, 4)])
def test_cnn_matches_captum(tmp_path: Path, baseline: float, targets: tuple[int, int]) -> None:
    net = cnn()
    x = np.random.default_rng(0).normal(size=(2, 3, 24, 24)).astype(np.float32)
    model = load(tmp_path, export(net, torch.zeros(1, 3, 24, 24), tmp_path / "cnn.onnx"))
    given = {"window": (8, 8), "stride": (4, 4), "baseline": baseline}
    explanation, _ = explain(OCCLUSION, model, x, given, list(targets))
    expected = captum_occlusion(
        net,
        x,
        (3, 8, 8),
        (3, 4, 4),
        baselines=baseline,
        target=list(targets),
        perturbations_per_eval=16,
    )
    assert_close(explanation.attribution, expected)


def test_tabular_mlp_matches_captum(tmp_path: Path) -> None:
    net = mlp()
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    model = load(tmp_path, export(net, torch.zeros(1, 6), tmp_path / "mlp.onnx"))
    explanation, _ = explain(OCCLUSION, model, x, {"window": (1,), "stride": (1,)}, [2, 0, 1])
    expected = captum_occlusion(net, x, (1,), (1,), target=[2, 0, 1])
    assert_close(explanation.attribution, expected)
