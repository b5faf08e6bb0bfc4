"""The `xaid` command: list models, predict and explain against a server, or start one.

Exit codes: 0 success, 1 the server or a file refused the work, 2 a usage error.
`xaid serve ...` and `xaid gradgraph ...` hand every argument to the server package's own
command lines (the server extra).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import grpc
import numpy as np

from xaid._client import DEFAULT_TARGET, Client
from xaid._requests import ModelInput, Text, explain_methods
from xaid._results import Explanation, ModelInfo, Prediction
from xaid._tls import tls_credentials
from xaid.errors import XaidError

_SERVER_EXTRA_HINT = "xaid {command} needs the server extra: pip install 'xaid[server]'"
#: Commands that run server code, and the module whose `main(argv)` each hands its arguments to.
_SERVER_COMMANDS = {"serve": "xaid_server.__main__", "gradgraph": "xaid_server.gradgraph"}
#: Top-level packages that only the server extra installs.
_SERVER_MODULES = frozenset(
    {
        "xaid_server",
        "onnxruntime",
        "onnx",
        "yaml",
        "prometheus_client",
        "grpc_health",
        "grpc_reflection",
        "grpc_status",
    }
)
_GLOBAL_OPTIONS_WITH_VALUE = (
    "--server",
    "--timeout",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
    "--token",
)


class _UsageError(Exception):
    """Bad arguments found after parsing (exit code 2, like argparse's own)."""


# ---- serve ----


def _server_command(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """The server command and the arguments after it when one is the subcommand, else None.

    Done before argparse so that `xaid serve --help` reaches the server's parser untouched.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return (arg, list(argv[i + 1 :])) if arg in _SERVER_COMMANDS else None
    return None


def _run_server_command(command: str, rest: list[str]) -> int:
    try:
        module = importlib.import_module(_SERVER_COMMANDS[command])
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in _SERVER_MODULES:
            raise
        print(_SERVER_EXTRA_HINT.format(command=command), file=sys.stderr)
        return 2
    command_main = cast(Callable[[list[str]], int | None], module.main)
    return int(command_main(rest) or 0)


# ---- argument parsing ----


def _parse_scalar(text: str) -> object:
    lowered = text.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_param(text: str) -> tuple[list[str], object]:
    """`key=value` as (key path, value): ints, floats, booleans, comma lists, else a string.

    A dotted key (`segmentation.n_segments=50`) addresses a field of a nested message.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    parsed: object
    if "," in value:
        parsed = [_parse_scalar(v) for v in value.split(",") if v.strip()]
    else:
        parsed = _parse_scalar(value)
    return key.strip().split("."), parsed


def _nest(params: dict[str, object], path: list[str], value: object) -> None:
    node = params
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _UsageError(f"--param {'.'.join(path)}: {part} is not a message")
        node = child
    node[path[-1]] = value


def _add_connection_arguments(parser: argparse.ArgumentParser, default_server: str) -> None:
    parser.add_argument(
        "--server",
        metavar="ADDRESS",
        default=default_server,
        help=f"server address host:port (default: $XAID_SERVER or {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout", metavar="SECONDS", type=float, help="per-call deadline")
    parser.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA bundle")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--token", metavar="TOKEN", help="bearer token (default: $XAID_TOKEN)")


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS when any TLS option is given (the system's roots without --tls-ca), else plaintext."""
    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xaid", description="Predictions and explanations of ONNX models over gRPC."
    )
    _add_connection_arguments(parser, os.environ.get("XAID_SERVER") or DEFAULT_TARGET)
    # The same options after the command name; SUPPRESS keeps the top level's values otherwise.
    connection = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add_connection_arguments(connection, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="start a server (arguments go to the server)")
    commands.add_parser(
        "gradgraph", help="export the gradient graph of an ONNX model (see gradgraph --help)"
    )

    models = commands.add_parser("models", parents=[connection], help="list the served models")
    models.add_argument("--json", action="store_true", help="print JSON")

    predict = commands.add_parser(
        "predict", parents=[connection], help="model outputs and top classes"
    )
    _add_input_arguments(predict)
    predict.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per row")
    predict.add_argument("--json", action="store_true", help="print JSON with the outputs")

    methods = explain_methods()
    explain = commands.add_parser(
        "explain",
        parents=[connection],
        help="attribute a prediction to the input",
        epilog="methods and their --param keys: "
        + "; ".join(f"{m} ({', '.join(p) or '-'})" for m, p in methods.items()),
    )
    _add_input_arguments(explain)
    explain.add_argument("--method", default="occlusion", choices=list(methods))
    explain.add_argument("--out", type=Path, metavar="PNG", help="write the heatmap here")
    explain.add_argument(
        "--window", type=int, nargs="+", metavar="N", help="occlusion window, e.g. 8 8"
    )
    explain.add_argument(
        "--stride", type=int, nargs="+", metavar="N", help="occlusion stride, e.g. 4 4"
    )
    explain.add_argument("--baseline", type=float, metavar="V", help="baseline input value")
    explain.add_argument(
        "--samples", type=int, metavar="N", help="samples (lime, kernel_shap, smoothgrad)"
    )
    explain.add_argument(
        "--segmentation",
        choices=["slic", "quickshift", "grid"],
        help="image segments for lime and kernel_shap",
    )
    explain.add_argument("--target", type=int, metavar="CLASS", help="class index to explain")
    explain.add_argument("--output", default="", metavar="NAME", help="model output to explain")
    explain.add_argument("--seed", type=int, metavar="S", help="random seed")
    explain.add_argument("--input", default="", metavar="NAME", help="model input to explain")
    explain.add_argument("--evaluate", action="store_true", help="add deletion/insertion AUCs")
    explain.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any method parameter, e.g. n_steps=32 or window=8,8 (repeatable)",
    )
    explain.add_argument(
        "--save-attribution", type=Path, metavar="NPY", help="save the attribution array"
    )
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="M", help="model name")
    parser.add_argument("--model-version", default="", metavar="V", help="model version")
    parser.add_argument("image", nargs="?", type=Path, metavar="IMAGE", help="PNG or JPEG file")
    parser.add_argument("--npy", type=Path, metavar="FILE", help="input array (.npy)")
    parser.add_argument(
        "--text", action="append", metavar="TEXT", help="text for a text model (repeat for rows)"
    )


