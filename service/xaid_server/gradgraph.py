"""`xaid gradgraph model.onnx -o model.grad.onnx`: export a model's gradient graph.

The server builds the same graph when a repository has none; exporting it ahead of time lets it
be inspected, versioned and shipped next to the model. Exit codes: 0 written, 1 the model cannot
be differentiated (the message names the op and node), 2 a file could not be read or written.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

import onnx
from google.protobuf.message import DecodeError

from xaid_server.errors import XaidError
from xaid_server.graphs.gradient import PREFIX, RELU_RULES, build_gradient_graph


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xaid gradgraph",
        description="Write the model plus its backward pass (standard ONNX ops only): inputs "
        "gain `target` (int64 class index per row), outputs gain `gradient`.",
    )
    parser.add_argument("model", help="the ONNX model to differentiate")
    parser.add_argument(
        "-o",
        dest="destination",
        required=True,
        metavar="FILE",
        help="where to write the gradient graph",
    )
    parser.add_argument(
        "--wrt",
        help="the input or intermediate tensor to differentiate with respect to "
        "(default: the first input)",
    )
    parser.add_argument(
        "--output", help="the output whose score is differentiated (default: the first)"
    )
    parser.add_argument(
        "--relu",
        choices=RELU_RULES,
        default="standard",
        help="ReLU backward rule (default: standard)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = onnx.load(args.model)
    except (OSError, DecodeError, ValueError) as exc:
        print(f"xaid gradgraph: cannot read {args.model}: {exc}", file=sys.stderr)
        return 2
    try:
        graph = build_gradient_graph(model, wrt=args.wrt, output=args.output, relu=args.relu)
    except XaidError as exc:
        print(f"xaid gradgraph: {exc.message}", file=sys.stderr)
        return 1
    try:
        onnx.save(graph, args.destination)
    except OSError as exc:
        print(f"xaid gradgraph: cannot write {args.destination}: {exc}", file=sys.stderr)
        return 2
    ops = Counter(node.op_type for node in model.graph.node)
    added = sum(node.name.startswith(PREFIX) for node in graph.graph.node)
    summary = ", ".join(f"{op} {count}" for op, count in sorted(ops.items()))
    print(
        f"{args.destination}: {sum(ops.values())} nodes ({summary}), {added} nodes added "
        f"for the gradient ({args.relu} ReLU rule)"
    )
    return 0
