"""Backward rules for elementwise, linear-algebra, shape and reduction ops.

ReLU-style masks are `Mul(g, Cast(Greater(x, 0)))` rather than `Where`, which onnxruntime's CPU
provider runs about ten times slower. Comparisons are strict, as in torch's `threshold_backward`
and `hardtanh_backward`, so a gradient at an activation's kink is zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from onnx import helper

from xaid_server.graphs.gradient.emit import Context, Rule, unbroadcast

RELU_RULES = ("standard", "guided", "deconvnet")
BOTH = frozenset({0, 1})


def _scaled(ctx: Context, factor: Callable[[], str], *, relu_like: bool) -> dict[int, str]:
    """g times the activation's derivative; guided/deconvnet variants for ReLU-like ones.

    Guided backprop keeps the derivative and passes only positive incoming gradient; deconvnet
    passes the positive incoming gradient and ignores the forward input.
    """
    if relu_like and ctx.relu == "deconvnet":
        return {0: ctx.emit.op("Relu", [ctx.g])}
    g = ctx.emit.op("Relu", [ctx.g]) if relu_like and ctx.relu == "guided" else ctx.g
    return {0: ctx.emit.op("Mul", [g, factor()])}


def _mask(ctx: Context, condition: str) -> str:
    return ctx.emit.op("Cast", [condition], to=ctx.dtype(ctx.x))


def _relu(ctx: Context) -> dict[int, str]:
    """The mask reads the output (y > 0 exactly where x > 0): the input, often a convolution's
    output, need not be kept, and onnxruntime can fuse the ReLU into that convolution."""
    return _scaled(
        ctx, lambda: _mask(ctx, ctx.emit.op("Greater", [ctx.y, ctx.scalar(0)])), relu_like=True
    )


def _leaky_relu(ctx: Context) -> dict[int, str]:
    alpha = float(ctx.attr("alpha", 0.01))

    def factor() -> str:  # 1 where x > 0, else alpha: alpha + (1 - alpha) * mask
        mask = _mask(ctx, ctx.emit.op("Greater", [ctx.x, ctx.scalar(0)]))
        return ctx.emit.op(
            "Add", [ctx.emit.op("Mul", [mask, ctx.scalar(1 - alpha)]), ctx.scalar(alpha)]
        )

    return _scaled(ctx, factor, relu_like=True)


def _clip(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    low = float(ctx.require_const(1, "min")) if ctx.input(1) else None
    high = float(ctx.require_const(2, "max")) if ctx.input(2) else None
    if low is None and high is None:
        return {0: ctx.g}

    def inside() -> str:
        bounds = []
        if low is not None:
            bounds.append(emit.op("Greater", [ctx.x, ctx.scalar(low)]))
        if high is not None:
            bounds.append(emit.op("Less", [ctx.x, ctx.scalar(high)]))
        return _mask(ctx, bounds[0] if len(bounds) == 1 else emit.op("And", bounds))

    return _scaled(ctx, inside, relu_like=low == 0)


def _hard_sigmoid(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    # alpha * x + beta in (0, 1), written as bounds on x (alpha > 0 in every exporter's use)
    low, high = -beta / alpha, (1 - beta) / alpha
    inside = emit.op(
        "And",
        [
            emit.op("Greater", [ctx.x, ctx.scalar(min(low, high))]),
            emit.op("Less", [ctx.x, ctx.scalar(max(low, high))]),
        ],
    )
    return {0: emit.op("Mul", [ctx.g, emit.op("Mul", [_mask(ctx, inside), ctx.scalar(alpha)])])}


def _hard_swish(ctx: Context) -> dict[int, str]:
    """torch's hardswish_backward: 0 below -3, x/3 + 1/2 on [-3, 3], 1 above 3."""
    emit, x = ctx.emit, ctx.x
    middle = emit.op(
        "Mul",
        [
            _mask(ctx, emit.op("LessOrEqual", [x, ctx.scalar(3)])),
            emit.op("Add", [emit.op("Mul", [x, ctx.scalar(1 / 3)]), ctx.scalar(0.5)]),
        ],
    )
    upper = _mask(ctx, emit.op("Greater", [x, ctx.scalar(3)]))
    lower = _mask(ctx, emit.op("GreaterOrEqual", [x, ctx.scalar(-3)]))
    factor = emit.op("Mul", [lower, emit.op("Add", [middle, upper])])
    return {0: emit.op("Mul", [ctx.g, factor])}