def _load_input(args: argparse.Namespace) -> ModelInput:
    if sum(given is not None for given in (args.image, args.npy, args.text)) != 1:
        raise _UsageError("give one of IMAGE, --npy FILE or --text TEXT")
    if args.text is not None:
        return Text(args.text)
    if args.npy is not None:
        array: np.ndarray = np.load(args.npy, allow_pickle=False)
        return array
    path: Path = args.image
    return path.read_bytes()


# ---- commands ----


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=_json_default))


def _provider(info: ModelInfo) -> str:
    return info.execution_provider.removesuffix("ExecutionProvider")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _models(client: Client, args: argparse.Namespace) -> int:
    infos = client.models()
    if args.json:
        _print_json(
            [
                {
                    "name": i.name,
                    "version": i.version,
                    "versions": list(i.versions),
                    "kind": i.kind,
                    "execution_provider": i.execution_provider,
                    "inputs": [str(s) for s in i.inputs],
                    "outputs": [str(s) for s in i.outputs],
                    "methods": list(i.methods),
                    "ready": i.ready,
                }
                for i in infos
            ]
        )
        return 0
    if not infos:
        print("no models")
        return 0
    rows = [["NAME", "VERSION", "KIND", "PROVIDER", "INPUTS", "METHODS"]]
    for i in infos:
        inputs = ", ".join(str(s) for s in i.inputs)
        rows.append([i.name, i.version, i.kind, _provider(i), inputs, ",".join(i.methods)])
    print(_table(rows))
    return 0


