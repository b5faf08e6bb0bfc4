"""Backward rules for convolution, pooling and inference batch normalisation.

The input gradient of a convolution is a transposed convolution with the same weights. With
stride 1 it is emitted as a plain `Conv` with the flipped, group-swapped kernel, which
onnxruntime's CPU provider runs about four times faster than `ConvTranspose`, unless that `Conv`
would have fewer than `FEW_CHANNELS` outputs (an image model's input gradient): onnxruntime's
blocked (NCHWc) `Conv` pads its output channels to a whole block, and `ConvTranspose` is then
two to three times faster. Otherwise it is a `ConvTranspose` with explicit pads and
output_padding computed from the static sizes: its `output_shape` attribute lets the runtime
split the padding, which is wrong for asymmetric pads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from xaid_server.graphs.gradient.emit import Context, Rule

#: The smallest channel block of onnxruntime's NCHWc convolutions (8 on AVX2, 16 on AVX-512).
FEW_CHANNELS = 8


@dataclass(frozen=True)
class Geometry:
    """Per spatial dim of a sliding window: input and output size, kernel, stride, dilation
    and the padding before the first element (the end padding follows from the sizes)."""

    sizes: tuple[int, ...]
    outputs: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begins: tuple[int, ...]


def _geometry(ctx: Context, kernel: Sequence[int]) -> Geometry:
    rank = len(kernel)
    sizes, outputs = ctx.dims(ctx.x)[2:], ctx.dims(ctx.y)[2:]
    if any(d is None for d in [*sizes, *outputs]):
        raise ctx.refuse("spatial sizes that follow the batch")
    strides = tuple(ctx.attr("strides", [1] * rank))
    dilations = tuple(ctx.attr("dilations", [1] * rank))
    auto_pad = ctx.attr("auto_pad", b"NOTSET").decode()
    begins: list[int] = []
    pads = list(ctx.attr("pads", [0] * 2 * rank))[:rank]
    for h, o, k, s, d, p in zip(sizes, outputs, kernel, strides, dilations, pads, strict=True):
        assert h is not None
        assert o is not None
        if auto_pad in ("NOTSET", ""):
            begins.append(p)
        elif auto_pad == "VALID":
            begins.append(0)
        else:  # SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the start
            total = max((o - 1) * s + d * (k - 1) + 1 - h, 0)
            begins.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    return Geometry(
        sizes=tuple(h for h in sizes if h is not None),
        outputs=tuple(o for o in outputs if o is not None),
        kernel=tuple(kernel),
        strides=strides,
        dilations=dilations,
        begins=tuple(begins),
    )


def _transposed_conv(ctx: Context, grad: str, weight: np.ndarray, group: int, geo: Geometry) -> str:
    """The gradient through a convolution with constant `weight`: dX from dY.

    Output o reads inputs o*s - p + d*j, j < k. With stride 1 that is a convolution of dY with
    the flipped kernel padded by d(k-1) - p before and h - o + p after, when both are
    non-negative. Otherwise the transposed convolution's full output, of length
    L = (o-1)s + d(k-1) + 1, is cropped by p before; its end is cropped, or extended by
    output_padding (< max(s, d)), to h.
    """
    dtype = helper.tensor_dtype_to_np_dtype(ctx.dtype(ctx.x))
    emit = ctx.emit
    before = [
        d * (k - 1) - p for k, d, p in zip(geo.kernel, geo.dilations, geo.begins, strict=True)
    ]
    after = [h - o + p for h, o, p in zip(geo.sizes, geo.outputs, geo.begins, strict=True)]
    few = group == 1 and weight.shape[1] < FEW_CHANNELS
    if all(s == 1 for s in geo.strides) and min(before + after) >= 0 and not few:
        return emit.op(
            "Conv",
            [grad, emit.constant(_flipped(weight, group).astype(dtype))],
            dilations=list(geo.dilations),
            group=group,
            pads=before + after,
        )
    pads_begin: list[int] = []
    pads_end: list[int] = []
    output_padding: list[int] = []
    layout = zip(
        geo.sizes, geo.outputs, geo.kernel, geo.strides, geo.dilations, geo.begins, strict=True
    )
    for h, o, k, s, d, p in layout:
        full = (o - 1) * s + d * (k - 1) + 1
        symmetric = h - (full - 2 * p)
        if 0 <= symmetric < max(s, d):  # symmetric pads suit cuDNN best
            pads_begin.append(p)
            pads_end.append(p)
            output_padding.append(symmetric)
        else:
            pads_begin.append(p)
            pads_end.append(max(full - p - h, 0))
            output_padding.append(max(h + p - full, 0))
    return emit.op(
        "ConvTranspose",
        [grad, emit.constant(weight.astype(dtype))],
        strides=list(geo.strides),
        dilations=list(geo.dilations),
        group=group,
        pads=pads_begin + pads_end,
        output_padding=output_padding,
    )


def _flipped(weight: np.ndarray, group: int) -> np.ndarray:
    """[M, C/G, *k] to [C, M/G, *k]: input and output channels swapped per group, kernel flipped."""
    out_channels, in_per_group, *kernel = weight.shape
    grouped = weight.reshape(group, out_channels // group, in_per_group, *kernel)
    swapped = grouped.swapaxes(1, 2).reshape(group * in_per_group, out_channels // group, *kernel)
    return np.flip(swapped, axis=tuple(range(2, swapped.ndim)))


def _conv(ctx: Context) -> dict[int, str]:
    weight = ctx.require_const(1, "weight")
    geo = _geometry(ctx, ctx.attr("kernel_shape", weight.shape[2:]))
    return {0: _transposed_conv(ctx, ctx.g, weight, int(ctx.attr("group", 1)), geo)}


def _max_pool(ctx: Context) -> dict[int, str]:
    """Route the gradient to each window's argmax.

    A second MaxPool returns the indices (flat over N·C·H·W in ONNX). Where windows cannot
    overlap, each input element has at most one window, so `MaxUnpool` places the gradient
    (float32 only in onnxruntime's CPU provider): about a quarter faster than the scatter.
    Otherwise `ScatterElements` with `reduction="add"` sums the contributions of overlapping
    windows that share their maximum. The second MaxPool spells out the default storage_order:
    without it, onnxruntime merged it with a model's pool that leaves it out, and that pool
    left the blocked layout, changing the rounding of the original outputs, which must match
    the forward model bit for bit (tested).
    """
    if ctx.attr("storage_order", 0):
        raise ctx.refuse("column-major indices (storage_order=1)")
    emit, x = ctx.emit, ctx.x
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        indices = ctx.node.output[1]
    else:
        attrs = {a.name: helper.get_attribute_value(a) for a in ctx.node.attribute}
        attrs["storage_order"] = 0  # explicit: see above
        indices = emit.ops("MaxPool", [x], 2, **attrs)[1]
    unpooled = _unpool(ctx, indices)
    if unpooled is not None:
        return {0: unpooled}
    flat = emit.ints([-1])
    zeros = emit.op(
        "ConstantOfShape",
        [emit.op("Reshape", [emit.op("Size", [x]), emit.ints([1])])],
        value=helper.make_tensor("zero", ctx.dtype(x), [1], [0]),
    )
    scattered = emit.op(
        "ScatterElements",
        [zeros, emit.op("Reshape", [indices, flat]), emit.op("Reshape", [ctx.g, flat])],
        axis=0,
        reduction="add",
    )
    return {0: emit.op("Reshape", [scattered, emit.shape(x)])}


def _unpool(ctx: Context, indices: str) -> str | None:
    """`MaxUnpool` of the gradient when the windows are disjoint, the sizes static and the type
    float32; None otherwise.

    Its attributes only set the smallest output it accepts, (o-1)s + k - pads, which a
    ceil-mode window overhanging the input would exceed: the end pads are chosen to match.
    """
    kernel = list(ctx.attr("kernel_shape"))
    spatial = [*ctx.dims(ctx.x)[2:], *ctx.dims(ctx.y)[2:]]
    if ctx.dtype(ctx.x) != TensorProto.FLOAT or any(d is None for d in spatial):
        return None
    geo = _geometry(ctx, kernel)
    extents = [d * (k - 1) + 1 for k, d in zip(geo.kernel, geo.dilations, strict=True)]
    if any(s < e for s, e in zip(geo.strides, extents, strict=True)):
        return None  # overlapping windows may share a maximum: scatter-add instead
    layout = zip(geo.sizes, geo.outputs, extents, geo.strides, geo.begins, strict=True)
    ends = [max((o - 1) * s + e - p - h, 0) for h, o, e, s, p in layout]
    return ctx.emit.op(
        "MaxUnpool",
        [ctx.g, indices, ctx.emit.shape(ctx.x)],
        kernel_shape=extents,
        strides=list(geo.strides),
        pads=[*geo.begins, *ends],
    )


def _average_pool(ctx: Context) -> dict[int, str]:
    """Divide by each window's count, then spread over the window (a ones-kernel transposed
    depthwise convolution)."""
    channels = ctx.dims(ctx.x)[1]
    if channels is None:
        raise ctx.refuse("a channel count that follows the batch")
    kernel = list(ctx.attr("kernel_shape"))
    geo = _geometry(ctx, kernel)
    dtype = helper.tensor_dtype_to_np_dtype(ctx.dtype(ctx.x))
    scale = ctx.emit.constant(_reciprocal_counts(ctx, geo).astype(dtype))
    ones = np.ones((channels, 1, *kernel), dtype=dtype)
    grad = ctx.emit.op("Mul", [ctx.g, scale])
    return {0: _transposed_conv(ctx, grad, ones, channels, geo)}


def _reciprocal_counts(ctx: Context, geo: Geometry) -> np.ndarray:
    """1/divisor per output position, as the runtime's AveragePool computes it.

    The divisor depends on count_include_pad, ceil_mode and the runtime's treatment of windows
    that overhang the padding, so the node itself is run once on ones: it returns
    (elements inside the input) / divisor, and the numerator is counted here.
    """
    shape = (1, 1, *geo.sizes)
    node = helper.make_node("AveragePool", ["x"], ["y"])
    node.attribute.extend(ctx.node.attribute)
    graph = helper.make_graph(
        [node],
        "counts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ctx.opset)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ratio = np.asarray(session.run(None, {"x": np.ones(shape, np.float32)})[0], np.float64)[0, 0]
    inside = np.ones((), dtype=np.float64)
    layout = zip(
        geo.sizes, geo.outputs, geo.kernel, geo.strides, geo.dilations, geo.begins, strict=True
    )
    for h, o, k, s, d, p in layout:
        taps = np.arange(o)[:, None] * s - p + np.arange(k)[None, :] * d
        inside = np.multiply.outer(inside, ((taps >= 0) & (taps < h)).sum(axis=1))
    reciprocal: np.ndarray = np.divide(ratio, inside, out=np.zeros_like(ratio), where=inside > 0)
    return reciprocal


def _global_average_pool(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    spatial = ctx.dims(ctx.x)[2:]
    if any(d is None for d in spatial):
        raise ctx.refuse("spatial sizes that follow the batch")
    scale = ctx.scalar(1 / math.prod(d for d in spatial if d is not None))
    return {0: emit.op("Expand", [emit.op("Mul", [ctx.g, scale]), emit.shape(ctx.x)])}


def _batch_norm(ctx: Context) -> dict[int, str]:
    """Inference mode: a per-channel scale, scale / sqrt(var + epsilon), folded at build time."""
    if ctx.attr("training_mode", 0) or any(ctx.node.output[1:]):
        raise ctx.refuse("training mode")
    gamma = ctx.require_const(1, "scale").astype(np.float64)
    variance = ctx.require_const(4, "variance").astype(np.float64)
    factor = gamma / np.sqrt(variance + float(ctx.attr("epsilon", 1e-5)))
    rank = len(ctx.dims(ctx.x))
    dtype = helper.tensor_dtype_to_np_dtype(ctx.dtype(ctx.x))
    scale = ctx.emit.constant(factor.reshape(-1, *[1] * (rank - 2)).astype(dtype))
    return {0: ctx.emit.op("Mul", [ctx.g, scale])}


RULES: dict[str, Rule] = {
    "Conv": Rule(_conv),
    "MaxPool": Rule(_max_pool),
    "AveragePool": Rule(_average_pool),
    "GlobalAveragePool": Rule(_global_average_pool),
    "BatchNormalization": Rule(_batch_norm),
}