def _sigmoid(ctx: Context) -> dict[int, str]:
    emit, y = ctx.emit, ctx.y
    slope = emit.op("Mul", [y, emit.op("Sub", [ctx.scalar(1), y])])
    return {0: emit.op("Mul", [ctx.g, slope])}


def _tanh(ctx: Context) -> dict[int, str]:
    emit, y = ctx.emit, ctx.y
    slope = emit.op("Sub", [ctx.scalar(1), emit.op("Mul", [y, y])])
    return {0: emit.op("Mul", [ctx.g, slope])}


def _exp(ctx: Context) -> dict[int, str]:
    return {0: ctx.emit.op("Mul", [ctx.g, ctx.y])}


def _log(ctx: Context) -> dict[int, str]:
    return {0: ctx.emit.op("Div", [ctx.g, ctx.x])}


def _sqrt(ctx: Context) -> dict[int, str]:
    return {0: ctx.emit.op("Div", [ctx.emit.op("Mul", [ctx.g, ctx.scalar(0.5)]), ctx.y])}


def _reciprocal(ctx: Context) -> dict[int, str]:
    emit, y = ctx.emit, ctx.y
    return {0: emit.op("Neg", [emit.op("Mul", [ctx.g, emit.op("Mul", [y, y])])])}


def _neg(ctx: Context) -> dict[int, str]:
    return {0: ctx.emit.op("Neg", [ctx.g])}


def _gaussian(ctx: Context, scale: float) -> str:
    """exp(-scale * x^2), the shared factor of the Erf and Gelu derivatives."""
    emit, x = ctx.emit, ctx.x
    return emit.op("Exp", [emit.op("Mul", [emit.op("Mul", [x, x]), ctx.scalar(-scale)])])


def _erf(ctx: Context) -> dict[int, str]:
    slope = ctx.emit.op("Mul", [_gaussian(ctx, 1.0), ctx.scalar(2 / math.sqrt(math.pi))])
    return {0: ctx.emit.op("Mul", [ctx.g, slope])}


def _gelu(ctx: Context) -> dict[int, str]:
    emit, x = ctx.emit, ctx.x
    if ctx.attr("approximate", b"none").decode() == "tanh":
        # y = x/2 (1 + t), t = tanh(k (x + c x^3)): y' = (1 + t)/2 + x/2 (1 - t^2) k (1 + 3c x^2)
        k, c = math.sqrt(2 / math.pi), 0.044715
        square = emit.op("Mul", [x, x])
        inner = emit.op(
            "Mul", [x, emit.op("Add", [emit.op("Mul", [square, ctx.scalar(c)]), ctx.scalar(1)])]
        )
        t = emit.op("Tanh", [emit.op("Mul", [inner, ctx.scalar(k)])])
        half = emit.op("Mul", [emit.op("Add", [t, ctx.scalar(1)]), ctx.scalar(0.5)])
        sech2 = emit.op("Sub", [ctx.scalar(1), emit.op("Mul", [t, t])])
        dinner = emit.op("Add", [emit.op("Mul", [square, ctx.scalar(3 * c * k)]), ctx.scalar(k)])
        rest = emit.op(
            "Mul", [emit.op("Mul", [x, ctx.scalar(0.5)]), emit.op("Mul", [sech2, dinner])]
        )
        slope = emit.op("Add", [half, rest])
    else:  # y = x Phi(x): y' = Phi(x) + x phi(x)
        erf = emit.op("Erf", [emit.op("Mul", [x, ctx.scalar(1 / math.sqrt(2))])])
        cdf = emit.op("Mul", [emit.op("Add", [erf, ctx.scalar(1)]), ctx.scalar(0.5)])
        pdf = emit.op("Mul", [_gaussian(ctx, 0.5), ctx.scalar(1 / math.sqrt(2 * math.pi))])
        slope = emit.op("Add", [cdf, emit.op("Mul", [x, pdf])])
    return {0: emit.op("Mul", [ctx.g, slope])}


