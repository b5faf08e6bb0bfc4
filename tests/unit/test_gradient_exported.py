"""Gradient graphs of torch-exported networks against torch float64 autograd.

ResNet-like (BN, max-pool, residuals), MobileNet-like (depthwise and grouped convs, ReLU6,
Hardswish, an SE block) and a transformer encoder (token ids; gradient at the embedding output),
each exported by both torch exporters and differentiated by the rewriter once; batch 1 and 32 run
through the same graph.

Tolerance policy: gradients are discontinuous at ReLU kinks and max-pool ties, and float32 may
take a decision there that float64 does not (GRADIENTS.md, pitfall 17). The float64 reference
records, per row, how close any such decision came: the distance of every ReLU / ReLU6 /
Hardswish / Hardsigmoid input to its kinks and the gap between the two largest values of every
max-pool window. Rows within DECISION_MARGIN of a decision are left out; every other row must
agree to 1e-5 of the gradient's largest magnitude, and at most a quarter of the rows may be left
out. The last tests check the policy itself.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from xaid_server.graphs.gradient import GRADIENT, TARGET, build_gradient_graph

torch = pytest.importorskip("torch")
nn = torch.nn
Module: Any = nn.Module

DECISION_MARGIN = 1e-5  # float32 activations of these networks are off by ~1e-6 at most
CLASSES = 5
TOKENS, VOCABULARY = 8, 50
EXPORTERS = ("torchscript", "dynamo")
KINKS: dict[type[Any], tuple[float, ...]] = {
    nn.ReLU: (0.0,),
    nn.ReLU6: (0.0, 6.0),
    nn.Hardswish: (-3.0, 3.0),
    nn.Hardsigmoid: (-3.0, 3.0),
}


def batch_norm(channels: int) -> Any:
    """A BN with non-trivial statistics, so folding it into the conv matters."""
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    return norm


class Residual(Module):  # type: ignore[misc]
    def __init__(self, inner: int, outer: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inner, outer, 3, stride, 1, bias=False),
            batch_norm(outer),
            nn.ReLU(),
            nn.Conv2d(outer, outer, 3, 1, 1, bias=False),
            batch_norm(outer),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(inner, outer, 1, stride, bias=False), batch_norm(outer))
            if stride != 1 or inner != outer
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: Any) -> Any:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetLike(Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), batch_norm(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        self.blocks = nn.Sequential(Residual(8, 8, 1), Residual(8, 16, 2))
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Any) -> Any:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SqueezeExcite(Module):  # type: ignore[misc]
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels // 2, 1),
            nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 1),
            nn.Hardsigmoid(),
        )

    def forward(self, x: Any) -> Any:
        return x * self.gate(x)


class MobileNetLike(Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False),
            batch_norm(8),
            nn.Hardswish(),
            nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # depthwise
            batch_norm(8),
            nn.ReLU6(),
            SqueezeExcite(8),
            nn.Conv2d(8, 16, 1, bias=False),
            batch_norm(16),
            nn.Conv2d(16, 16, 3, 2, 1, groups=4, dilation=1),  # grouped, strided
            nn.Hardswish(),
            nn.Conv2d(16, 16, 3, 1, 2, groups=16, dilation=2),  # dilated depthwise
            nn.ReLU6(),
        )
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: Any) -> Any:
        return self.head(self.features(x).mean((2, 3)))


class Encoder(Module):  # type: ignore[misc]
    """Token ids -> embedding + positions -> one pre-norm attention block -> mean -> logits."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.embedding = nn.Embedding(VOCABULARY, width)
        self.position = nn.Parameter(torch.randn(1, TOKENS, width) * 0.1)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.project = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.head = nn.Linear(width, CLASSES)

    def forward(self, ids: Any) -> Any:
        x = self.embedding(ids) + self.position
        batch, tokens, width = x.shape
        q, k, v = (
            t.reshape(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
            for t in self.qkv(self.norm1(x)).chunk(3, dim=-1)
        )
        weights = torch.softmax(q @ k.transpose(-2, -1) / (width // self.heads) ** 0.5, dim=-1)
        x = x + self.project((weights @ v).transpose(1, 2).reshape(batch, tokens, width))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(1))


NETWORKS: dict[str, Callable[[], Any]] = {
    "resnet": ResNetLike,
    "mobilenet": MobileNetLike,
    "encoder": Encoder,
}


def inputs(name: str, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "encoder":
        return rng.integers(0, VOCABULARY, (batch, TOKENS))
    return rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)


@cache
def network(name: str) -> Any:
    torch.manual_seed(0)
    return NETWORKS[name]().eval()


def export(net: Any, example: Any, exporter: str) -> onnx.ModelProto:
    """ONNX with a dynamic batch (`x` -> `y`) by the TorchScript or the dynamo exporter."""
    names: dict[str, Any] = {"input_names": ["x"], "output_names": ["y"]}
    with warnings.catch_warnings():  # both exporters warn about their own deprecations
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            buffer = io.BytesIO()
            torch.onnx.export(
                net,
                (example,),
                buffer,
                dynamo=False,
                opset_version=17,
                dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                **names,
            )
            return onnx.load_from_string(buffer.getvalue())
        pytest.importorskip("onnxscript")
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            **names,
        )
        proto: onnx.ModelProto = program.model_proto
        return proto


def embedding_output(model: onnx.ModelProto) -> str:
    """The tensor the token-id input's Gather writes: the encoder's wrt."""
    return next(n.output[0] for n in model.graph.node if n.op_type == "Gather" and "x" in n.input)


@cache
def gradient_graph(name: str, exporter: str) -> tuple[ort.InferenceSession, str | None]:
    example = torch.from_numpy(inputs(name, 2, seed=9))
    model = export(network(name), example, exporter)
    wrt = embedding_output(model) if name == "encoder" else None
    graph = build_gradient_graph(model, wrt=wrt, output="y")
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, wrt


def reference(net: Any, x: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 gradient of y[row, target[row]] (w.r.t. the input, or the embedding output for
    token ids) and, per row, the distance of the nearest ReLU-like or max-pool decision."""
    net = copy.deepcopy(net).double()
    margin = np.full(len(x), np.inf)
    captured: list[Any] = []

    def near_kink(module: Any, args: tuple[Any, ...], _: Any) -> None:
        nonlocal margin
        z = args[0].detach().flatten(1)
        if isinstance(module, nn.MaxPool2d):
            distance = pool_gap(args[0].detach(), module)
        else:
            kinks = KINKS[type(module)]
            distance = torch.stack([(z - k).abs() for k in kinks]).amin(0).amin(1).numpy()
        margin = np.minimum(margin, distance)

    def keep(_: Any, __: Any, output: Any) -> None:
        output.retain_grad()
        captured.append(output)

    for module in net.modules():
        if type(module) in KINKS or isinstance(module, nn.MaxPool2d):
            module.register_forward_hook(near_kink)
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(keep)
    if x.dtype == np.int64:
        given = torch.from_numpy(x)
    else:
        given = torch.from_numpy(x.astype(np.float64)).requires_grad_()
        captured.append(given)
    y = net(given)
    y[np.arange(len(x)), target].sum().backward()
    return captured[0].grad.numpy(), margin


def pool_gap(x: Any, pool: Any) -> np.ndarray:
    """Per row, the smallest gap between the two largest values of a max-pool window. Ties
    among zeros are left alone: the pools here follow a ReLU, whose mask zeroes them anyway."""
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    padded = torch.nn.functional.pad(x, (p, p, p, p), value=-np.inf)
    windows = torch.nn.functional.unfold(padded, k, stride=s).reshape(len(x), x.shape[1], k * k, -1)
    top = windows.topk(2, dim=2).values
    gap = top[:, :, 0] - top[:, :, 1]
    gap[top[:, :, 0] <= 0] = np.inf
    return np.asarray(gap.flatten(1).amin(1).numpy())


def assert_close_rows(actual: np.ndarray, expected: np.ndarray, margin: np.ndarray) -> None:
    """Rows clear of every decision agree to 1e-5 of the largest magnitude; at most a quarter
    of the rows may sit near a decision."""
    rows = margin > DECISION_MARGIN
    assert rows.sum() >= len(rows) * 3 / 4, f"too many rows near a decision: {margin}"
    scale = np.abs(expected[rows]).max()
    np.testing.assert_allclose(actual[rows], expected[rows], rtol=0, atol=1e-5 * scale)


def run(session: ort.InferenceSession, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    (gradient,) = session.run([GRADIENT], {"x": x, TARGET: target})
    return np.asarray(gradient)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_matches_torch_float64_at_batch_1_and_32(name: str, exporter: str) -> None:
    session, _ = gradient_graph(name, exporter)
    x = inputs(name, 32)
    target = np.random.default_rng(1).integers(0, CLASSES, 32)
    expected, margin = reference(network(name), x, target)
    gradient = run(session, x, target)
    assert gradient.shape == expected.shape
    assert_close_rows(gradient, expected, margin)
    single = run(session, x[:1], target[:1])
    if margin[0] > DECISION_MARGIN:
        assert_close_rows(single, expected[:1], margin[:1])
    np.testing.assert_allclose(single[0], gradient[0], rtol=0, atol=1e-6 * np.abs(expected).max())


# ---- the policy itself ----


def test_the_policy_catches_a_wrong_backward_rule() -> None:
    """The deconvnet rule is wrong for a plain gradient: rows clear of decisions expose it."""
    example = torch.from_numpy(inputs("resnet", 2, seed=9))
    model = export(network("resnet"), example, "torchscript")
    wrong = build_gradient_graph(model, output="y", relu="deconvnet")
    session = ort.InferenceSession(wrong.SerializeToString(), providers=["CPUExecutionProvider"])
    x, target = inputs("resnet", 8), np.arange(8) % CLASSES
    expected, margin = reference(network("resnet"), x, target)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_close_rows(run(session, x, target), expected, margin)


def kinked() -> tuple[Any, np.ndarray]:
    """A 2-4-2 MLP and four rows: row 0 puts a ReLU input 1e-8 from its kink, the others are
    clear of every kink."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    weight, bias = net[0].weight.detach().double(), net[0].bias.detach().double()
    on_kink = torch.linalg.lstsq(weight[:2], (1e-8 - bias[:2])[:, None]).solution[:, 0]
    x = np.stack([on_kink.numpy(), [2.0, -1.0], [1.0, 1.0], [-1.0, 2.0]]).astype(np.float32)
    return net, x


def test_the_policy_leaves_out_only_rows_near_a_decision() -> None:
    net, x = kinked()
    expected, margin = reference(net, x, np.array([0, 1, 0, 1]))
    assert margin[0] < DECISION_MARGIN < margin[1:].min()
    off_row_0, off_row_1 = expected.copy(), expected.copy()
    off_row_0[0] += 1.0
    off_row_1[1] += 1.0
    assert_close_rows(off_row_0, expected, margin)  # a flip there is tolerated
    with pytest.raises(AssertionError):
        assert_close_rows(off_row_1, expected, margin)


def test_the_policy_refuses_a_batch_mostly_near_decisions() -> None:
    net, x = kinked()
    expected, margin = reference(net, x[:1].repeat(4, axis=0), np.zeros(4, np.int64))
    with pytest.raises(AssertionError, match="too many rows"):
        assert_close_rows(expected, expected, margin)