def _predict(client: Client, args: argparse.Namespace) -> int:
    prediction = client.predict(
        args.model, _load_input(args), top_k=args.top_k, version=args.model_version
    )
    if args.json:
        _print_json(_prediction_json(prediction))
        return 0
    _print_request_id(prediction.request_id)
    print(f"model {prediction.model} (version {prediction.version})")
    for row, scores in enumerate(prediction.top):
        if len(prediction.top) > 1:
            print(f"row {row}:")
        if row < len(prediction.tokens):
            print("tokens: " + " ".join(prediction.tokens[row]))
        rows = [["CLASS", "LABEL", "PROBABILITY", "SCORE"]]
        rows += [[str(s.index), s.label, f"{s.probability:.4f}", f"{s.score:.4f}"] for s in scores]
        print(_table(rows))
    if not prediction.top:
        for name, value in prediction.outputs.items():
            print(f"{name}: {np.array2string(value, precision=4, threshold=50)}")
    return 0


def _print_request_id(request_id: str) -> None:
    """On stderr, so the answer on stdout reads the same; it names the call's audit record."""
    print(f"request id: {request_id}", file=sys.stderr)


def _prediction_json(prediction: Prediction) -> dict[str, Any]:
    return {
        "request_id": prediction.request_id,
        "model": prediction.model,
        "version": prediction.version,
        "top": [
            [
                {
                    "index": s.index,
                    "label": s.label,
                    "probability": s.probability,
                    "score": s.score,
                }
                for s in scores
            ]
            for scores in prediction.top
        ],
        "outputs": {
            name: {"shape": list(value.shape), "data": value}
            for name, value in prediction.outputs.items()
        },
        "tokens": prediction.tokens,
    }