def _identity(ctx: Context) -> dict[int, str]:
    return {0: ctx.g}


def _dropout(ctx: Context) -> dict[int, str]:
    if ctx.input(2) and bool(ctx.require_const(2, "training_mode")):
        raise ctx.refuse("training mode")
    return {0: ctx.g}


def _cast(ctx: Context) -> dict[int, str]:
    source = ctx.dtype(ctx.x)
    if source == ctx.dtype(ctx.y):
        return {0: ctx.g}
    return {0: ctx.emit.op("Cast", [ctx.g], to=source)}


def _add(ctx: Context) -> dict[int, str]:
    """Add and Sum: the gradient itself, summed back to each operand's shape."""
    return {i: _back(ctx, ctx.g, i) for i in ctx.wanted}


def _sub(ctx: Context) -> dict[int, str]:
    grads = {}
    if 0 in ctx.wanted:
        grads[0] = _back(ctx, ctx.g, 0)
    if 1 in ctx.wanted:
        grads[1] = ctx.emit.op("Neg", [_back(ctx, ctx.g, 1)])
    return grads


def _mul(ctx: Context) -> dict[int, str]:
    a, b = ctx.node.input
    return {i: _back(ctx, ctx.emit.op("Mul", [ctx.g, b if i == 0 else a]), i) for i in ctx.wanted}


