"""The Python client, sync and async, against a real server on the bundled demo models."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import yaml
from PIL import Image

import xaid
from tests.running_server import RunningServer

DEMO = Path(__file__).resolve().parents[2] / "service" / "xaid_server" / "demo"
EXAMPLES = DEMO / "examples"
# Coarse windows keep occlusion at a few dozen model evaluations.
WINDOW = (16, 16)
COARSE: dict[str, Any] = {"window": WINDOW, "stride": WINDOW}
UNREACHABLE = "127.0.0.1:1"


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[xaid.Client]:
    with xaid.Client(server_address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def shapes(client: xaid.Client) -> xaid.ModelInfo:
    return client.model("shapes")


def _tabular(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, 30), dtype=np.float32)


def _tabular_examples(rows: int = 2) -> np.ndarray:
    examples: np.ndarray = np.load(EXAMPLES / "tabular.npy")[:rows]
    return examples


def _images(rows: int = 1) -> np.ndarray:
    """Model-ready shapes inputs: float32 NCHW in [0, 1]."""
    return np.random.default_rng(1).random((rows, 3, 64, 64), dtype=np.float32)


def _check_top(prediction: xaid.Prediction, rows: int, labels: tuple[str, ...]) -> None:
    assert len(prediction.top) == rows
    for row, scores in enumerate(prediction.top):
        assert scores
        probabilities = [s.probability for s in scores]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        for score in scores:
            assert score.row == row
            if labels:
                assert score.label == labels[score.index]


# ---- watching the server work ----


def _explain_metrics(server: RunningServer) -> tuple[float, float]:
    """(explanations in flight, explanations cancelled by their client) on the server."""
    registry = server.server.metrics.registry
    inflight = registry.get_sample_value("xaid_inflight_requests", {"method": "explain"})
    cancelled = registry.get_sample_value(
        "xaid_cancelled_requests_total", {"method": "explain", "cause": "client"}
    )
    return float(inflight or 0.0), float(cancelled or 0.0)


def _wait_until_cancelled(server: RunningServer, cancelled_before: float) -> None:
    """Wait until the server has counted one more client cancellation and is idle again."""
    deadline = time.monotonic() + 10
    while _explain_metrics(server) != (0.0, cancelled_before + 1):
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not stop the explanation: {_explain_metrics(server)}")
        time.sleep(0.02)


def _assert_evaluations_stopped(seconds: float = 0.5) -> None:
    """The server runs in this process: once its evaluations stop, the process idles.

    A running occlusion keeps at least one core busy (a CPU-second per second, more with
    onnxruntime's intra-op threads); an idle server uses a few percent of one.
    """
    began = time.process_time()
    time.sleep(seconds)
    used = time.process_time() - began
    assert used < 0.3 * seconds, f"{used:.2f} CPU-seconds in {seconds} s: still evaluating"


def _pending_tasks(server: RunningServer) -> list[asyncio.Task[object]]:
    """The server loop's pending tasks (read on the loop itself)."""

    async def pending() -> list[asyncio.Task[object]]:
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks() if t is not me and not t.done()]

    return asyncio.run_coroutine_threadsafe(pending(), server.loop).result(timeout=10)


