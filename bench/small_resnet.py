"""The reference CPU architecture in torch, so xaid, onnxruntime and Captum see the same network.

A small ResNet: 3x64x64 input, Conv-BN-ReLU stem and a 2x2 max-pool (32x32), three residual
blocks (32, 16, 8 px), global average pool, Linear to 10 classes. Weights are a seeded random
init with non-trivial BatchNorm statistics (so BN is not an identity that export could hide),
in eval mode.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

SIZE = 64
CLASSES = 10
# These widths reproduce the reference figures (cpu-anchors-2core.json: onnxruntime 2428 img/s at
# batch 64, 1953 at batch 1; torch 515 at batch 64) within about 10% on the 2-core machine.
WIDTHS = (32, 32, 64, 128)
SEED = 0
OPSET = 17
MAX_IR_VERSION = 10  # the newest IR that onnxruntime 1.20+ loads
TOLERANCE = 1e-4  # onnxruntime against torch, max abs difference of the logits


class ResidualBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """64x64 -> stem conv + max-pool (32x32) -> blocks at 32, 16, 8 px -> global pool -> logits."""

    def __init__(self, classes: int = CLASSES, widths: tuple[int, int, int, int] = WIDTHS) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.blocks = nn.Sequential(
            ResidualBlock(widths[0], widths[1], 1),
            ResidualBlock(widths[1], widths[2], 2),
            ResidualBlock(widths[2], widths[3], 2),
        )
        self.head = nn.Linear(widths[3], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x))
        logits: torch.Tensor = self.head(features.mean(dim=(2, 3)))
        return logits


def build(seed: int = SEED) -> SmallResNet:
    """The network with seeded weights and randomised BatchNorm statistics, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallResNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.num_features
                assert module.running_mean is not None
                assert module.running_var is not None
                module.running_mean.copy_((torch.rand(shape, generator=generator) - 0.5) * 0.4)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_((torch.rand(shape, generator=generator) - 0.5) * 0.2)
    return net.eval()


def example_input(batch: int = 1, seed: int = SEED) -> np.ndarray:
    """A seeded standard-normal float32 NCHW batch, in model-input units."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)


def write_onnx(net: nn.Module, example: torch.Tensor, path: Path, producer: str = "") -> None:
    """Export `net` as ONNX opset 17 with a dynamic batch (`input` -> `logits`) and check it.

    The IR version is capped at 10 so that every onnxruntime the server supports loads it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter is deprecated, but unlike dynamo it needs no onnxscript.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    if producer:
        proto.producer_name = producer
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def export(path: Path, net: SmallResNet | None = None) -> SmallResNet:
    """Write `net` (default: `build()`) as ONNX opset 17, dynamic batch, checked against torch.

    Input `input` [batch, 3, 64, 64], output `logits` [batch, 10]; IR version capped at 10 so
    every onnxruntime the server supports loads it. Returns the torch network it exported.
    """
    net = build() if net is None else net
    write_onnx(net, torch.from_numpy(example_input(2)), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = example_input(3, seed=SEED + 1)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    (actual,) = session.run(["logits"], {"input": x})
    diff = float(np.abs(np.asarray(actual) - expected).max())
    if diff >= TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {diff:.2e}")
    return net