def _div(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    quotient = emit.op("Div", [ctx.g, ctx.node.input[1]])
    grads = {}
    if 0 in ctx.wanted:
        grads[0] = _back(ctx, quotient, 0)
    if 1 in ctx.wanted:  # d(a/b)/db = -(a/b)/b
        grads[1] = _back(ctx, emit.op("Neg", [emit.op("Mul", [quotient, ctx.y])]), 1)
    return grads


def _pow(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    dtype = helper.tensor_dtype_to_np_dtype(ctx.dtype(ctx.x))
    exponent = np.asarray(ctx.require_const(1, "exponent"), dtype=np.float64)
    power = emit.op("Pow", [ctx.x, emit.constant((exponent - 1).astype(dtype))])
    slope = emit.op("Mul", [power, emit.constant(exponent.astype(dtype))])
    return {0: _back(ctx, emit.op("Mul", [ctx.g, slope]), 0)}


def _where(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    condition, zero = ctx.node.input[0], ctx.emit.scalar(0, ctx.dtype(ctx.y))
    grads = {}
    if 1 in ctx.wanted:
        grads[1] = _back(ctx, emit.op("Where", [condition, ctx.g, zero]), 1)
    if 2 in ctx.wanted:
        grads[2] = _back(ctx, emit.op("Where", [condition, zero, ctx.g]), 2)
    return grads


def _back(ctx: Context, grad: str, index: int) -> str:
    """A gradient shaped like the broadcast output, summed back to input `index`."""
    operand = ctx.node.input[index]
    return unbroadcast(ctx.emit, grad, ctx.dims(ctx.y), ctx.dims(operand))


def _matmul(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    a, b = ctx.node.input
    a_dims, b_dims, batch = ctx.dims(a), ctx.dims(b), ctx.dims(ctx.y)[:-2]
    if len(a_dims) < 2 or len(b_dims) < 2:
        raise ctx.refuse("1-D operands")
    grads = {}
    if 0 in ctx.wanted:  # dA = g B^T
        grad = emit.op("MatMul", [ctx.g, _transposed(ctx, 1)])
        grads[0] = unbroadcast(emit, grad, batch + a_dims[-2:], a_dims)
    if 1 in ctx.wanted:  # dB = A^T g
        grad = emit.op("MatMul", [_transposed(ctx, 0), ctx.g])
        grads[1] = unbroadcast(emit, grad, batch + b_dims[-2:], b_dims)
    return grads


def _transposed(ctx: Context, index: int) -> str:
    """An operand with its last two axes swapped, folded at build time when constant."""
    value = ctx.const(index)
    if value is not None:
        return ctx.emit.constant(np.swapaxes(value, -1, -2))
    rank = len(ctx.dims(ctx.node.input[index]))
    perm = [*range(rank - 2), rank - 1, rank - 2]
    return ctx.emit.op("Transpose", [ctx.node.input[index]], perm=perm)


def _gemm(ctx: Context) -> dict[int, str]:
    """Y = alpha op(A) op(B) + beta C, each gradient one Gemm with the transposes chosen."""
    emit, g = ctx.emit, ctx.g
    a, b = ctx.node.input[:2]
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    grads = {}
    if 0 in ctx.wanted:
        if trans_a:  # A^T: dA = alpha op(B) g^T
            grads[0] = emit.op("Gemm", [b, g], alpha=alpha, transA=trans_b, transB=1)
        else:  # dA = alpha g op(B)^T
            grads[0] = emit.op("Gemm", [g, b], alpha=alpha, transB=1 - trans_b)
    if 1 in ctx.wanted:
        if trans_b:  # B^T: dB = alpha g^T op(A)
            grads[1] = emit.op("Gemm", [g, a], alpha=alpha, transA=1, transB=trans_a)
        else:  # dB = alpha op(A)^T g
            grads[1] = emit.op("Gemm", [a, g], alpha=alpha, transA=1 - trans_a)
    if 2 in ctx.wanted:
        scaled = g if beta == 1 else emit.op("Mul", [g, ctx.emit.scalar(beta, ctx.dtype(ctx.y))])
        grads[2] = _back(ctx, scaled, 2)
    return grads


def _reshape(ctx: Context) -> dict[int, str]:
    """Reshape, Flatten, Squeeze, Unsqueeze: back to the input's run-time shape."""
    return {0: ctx.emit.op("Reshape", [ctx.g, ctx.emit.shape(ctx.x)])}


def _transpose(ctx: Context) -> dict[int, str]:
    rank = len(ctx.dims(ctx.x))
    perm = ctx.attr("perm", list(reversed(range(rank))))
    return {0: ctx.emit.op("Transpose", [ctx.g], perm=[int(i) for i in np.argsort(perm)])}


def _axis(ctx: Context, rank: int, default: int = 0) -> int:
    axis = int(ctx.attr("axis", default))
    return axis + rank if axis < 0 else axis


def _concat(ctx: Context) -> dict[int, str]:
    axis = _axis(ctx, len(ctx.dims(ctx.y)))
    sizes = [ctx.dims(name)[axis] for name in ctx.node.input]
    if any(size is None for size in sizes):
        raise ctx.refuse("concatenation along an axis that follows the batch")
    parts = ctx.emit.ops(
        "Split", [ctx.g, ctx.emit.ints([s for s in sizes if s is not None])], len(sizes), axis=axis
    )
    return {i: parts[i] for i in ctx.wanted}


def _split(ctx: Context) -> dict[int, str]:
    emit = ctx.emit
    axis = _axis(ctx, len(ctx.dims(ctx.x)))
    zero = helper.make_tensor("zero", ctx.dtype(ctx.x), [1], [0])
    parts = [
        grad or emit.op("ConstantOfShape", [emit.shape(out)], value=zero)
        for grad, out in zip(ctx.grads, ctx.node.output, strict=True)
    ]
    return {0: emit.op("Concat", parts, axis=axis)}


def _slice(ctx: Context) -> dict[int, str]:
    """Pad the gradient back with zeros where the slice cut the input (steps of 1 only)."""
    dims = ctx.dims(ctx.x)
    starts, ends = ctx.require_const(1, "starts"), ctx.require_const(2, "ends")
    axes = ctx.const(3) if ctx.input(3) else np.arange(len(starts))
    steps = ctx.const(4) if ctx.input(4) else np.ones(len(starts), dtype=np.int64)
    if axes is None or steps is None:
        raise ctx.refuse("needs constant axes and steps")
    if np.any(steps != 1):
        raise ctx.refuse("steps other than 1")
    before, after = [0] * len(dims), [0] * len(dims)
    for start, end, axis in zip(starts.tolist(), ends.tolist(), axes.tolist(), strict=True):
        axis = axis + len(dims) if axis < 0 else axis
        size = dims[axis]
        if size is None:
            raise ctx.refuse("a slice along an axis that follows the batch")
        first = min(max(start + size if start < 0 else start, 0), size)
        last = min(max(end + size if end < 0 else end, first), size)
        before[axis], after[axis] = first, size - last
    return {0: ctx.emit.op("Pad", [ctx.g, ctx.emit.ints(before + after)])}


def _pad(ctx: Context) -> dict[int, str]:
    """Crop the gradient with negative pads (constant mode only)."""
    if ctx.attr("mode", b"constant").decode() != "constant":
        raise ctx.refuse("modes other than constant")
    rank = len(ctx.dims(ctx.x))
    pads = ctx.require_const(1, "pads").tolist()
    axes = ctx.require_const(3, "axes").tolist() if ctx.input(3) else list(range(rank))
    crop = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        axis = axis + rank if axis < 0 else axis
        crop[axis], crop[rank + axis] = -pads[i], -pads[len(axes) + i]
    return {0: ctx.emit.op("Pad", [ctx.g, ctx.emit.ints(crop)])}


def _expand(ctx: Context) -> dict[int, str]:
    return {0: _back(ctx, ctx.g, 0)}


def _reduce(ctx: Context) -> dict[int, str]:
    """ReduceSum and ReduceMean: broadcast the gradient back over the reduced axes."""
    emit = ctx.emit
    dims = ctx.dims(ctx.x)
    axes = ctx.require_const(1, "axes").tolist() if ctx.input(1) else list(ctx.attr("axes", []))
    if not axes:
        if ctx.attr("noop_with_empty_axes", 0):
            return {0: ctx.g}
        axes = list(range(len(dims)))
    axes = sorted(a + len(dims) if a < 0 else a for a in axes)
    grad = ctx.g
    if ctx.node.op_type == "ReduceMean":
        sizes = [dims[a] for a in axes]
        if any(size is None for size in sizes):
            raise ctx.refuse("a mean over an axis that follows the batch")
        grad = emit.op("Mul", [grad, ctx.scalar(1 / math.prod(s for s in sizes if s is not None))])
    if not ctx.attr("keepdims", 1):
        grad = emit.op("Unsqueeze", [grad, emit.ints(axes)])
    return {0: emit.op("Expand", [grad, emit.shape(ctx.x)])}


def _softmax(ctx: Context) -> dict[int, str]:
    emit, y = ctx.emit, ctx.y
    axis = _axis(ctx, len(ctx.dims(y)), default=-1)
    dot = emit.reduce_sum(emit.op("Mul", [ctx.g, y]), [axis], keepdims=True)
    return {0: emit.op("Mul", [y, emit.op("Sub", [ctx.g, dot])])}


def _log_softmax(ctx: Context) -> dict[int, str]:
    emit, y = ctx.emit, ctx.y
    axis = _axis(ctx, len(ctx.dims(y)), default=-1)
    total = emit.reduce_sum(ctx.g, [axis], keepdims=True)
    return {0: emit.op("Sub", [ctx.g, emit.op("Mul", [emit.op("Exp", [y]), total])])}


def _layer_norm(ctx: Context) -> dict[int, str]:
    """dx = inv (gs - mean(gs) - xhat mean(gs xhat)), gs = g scale, over the normalised axes."""
    emit, x = ctx.emit, ctx.x
    dims = ctx.dims(x)
    axis = _axis(ctx, len(dims), default=-1)
    if len(ctx.node.output) > 1 and any(ctx.grads[1:]):
        raise ctx.refuse("gradients through the Mean/InvStdDev outputs")
    sizes = dims[axis:]
    if any(size is None for size in sizes):
        raise ctx.refuse("normalisation over an axis that follows the batch")
    axes, count = list(range(axis, len(dims))), math.prod(s for s in sizes if s is not None)
    epsilon = float(ctx.attr("epsilon", 1e-5))

    def mean(tensor: str) -> str:
        return emit.op("Mul", [emit.reduce_sum(tensor, axes, keepdims=True), ctx.scalar(1 / count)])

    centered = emit.op("Sub", [x, mean(x)])
    variance = mean(emit.op("Mul", [centered, centered]))
    inv = emit.op(
        "Reciprocal", [emit.op("Sqrt", [emit.op("Add", [variance, ctx.scalar(epsilon)])])]
    )
    xhat = emit.op("Mul", [centered, inv])
    scaled = emit.op("Mul", [ctx.g, ctx.node.input[1]])
    inner = emit.op(
        "Sub",
        [
            emit.op("Sub", [scaled, mean(scaled)]),
            emit.op("Mul", [xhat, mean(emit.op("Mul", [scaled, xhat]))]),
        ],
    )
    return {0: emit.op("Mul", [inv, inner])}


RULES: dict[str, Rule] = {
    "Relu": Rule(_relu),
    "LeakyRelu": Rule(_leaky_relu),
    "Clip": Rule(_clip),
    "HardSigmoid": Rule(_hard_sigmoid),
    "HardSwish": Rule(_hard_swish),
    "Sigmoid": Rule(_sigmoid),
    "Tanh": Rule(_tanh),
    "Exp": Rule(_exp),
    "Log": Rule(_log),
    "Sqrt": Rule(_sqrt),
    "Reciprocal": Rule(_reciprocal),
    "Neg": Rule(_neg),
    "Erf": Rule(_erf),
    "Gelu": Rule(_gelu),
    "Identity": Rule(_identity),
    "Dropout": Rule(_dropout),
    "Cast": Rule(_cast),
    "CastLike": Rule(_cast),
    "Add": Rule(_add, BOTH),
    "Sub": Rule(_sub, BOTH),
    "Mul": Rule(_mul, BOTH),
    "Div": Rule(_div, BOTH),
    "Sum": Rule(_add, None),
    "Pow": Rule(_pow),
    "Where": Rule(_where, frozenset({1, 2})),
    "MatMul": Rule(_matmul, BOTH),
    "Gemm": Rule(_gemm, frozenset({0, 1, 2})),
    "Flatten": Rule(_reshape),
    "Reshape": Rule(_reshape),
    "Squeeze": Rule(_reshape),
    "Unsqueeze": Rule(_reshape),
    "Transpose": Rule(_transpose),
    "Concat": Rule(_concat, None),
    "Split": Rule(_split),
    "Slice": Rule(_slice),
    "Pad": Rule(_pad),
    "Expand": Rule(_expand),
    "ReduceSum": Rule(_reduce),
    "ReduceMean": Rule(_reduce),
    "Softmax": Rule(_softmax),
    "LogSoftmax": Rule(_log_softmax),
    "LayerNormalization": Rule(_layer_norm),
}