def _kind(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    return str(getattr(coro, "__qualname__", type(coro).__name__))


# Eight rows at a one-pixel window: tens of thousands of evaluations, many seconds of work,
# so the first progress message comes long before the explanation could finish.
LONG_RUN: dict[str, Any] = {"window": (1, 1), "stride": (1, 1)}


def _long_input() -> np.ndarray:
    return _images(8)


def _cancel_a_long_explanation(client: xaid.Client, server: RunningServer) -> None:
    """Start a long explanation, fail its first progress call, wait for the server to stop."""

    def fail(done: int, total: int) -> None:
        raise RuntimeError("stop")

    cancelled = _explain_metrics(server)[1]
    with pytest.raises(RuntimeError, match="stop"):
        client.explain("shapes", _long_input(), progress=fail, **LONG_RUN)
    _wait_until_cancelled(server, cancelled)


# ---- models ----


def test_models(client: xaid.Client) -> None:
    names = {m.name for m in client.models()}
    assert {"shapes", "tabular"} <= names


def test_model(shapes: xaid.ModelInfo, client: xaid.Client) -> None:
    assert shapes.name == "shapes"
    assert shapes.kind == "image"
    assert shapes.ready
    assert shapes.version in shapes.versions
    assert shapes.inputs[0].shape[-3:] == (3, 64, 64)
    assert shapes.image is not None
    assert (shapes.image.height, shapes.image.width) == (64, 64)
    assert shapes.labels
    assert "occlusion" in shapes.methods
    assert shapes.execution_provider

    tabular = client.model("tabular")
    assert tabular.inputs[0].shape[-1] == 30
    assert tabular.inputs[0].datatype == "FP32"


def test_model_info_is_decoded(shapes: xaid.ModelInfo, client: xaid.Client) -> None:
    spec = shapes.inputs[0]
    assert str(spec) == f"{spec.name}:FP32[?,3,64,64]"
    assert shapes.image is not None
    assert (shapes.image.channels, shapes.image.layout) == (3, "NCHW")
    assert shapes.outputs[0].shape[-1] == len(shapes.labels)
    assert shapes.proto.name == "shapes"
    assert xaid.ModelInfo.from_proto(shapes.proto) == shapes
    assert shapes in client.models()


@pytest.mark.parametrize("name", ["shapes", "tabular"])
def test_labels_come_from_the_model_config(client: xaid.Client, name: str) -> None:
    config = yaml.safe_load((DEMO / "models" / name / "config.yaml").read_text(encoding="utf-8"))
    assert client.model(name).labels == tuple(config["labels"])


# ---- predict ----


def test_predict_image_path(client: xaid.Client, shapes: xaid.ModelInfo, image_path: Path) -> None:
    for x in (image_path, str(image_path), image_path.read_bytes()):
        prediction = client.predict("shapes", x, top_k=3)
        assert prediction.model == "shapes"
        assert prediction.version == shapes.version
        _check_top(prediction, 1, shapes.labels)
        assert len(prediction.top[0]) == 3
        assert next(iter(prediction.outputs.values())).shape[0] == 1


def test_predict_pil_image_matches_the_file(client: xaid.Client, image_path: Path) -> None:
    with Image.open(image_path) as image:
        from_pil = client.predict("shapes", image.convert("RGB"))
    from_file = client.predict("shapes", image_path)
    assert from_pil.top[0][0].index == from_file.top[0][0].index


def test_predict_numpy(client: xaid.Client) -> None:
    tabular = client.model("tabular")
    prediction = client.predict("tabular", _tabular(2))
    assert next(iter(prediction.outputs.values())).shape[0] == 2
    _check_top(prediction, 2, tabular.labels)

    named = client.predict("tabular", {tabular.inputs[0].name: _tabular(2)})
    for name, value in prediction.outputs.items():
        np.testing.assert_allclose(named.outputs[name], value, rtol=1e-5)


def test_predict_image_tensor_rows(client: xaid.Client, shapes: xaid.ModelInfo) -> None:
    x = _images(2)
    prediction = client.predict("shapes", x, top_k=2)
    _check_top(prediction, 2, shapes.labels)
    assert [len(row) for row in prediction.top] == [2, 2]
    logits = prediction.outputs[shapes.outputs[0].name]
    assert logits.shape == (2, shapes.outputs[0].shape[-1])
    for row, scores in enumerate(prediction.top):
        assert scores[0].index == int(np.argmax(logits[row]))
        assert scores[0].score == pytest.approx(float(logits[row, scores[0].index]), rel=1e-5)

    named = client.predict("shapes", {shapes.inputs[0].name: x}, top_k=2)
    assert named.top == prediction.top


# ---- explain ----


def test_explain_occlusion_with_render(
    client: xaid.Client, shapes: xaid.ModelInfo, image_path: Path
) -> None:
    explanation = client.explain(
        "shapes", image_path, "occlusion", render=True, window=WINDOW, stride=WINDOW, baseline=0.0
    )
    assert explanation.method == "occlusion"
    assert explanation.attribution.shape == (1, 3, 64, 64)
    assert explanation.attribution.dtype == np.float32
    assert explanation.model_evaluations > 0
    assert explanation.parameters["window"] == list(WINDOW)
    assert explanation.parameters["stride"] == list(WINDOW)
    assert explanation.parameters["baseline"] == 0.0

    assert len(explanation.heatmap_png) == 1
    assert explanation.heatmap_png[0].startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(image_path) as original:
        assert explanation.heatmaps[0].size == original.size
    assert Image.open(io.BytesIO(explanation.heatmap_png[0])).format == "PNG"

    target = explanation.target
    assert len(target.class_indices) == 1
    assert 0 <= target.class_indices[0] < shapes.outputs[0].shape[-1]
    if shapes.labels:
        assert target.labels[0] == shapes.labels[target.class_indices[0]]
    assert explanation.prediction
    assert explanation.timing.total_seconds > 0


def test_explain_renders_array_inputs_too(client: xaid.Client) -> None:
    explanation = client.explain(
        "shapes", _images(2), render=True, seed=5, window=WINDOW, stride=WINDOW
    )
    assert explanation.attribution.shape == (2, 3, 64, 64)
    assert [h.size for h in explanation.heatmaps] == [(64, 64), (64, 64)]
    assert explanation.seed == 5
    assert len(explanation.target.class_indices) == 2
    assert explanation.timing.total_seconds >= explanation.timing.compute_seconds > 0


def test_explain_target_and_seed_are_honoured(client: xaid.Client, image_path: Path) -> None:
    explanation = client.explain(
        "shapes", image_path, target=2, seed=1234, window=WINDOW, stride=WINDOW
    )
    assert explanation.target.class_indices == (2,)
    assert explanation.seed == 1234
    assert explanation.heatmap_png == []


def test_method_parameters_reach_the_server(client: xaid.Client) -> None:
    explanation = client.explain("tabular", _tabular(1), window=[2], stride=2, baseline=0.5)
    assert explanation.parameters == {"window": [2], "stride": [2], "baseline": 0.5}
    streamed = client.explain(
        "tabular", _tabular(1), window=3, stride=[3], progress=lambda done, total: None
    )
    assert streamed.parameters["window"] == [3]
    assert streamed.parameters["stride"] == [3]


def test_explain_with_progress(client: xaid.Client, image_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    explanation = client.explain(
        "shapes",
        image_path,
        window=WINDOW,
        stride=WINDOW,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls
    dones = [done for done, _ in calls]
    assert dones == sorted(dones)
    assert calls[-1][0] == calls[-1][1] > 0
    assert explanation.attribution.shape == (1, 3, 64, 64)


def test_progress_counts_the_model_evaluations(client: xaid.Client) -> None:
    calls: list[tuple[int, int]] = []
    explanation = client.explain(
        "tabular", _tabular_examples(2), progress=lambda done, total: calls.append((done, total))
    )
    evaluations = explanation.model_evaluations
    assert evaluations == 2 + 2 * 30  # the prediction, then one run per feature and row
    assert {total for _, total in calls} == {evaluations}
    assert calls[-1] == (evaluations, evaluations)
    assert explanation.attribution.shape == (2, 30)


def test_an_interrupt_in_the_progress_callback_propagates(
    client: xaid.Client, demo_server: RunningServer
) -> None:
    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    cancelled = _explain_metrics(demo_server)[1]
    with pytest.raises(KeyboardInterrupt):
        client.explain("shapes", _long_input(), progress=interrupt, **LONG_RUN)
    _wait_until_cancelled(demo_server, cancelled)


def test_a_failing_progress_callback_cancels_the_call(
    client: xaid.Client, demo_server: RunningServer
) -> None:
    calls: list[tuple[int, int]] = []

    def fail(done: int, total: int) -> None:
        calls.append((done, total))
        raise RuntimeError("stop")

    cancelled = _explain_metrics(demo_server)[1]
    with pytest.raises(RuntimeError, match="stop"):
        client.explain("shapes", _long_input(), progress=fail, **LONG_RUN)
    assert len(calls) == 1
    done, total = calls[0]
    assert done < total
    _wait_until_cancelled(demo_server, cancelled)
    _assert_evaluations_stopped()
    # the server is free for the next call
    assert client.predict("tabular", _tabular(1)).top


def test_a_cancelled_call_logs_no_server_error(
    client: xaid.Client, demo_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A client going away is routine: the server must not log it as an unhandled error."""
    gc.collect()  # leftovers of earlier calls are not this call's doing
    caplog.set_level(logging.ERROR)
    caplog.clear()
    _cancel_a_long_explanation(client, demo_server)
    time.sleep(0.3)  # the abandoned evaluation notices the cancellation at its next chunk
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors


def test_a_cancelled_stream_leaves_no_task_on_the_server(
    client: xaid.Client, demo_server: RunningServer
) -> None:
    """Every task the stream started ends with it.

    Where the cancellation meets the stream (sending a message, or waiting for the next
    progress update) is a matter of timing, so the call is cancelled several times.
    """
    gc.collect()  # tasks abandoned by earlier calls must not blur the count
    before = Counter(_kind(t) for t in _pending_tasks(demo_server))
    left: Counter[str] = Counter()
    gc.disable()  # an abandoned task lives in a reference cycle: keep it until it is counted
    try:
        for _ in range(10):
            _cancel_a_long_explanation(client, demo_server)
            deadline = time.monotonic() + 2
            while True:
                left = Counter(_kind(t) for t in _pending_tasks(demo_server)) - before
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if left:
                break
    finally:
        gc.enable()
    assert not left, f"the cancelled call left tasks pending on the server: {dict(left)}"


def test_the_image_model_offers_every_method_of_the_contract(shapes: xaid.ModelInfo) -> None:
    assert sorted(shapes.methods) == sorted(xaid.explain_methods())


# ---- errors ----


def test_unknown_model(client: xaid.Client, image_path: Path) -> None:
    with pytest.raises(xaid.NotFound) as info:
        client.model("no-such-model")
    assert info.value.details
    with pytest.raises(xaid.NotFound):
        client.predict("no-such-model", image_path)
    with pytest.raises(xaid.NotFound):
        client.explain("no-such-model", image_path, progress=lambda done, total: None)


def test_errors_keep_the_grpc_error_as_cause(client: xaid.Client) -> None:
    with pytest.raises(xaid.NotFound, match="'no-such-model'") as info:
        client.model("no-such-model")
    cause = info.value.__cause__
    assert isinstance(cause, grpc.RpcError)
    assert cause.code() is grpc.StatusCode.NOT_FOUND
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert str(info.value) == f"NOT_FOUND: {info.value.details}"

    with pytest.raises(xaid.NotFound) as streamed:
        client.explain("no-such-model", _tabular(1), progress=lambda done, total: None)
    assert isinstance(streamed.value.__cause__, grpc.RpcError)


def test_wrong_shape_array(client: xaid.Client) -> None:
    with pytest.raises(xaid.InvalidArgument) as info:
        client.predict("tabular", np.zeros((1, 7), dtype=np.float32))
    assert info.value.details
    with pytest.raises(xaid.InvalidArgument):
        client.explain("tabular", np.zeros((1, 7), dtype=np.float32))


def test_render_needs_an_image_model(client: xaid.Client) -> None:
    with pytest.raises(xaid.FailedPrecondition, match="render"):
        client.explain("tabular", _tabular(1), render=True)


def test_unknown_parameter_fails_before_the_call(client: xaid.Client, image_path: Path) -> None:
    with pytest.raises(ValueError, match="valid parameters: window, stride, baseline"):
        client.explain("shapes", image_path, "occlusion", windw=8)


def test_unreachable_server_is_unavailable() -> None:
    with xaid.Client(UNREACHABLE, timeout=5) as client, pytest.raises(xaid.Unavailable) as info:
        client.models()
    assert isinstance(info.value.__cause__, grpc.RpcError)


# ---- channels ----


def test_a_callers_channel_is_not_closed(server_address: str) -> None:
    channel = grpc.insecure_channel(server_address)
    try:
        with xaid.Client(channel=channel) as client:
            assert "tabular" in {m.name for m in client.models()}
        with xaid.Client(channel=channel) as client:
            assert client.model("tabular").name == "tabular"
    finally:
        channel.close()


def test_a_client_closes_its_own_channel(server_address: str) -> None:
    client = xaid.Client(server_address)
    client.close()
    with pytest.raises(ValueError, match="closed"):
        client.models()


# ---- async ----


def test_async_client(server_address: str, image_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    async def run() -> None:
        async with xaid.AsyncClient(server_address, timeout=120) as client:
            assert {"shapes", "tabular"} <= {m.name for m in await client.models()}
            shapes = await client.model("shapes")
            assert shapes.kind == "image"

            prediction = await client.predict("shapes", image_path)
            _check_top(prediction, 1, shapes.labels)
            tabular = await client.predict("tabular", _tabular(3))
            assert len(tabular.top) == 3

            explanation = await client.explain(
                "shapes",
                image_path,
                render=True,
                window=WINDOW,
                stride=WINDOW,
                progress=lambda done, total: calls.append((done, total)),
            )
            assert explanation.attribution.shape == (1, 3, 64, 64)
            assert explanation.heatmap_png
            assert explanation.parameters["window"] == list(WINDOW)

            with pytest.raises(xaid.NotFound):
                await client.model("no-such-model")
            with pytest.raises(xaid.InvalidArgument):
                await client.predict("tabular", np.zeros((1, 7), dtype=np.float32))

    asyncio.run(run())
    assert calls
    assert calls[-1][0] == calls[-1][1] > 0


def test_async_client_inputs_and_parameters(server_address: str, shapes: xaid.ModelInfo) -> None:
    calls: list[tuple[int, int]] = []

    async def on_progress(done: int, total: int) -> None:
        await asyncio.sleep(0)
        calls.append((done, total))

    async def run() -> None:
        async with xaid.AsyncClient(server_address, timeout=120) as client:
            assert await client.model("shapes") == shapes
            named = await client.predict("shapes", {shapes.inputs[0].name: _images(1)}, top_k=1)
            assert len(named.top[0]) == 1
            assert named.top[0][0].label == shapes.labels[named.top[0][0].index]

            explanation = await client.explain(
                "shapes", _images(1), render=True, seed=7, progress=on_progress, **COARSE
            )
            assert explanation.heatmap_png
            assert explanation.seed == 7
            assert explanation.parameters["stride"] == list(WINDOW)

            plain = await client.explain("tabular", _tabular(1), window=2, stride=2)
            assert plain.parameters == {"window": [2], "stride": [2], "baseline": 0.0}

    asyncio.run(run())
    assert calls
    assert calls[-1][0] == calls[-1][1] > 0


def test_async_client_errors(server_address: str, shapes: xaid.ModelInfo) -> None:
    missing = [m for m in xaid.explain_methods() if m not in shapes.methods]

    async def run() -> None:
        async with xaid.AsyncClient(server_address, timeout=120) as client:
            with pytest.raises(xaid.NotFound) as info:
                await client.predict("no-such-model", _images(1))
            assert isinstance(info.value.__cause__, grpc.RpcError)
            with pytest.raises(xaid.NotFound) as streamed:
                await client.explain("no-such-model", _images(1), progress=lambda done, total: None)
            assert isinstance(streamed.value.__cause__, grpc.RpcError)
            with pytest.raises(ValueError, match="unknown parameter"):
                await client.explain("shapes", _images(1), windw=3)
            for method in missing:
                with pytest.raises(xaid.Unimplemented) as unimplemented:
                    await client.explain("shapes", _images(1), method)
                assert isinstance(unimplemented.value.__cause__, grpc.RpcError)

        async with xaid.AsyncClient(UNREACHABLE, timeout=5) as unreachable:
            with pytest.raises(xaid.Unavailable):
                await unreachable.models()

    asyncio.run(run())


def test_async_failing_progress_callback_cancels_the_call(
    server_address: str, demo_server: RunningServer
) -> None:
    async def fail(done: int, total: int) -> None:
        raise RuntimeError("stop")

    async def run() -> None:
        async with xaid.AsyncClient(server_address, timeout=120) as client:
            with pytest.raises(RuntimeError, match="stop"):
                await client.explain("shapes", _long_input(), progress=fail, **LONG_RUN)

    cancelled = _explain_metrics(demo_server)[1]
    asyncio.run(run())
    _wait_until_cancelled(demo_server, cancelled)
    _assert_evaluations_stopped()


def test_async_a_callers_channel_is_not_closed(server_address: str) -> None:
    async def run() -> None:
        channel = grpc.aio.insecure_channel(server_address)
        try:
            async with xaid.AsyncClient(channel=channel) as client:
                await client.models()
            async with xaid.AsyncClient(channel=channel) as client:
                assert (await client.model("tabular")).name == "tabular"
        finally:
            await channel.close()

    asyncio.run(run())
