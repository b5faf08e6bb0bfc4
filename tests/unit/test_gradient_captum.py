"""The gradient methods equal Captum's on the same torch models, exported to ONNX."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.helpers import explain, load
from tests.unit.test_occlusion_captum import assert_close, cnn, export, mlp
from xaid_server.explainers.grad_cam import GradCamExplainer
from xaid_server.explainers.gradient_x_input import GradientXInputExplainer
from xaid_server.explainers.guided_backprop import GuidedBackpropExplainer
from xaid_server.explainers.integrated_gradients import METHODS, IntegratedGradientsExplainer
from xaid_server.explainers.saliency import SaliencyExplainer
from xaid_server.runtime.model import LoadedModel

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.filterwarnings(
    "ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning",
    "ignore:Setting backward hooks on ReLU activations:UserWarning",
)

TARGETS = [0, 3]


@pytest.fixture(scope="module")
def cnn_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LoadedModel, np.ndarray]:
    tmp_path = tmp_path_factory.mktemp("cnn")
    net = cnn()
    model = load(tmp_path, export(net, torch.zeros(1, 3, 24, 24), tmp_path / "cnn.onnx"))
    x = np.random.default_rng(0).normal(size=(2, 3, 24, 24)).astype(np.float32)
    return net, model, x


@pytest.fixture(scope="module")
def mlp_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LoadedModel, np.ndarray]:
    tmp_path = tmp_path_factory.mktemp("mlp")
    net = mlp()
    model = load(tmp_path, export(net, torch.zeros(1, 6), tmp_path / "mlp.onnx"))
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    return net, model, x


def captum(attributor: Any, x: np.ndarray, targets: list[int], **kwargs: Any) -> np.ndarray:
    inputs = torch.from_numpy(x).requires_grad_()
    return np.asarray(attributor.attribute(inputs, target=targets, **kwargs).detach().numpy())


def test_saliency_and_gradient_x_input(cnn_model: Any, mlp_model: Any) -> None:
    for net, model, x in (cnn_model, mlp_model):
        targets = [t % 3 for t in range(len(x))]
        ours, _ = explain(SaliencyExplainer(), model, x, {"abs": True}, targets)
        assert_close(ours.attribution, captum(captum_attr.Saliency(net), x, targets))
        signed, _ = explain(SaliencyExplainer(), model, x, {}, targets)
        expected = captum(captum_attr.Saliency(net), x, targets, abs=False)
        assert_close(signed.attribution, expected)
        ours, _ = explain(GradientXInputExplainer(), model, x, {}, targets)
        assert_close(ours.attribution, captum(captum_attr.InputXGradient(net), x, targets))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_integrated_gradients(cnn_model: Any, mlp_model: Any, method: str) -> None:
    for net, model, x in (cnn_model, mlp_model):
        targets = [t % 3 for t in range(len(x))]
        given = {"n_steps": 8, "integration_method": method, "baseline": 0.25}
        ours, _ = explain(IntegratedGradientsExplainer(), model, x, given, targets)
        expected = captum(
            captum_attr.IntegratedGradients(net),
            x,
            targets,
            baselines=0.25,
            n_steps=8,
            method=method,
        )
        assert_close(ours.attribution, expected)


@pytest.mark.parametrize(
    ("rule", "captum_method"), [("guided", "GuidedBackprop"), ("deconvnet", "Deconvolution")]
)
def test_guided_backprop(cnn_model: Any, rule: str, captum_method: str) -> None:
    net, model, x = cnn_model
    ours, _ = explain(GuidedBackpropExplainer(), model, x, {"rule": rule}, TARGETS)
    expected = captum(getattr(captum_attr, captum_method)(net), x, TARGETS)
    assert_close(ours.attribution, expected)


@pytest.mark.parametrize("relu", [True, False])
def test_grad_cam(cnn_model: Any, relu: bool) -> None:
    net, model, x = cnn_model
    explainer = GradCamExplainer()
    params = explainer.resolve(model, x.shape, {"relu": relu})
    ours, _ = explain(explainer, model, x, {"relu": relu}, TARGETS)
    layer = captum_attr.LayerGradCam(net, net[4])  # the last Conv (BatchNorm folds into the first)
    cam = layer.attribute(torch.from_numpy(x), target=TARGETS, relu_attributions=relu)
    expected = captum_attr.LayerAttribution.interpolate(cam, (24, 24), "bilinear")
    expected = np.asarray(expected.detach().numpy())
    assert params.layer
    assert ours.attribution.shape == x.shape
    for channel in range(3):
        assert_close(ours.attribution[:, channel : channel + 1], expected)