class ProgressBar:
    """A one-line `[#####-----] 120/225 1.2s` bar, redrawn at most ten times a second."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if not finished and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        filled = round(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{total} {now - self.start:.1f}s")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _explain_params(args: argparse.Namespace) -> dict[str, object]:
    params: dict[str, object] = {}
    for name in ("window", "stride", "baseline"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.samples is not None:
        params["n_samples"] = args.samples
    if args.segmentation is not None:
        params["segmentation"] = {"algorithm": args.segmentation}
    for path, value in args.param:
        _nest(params, path, value)
    return params


def _heatmap_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def _explain(client: Client, args: argparse.Namespace) -> int:
    x = _load_input(args)
    bar = None if args.no_progress else ProgressBar(sys.stderr)
    try:
        explanation = client.explain(
            args.model,
            x,
            args.method,
            target=args.target,
            output=args.output,
            seed=args.seed,
            render=args.out is not None,
            evaluate=args.evaluate,
            version=args.model_version,
            input=args.input,
            progress=bar,
            **_explain_params(args),
        )
    finally:
        if bar is not None:
            bar.close()
    written: list[Path] = []
    if args.out is not None:
        if not explanation.heatmap_png:
            print("warning: the server returned no heatmap", file=sys.stderr)
        for path, png in zip(
            _heatmap_paths(args.out, len(explanation.heatmap_png)),
            explanation.heatmap_png,
            strict=True,
        ):
            path.write_bytes(png)
            written.append(path)
    if args.save_attribution is not None:
        np.save(args.save_attribution, explanation.attribution)
    if args.json:
        _print_json(_explanation_json(explanation, written, args.save_attribution))
    else:
        _print_request_id(explanation.request_id)
        _print_explanation(explanation, written, args.save_attribution)
    return 0


def _explanation_json(
    explanation: Explanation, heatmaps: list[Path], attribution_path: Path | None
) -> dict[str, Any]:
    faithfulness = explanation.faithfulness
    return {
        "request_id": explanation.request_id,
        "model": explanation.model,
        "version": explanation.version,
        "method": explanation.method,
        "parameters": explanation.parameters,
        "target": {
            "output": explanation.target.output,
            "class_indices": list(explanation.target.class_indices),
            "labels": list(explanation.target.labels),
        },
        "seed": explanation.seed,
        "model_evaluations": explanation.model_evaluations,
        "timing": {
            "total_seconds": explanation.timing.total_seconds,
            "compute_seconds": explanation.timing.compute_seconds,
        },
        "aggregation": explanation.aggregation,
        "attribution_shape": list(explanation.attribution.shape),
        "convergence_delta": explanation.convergence_delta,
        "faithfulness": None
        if faithfulness is None
        else {
            "deletion_auc": list(faithfulness.deletion_auc),
            "insertion_auc": list(faithfulness.insertion_auc),
            "model_evaluations": faithfulness.model_evaluations,
        },
        "heatmaps": [str(p) for p in heatmaps],
        "attribution_file": None if attribution_path is None else str(attribution_path),
        "segments": [
            {
                "weights": list(s.weights),
                "names": list(s.names),
                "intercept": s.intercept,
                "score": s.score,
                "base_value": s.base_value,
            }
            for s in explanation.segments
        ],
        "tokens": [
            [{"token": token, "weight": weight} for token, weight in row]
            for row in _token_weights(explanation)
        ],
    }


def _token_weights(explanation: Explanation) -> list[list[tuple[str, float]]]:
    """Per row of a request that sent text, each token with its weight (padding left out)."""
    return [
        [(token, float(weight)) for token, weight in zip(tokens, segment.weights, strict=False)]
        for tokens, segment in zip(explanation.tokens, explanation.segments, strict=False)
    ]


def _print_explanation(
    explanation: Explanation, heatmaps: list[Path], attribution_path: Path | None
) -> None:
    target = explanation.target
    print(f"model {explanation.model} (version {explanation.version}), {explanation.method}")
    for row, index in enumerate(target.class_indices):
        label = target.labels[row] if row < len(target.labels) else ""
        prefix = f"row {row}: " if len(target.class_indices) > 1 else ""
        named = f" ({label})" if label and label != str(index) else ""
        print(f"{prefix}target class {index}{named} of output {target.output or '?'}")
    print(f"model evaluations: {explanation.model_evaluations}")
    timing = explanation.timing
    print(f"time: {timing.total_seconds:.2f}s (compute {timing.compute_seconds:.2f}s)")
    print(f"seed: {explanation.seed}")
    if explanation.convergence_delta:
        deltas = ", ".join(f"{d:.4g}" for d in explanation.convergence_delta)
        print(f"convergence delta: {deltas}")
    if explanation.faithfulness is not None:
        f = explanation.faithfulness
        print(
            "deletion AUC: "
            + ", ".join(f"{v:.4f}" for v in f.deletion_auc)
            + "; insertion AUC: "
            + ", ".join(f"{v:.4f}" for v in f.insertion_auc)
        )
    for row, weights in enumerate(_token_weights(explanation)):
        prefix = f"row {row}: " if len(explanation.segments) > 1 else ""
        print(prefix + " ".join(f"{token}({weight:+.3f})" for token, weight in weights))
    for path in heatmaps:
        print(f"heatmap: {path}")
    if attribution_path is not None:
        print(f"attribution: {attribution_path}")


_COMMANDS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "models": _models,
    "predict": _predict,
    "explain": _explain,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code instead of exiting (tests call it)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    server_command = _server_command(args_list)
    if server_command is not None:
        return _run_server_command(*server_command)
    parser = _build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        token = args.token or os.environ.get("XAID_TOKEN") or None
        with Client(
            args.server, timeout=args.timeout, credentials=_credentials(args), token=token
        ) as client:
            return _COMMANDS[args.command](client, args)
    except XaidError as err:
        print(f"error: {err.code.name}: {err.details}", file=sys.stderr)
        if err.request_id:
            _print_request_id(err.request_id)
        return 1
    except (_UsageError, ValueError) as err:
        print(f"xaid {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
