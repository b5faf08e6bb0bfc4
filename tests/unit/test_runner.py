"""BatchRunner: chunking, fixed feeds, evaluation counting, cancellation and deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from xaid_server.errors import Cancelled, DeadlineExceeded
from xaid_server.runtime.runner import BatchRunner, Job, Lanes

FEATURES = 4
ROW_BYTES = FEATURES * 4  # one float32 row of x


def _model(*, with_bias: bool = False) -> onnx.ModelProto:
    """y = x * 2 (+ b), s = ReduceSum(y, axis 1); x is [N, 4] with a dynamic batch."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])]
    nodes = [helper.make_node("Mul", ["x", "two"], ["doubled"])]
    if with_bias:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [FEATURES]))
        nodes.append(helper.make_node("Add", ["doubled", "b"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["doubled"], ["y"]))
    nodes.append(helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "runner",
        inputs,
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", FEATURES]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"]),
        ],
        [
            onnx.numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


class CountingSession:
    """Wraps a session and records the feeds of every run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def run(
        self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], options: Any = None
    ) -> Any:
        self.feeds.append(dict(feeds))
        return self.session.run(names, feeds, options)


@pytest.fixture(scope="module")
def plain() -> ort.InferenceSession:
    return _session(_model())


@pytest.fixture(scope="module")
def biased() -> ort.InferenceSession:
    return _session(_model(with_bias=True))


def _x(n: int) -> np.ndarray:
    return np.arange(n * FEATURES, dtype=np.float32).reshape(n, FEATURES)


def _recording_job(**kwargs: Any) -> tuple[Job, list[int], list[int]]:
    done: list[int] = []
    totals: list[int] = []

    def progress(d: int, t: int) -> None:
        done.append(d)
        totals.append(t)

    return Job(progress=progress, **kwargs), done, totals


def test_results_equal_one_big_run(plain: ort.InferenceSession) -> None:
    x = _x(10)
    job = Job()
    results = BatchRunner().run(plain, {"x": x}, job, max_batch=3)
    expected = plain.run(None, {"x": x})
    assert len(results) == len(expected) == 2
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(results[0], x * 2)
    np.testing.assert_array_equal(results[1], (x * 2).sum(axis=1))
    assert job.evaluations == 10
    assert job.compute_seconds >= 0.0


def test_named_outputs_only(plain: ort.InferenceSession) -> None:
    x = _x(5)
    (s,) = BatchRunner().run(plain, {"x": x}, Job(), outputs=["s"], max_batch=2)
    np.testing.assert_array_equal(s, (x * 2).sum(axis=1))


@pytest.mark.parametrize(
    ("max_batch", "expected"),
    [(4, [4, 8, 10]), (10, [10]), (64, [10]), (1, list(range(1, 11)))],
)
def test_chunks_bounded_by_max_batch(
    plain: ort.InferenceSession, max_batch: int, expected: list[int]
) -> None:
    job, done, _ = _recording_job(total=10)
    BatchRunner().run(plain, {"x": _x(10)}, job, max_batch=max_batch)
    assert done == expected
    assert job.evaluations == 10


def test_chunks_bounded_by_memory_budget_of_the_rows(plain: ort.InferenceSession) -> None:
    job, done, _ = _recording_job()
    BatchRunner(max_chunk_bytes=3 * ROW_BYTES).run(plain, {"x": _x(10)}, job, max_batch=64)
    assert done == [3, 6, 9, 10]
    assert job.evaluations == 10


def test_chunks_bounded_by_item_bytes(plain: ort.InferenceSession) -> None:
    job, done, _ = _recording_job()
    BatchRunner(max_chunk_bytes=1000).run(plain, {"x": _x(10)}, job, max_batch=64, item_bytes=250)
    assert done == [4, 8, 10]


def test_item_bytes_below_the_row_size_does_not_widen_chunks(
    plain: ort.InferenceSession,
) -> None:
    job, done, _ = _recording_job()
    BatchRunner(max_chunk_bytes=2 * ROW_BYTES).run(
        plain, {"x": _x(5)}, job, max_batch=64, item_bytes=1
    )
    assert done == [2, 4, 5]


def test_the_smaller_bound_wins(plain: ort.InferenceSession) -> None:
    job, done, _ = _recording_job()
    BatchRunner(max_chunk_bytes=5 * ROW_BYTES).run(plain, {"x": _x(10)}, job, max_batch=2)
    assert done == [2, 4, 6, 8, 10]


def test_an_item_over_the_budget_still_runs_one_at_a_time(plain: ort.InferenceSession) -> None:
    job, done, _ = _recording_job()
    BatchRunner(max_chunk_bytes=10).run(plain, {"x": _x(3)}, job, item_bytes=1 << 20)
    assert done == [1, 2, 3]


def test_chunk_size() -> None:
    runner = BatchRunner(max_chunk_bytes=1000)
    assert runner.chunk_size(64, 100) == 10
    assert runner.chunk_size(4, 100) == 4
    assert runner.chunk_size(64, 5000) == 1
    assert runner.chunk_size(64, 0) == 64


def test_progress_total_is_the_job_total(plain: ort.InferenceSession) -> None:
    job, done, totals = _recording_job(total=25)
    BatchRunner().run(plain, {"x": _x(10)}, job, max_batch=5)
    assert done == [5, 10]
    assert totals == [25, 25]


def test_progress_total_never_below_done(plain: ort.InferenceSession) -> None:
    job, _, totals = _recording_job()
    BatchRunner().run(plain, {"x": _x(6)}, job, max_batch=4)
    assert totals == [4, 6]


def test_evaluations_accumulate_over_runs(plain: ort.InferenceSession) -> None:
    job = Job()
    runner = BatchRunner()
    runner.run(plain, {"x": _x(7)}, job, max_batch=3)
    runner.run(plain, {"x": _x(5)}, job, max_batch=3)
    assert job.evaluations == 12


def test_fixed_feeds_are_passed_to_every_chunk(biased: ort.InferenceSession) -> None:
    x = _x(7)
    b = np.array([1.0, -1.0, 0.5, 3.0], dtype=np.float32)
    session = CountingSession(biased)
    results = BatchRunner().run(session, {"x": x}, Job(), fixed={"b": b}, max_batch=3)
    assert [len(feeds["x"]) for feeds in session.feeds] == [3, 3, 1]
    for feeds in session.feeds:
        np.testing.assert_array_equal(feeds["b"], b)
    expected = biased.run(None, {"x": x, "b": b})
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_fixed_feeds_do_not_bound_the_chunk(biased: ort.InferenceSession) -> None:
    job, done, _ = _recording_job()
    big = np.zeros(FEATURES, dtype=np.float32)
    BatchRunner(max_chunk_bytes=2 * ROW_BYTES).run(
        biased, {"x": _x(4)}, job, fixed={"b": big}, max_batch=64
    )
    assert done == [2, 4]


def test_several_batched_feeds_are_sliced_together() -> None:
    session = CountingSession(_session(_two_input_model()))
    a = _x(5)
    b = -_x(5)
    (out,) = BatchRunner().run(session, {"a": a, "b": b}, Job(), max_batch=2)
    np.testing.assert_array_equal(out, a + b)
    for feeds in session.feeds:
        assert len(feeds["a"]) == len(feeds["b"])


def _two_input_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", FEATURES]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", FEATURES]),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", FEATURES])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_cancelled_beforehand_runs_nothing(plain: ort.InferenceSession) -> None:
    session = CountingSession(plain)
    job, done, _ = _recording_job()
    job.cancel()
    assert job.cancel_cause == "client"
    with pytest.raises(Cancelled):
        BatchRunner().run(session, {"x": _x(4)}, job)
    assert session.feeds == []
    assert done == []
    assert job.evaluations == 0


def test_deadline_in_the_past_runs_nothing(plain: ort.InferenceSession) -> None:
    session = CountingSession(plain)
    job = Job(deadline=time.monotonic() - 1.0)
    with pytest.raises(DeadlineExceeded):
        BatchRunner().run(session, {"x": _x(4)}, job)
    assert session.feeds == []
    assert job.evaluations == 0


def test_cancel_with_deadline_cause_is_deadline_exceeded(plain: ort.InferenceSession) -> None:
    job = Job()
    job.cancel("deadline")
    with pytest.raises(DeadlineExceeded):
        BatchRunner().run(plain, {"x": _x(4)}, job)


def test_future_deadline_does_not_interfere(plain: ort.InferenceSession) -> None:
    job = Job(deadline=time.monotonic() + 60.0)
    (y, _) = BatchRunner().run(plain, {"x": _x(3)}, job, max_batch=1)
    np.testing.assert_array_equal(y, _x(3) * 2)
    assert job.evaluations == 3


def test_cancel_from_progress_stops_further_chunks(plain: ort.InferenceSession) -> None:
    session = CountingSession(plain)
    done: list[int] = []
    job = Job()

    def progress(d: int, t: int) -> None:
        done.append(d)
        job.cancel()

    job.progress = progress
    with pytest.raises(Cancelled):
        BatchRunner().run(session, {"x": _x(10)}, job, max_batch=4)
    assert len(session.feeds) == 1
    assert done == [4]
    assert job.evaluations == 4


def test_cancel_after_the_last_chunk_still_raises(plain: ort.InferenceSession) -> None:
    job = Job()

    def progress(d: int, t: int) -> None:
        if d == 3:
            job.cancel("shutdown")

    job.progress = progress
    with pytest.raises(Cancelled):
        BatchRunner().run(plain, {"x": _x(3)}, job, max_batch=2)
    assert job.evaluations == 3
    assert job.cancel_cause == "shutdown"


def test_mismatched_leading_dims(plain: ort.InferenceSession) -> None:
    session = CountingSession(plain)
    job = Job()
    with pytest.raises(ValueError, match="leading dimension"):
        BatchRunner().run(session, {"a": _x(3), "b": _x(4)}, job)
    assert session.feeds == []
    assert job.evaluations == 0


def test_no_batched_feeds_is_an_error(plain: ort.InferenceSession) -> None:
    with pytest.raises(ValueError, match="leading dimension"):
        BatchRunner().run(plain, {}, Job())


def test_a_failing_run_is_raised_and_counts_nothing(plain: ort.InferenceSession) -> None:
    job = Job()
    bad = np.zeros((3, FEATURES + 1), dtype=np.float32)  # wrong feature count
    with pytest.raises(OrtInvalidArgument, match="invalid dimensions"):
        BatchRunner().run(plain, {"x": bad}, job)
    assert job.evaluations == 0
    assert not job._in_flight


class MeetingSession(CountingSession):
    """The first run of each thread waits until `parties` threads are inside `run` at once (or
    times out): lanes that did not run side by side break the barrier."""

    def __init__(self, session: ort.InferenceSession, parties: int) -> None:
        super().__init__(session)
        self.barrier = threading.Barrier(parties, timeout=10)
        self.threads: set[int] = set()

    def run(
        self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray], options: Any = None
    ) -> Any:
        if threading.get_ident() not in self.threads:
            self.threads.add(threading.get_ident())
            self.barrier.wait()
        return super().run(names, feeds, options)


def test_lanes_run_parts_side_by_side_in_order(plain: ort.InferenceSession) -> None:
    lane = MeetingSession(plain, parties=2)
    main = CountingSession(plain)
    job, done, totals = _recording_job(total=9)
    x = _x(9)
    results = BatchRunner().run(main, {"x": x}, job, max_batch=64, lanes=Lanes(lane, 2, 2))
    np.testing.assert_array_equal(results[0], x * 2)  # rows 0-3 and 4-8, back in order
    np.testing.assert_array_equal(results[1], (x * 2).sum(axis=1))
    assert main.feeds == []
    assert sorted(len(f["x"]) for f in lane.feeds) == [1, 2, 2, 2, 2]  # 4 rows and 5, by 2
    assert len(lane.threads) == 2
    assert job.evaluations == 9
    assert done == sorted(done)
    assert done[-1] == 9
    assert set(totals) == {9}


def test_lanes_count_their_wall_time_once(plain: ort.InferenceSession) -> None:
    job = Job()
    began = time.perf_counter()
    BatchRunner().run(plain, {"x": _x(8)}, job, lanes=Lanes(MeetingSession(plain, 2), 2, 1))
    assert 0.0 < job.compute_seconds <= time.perf_counter() - began


def test_one_row_stays_on_the_session_using_every_core(plain: ort.InferenceSession) -> None:
    lane, main = CountingSession(plain), CountingSession(plain)
    BatchRunner().run(main, {"x": _x(1)}, Job(), lanes=Lanes(lane, 2, 1))
    assert len(main.feeds) == 1
    assert lane.feeds == []


def test_a_failing_lane_is_raised_after_the_others_end(plain: ort.InferenceSession) -> None:
    job = Job()
    bad = np.zeros((4, FEATURES + 1), dtype=np.float32)
    with pytest.raises(OrtInvalidArgument, match="invalid dimensions"):
        BatchRunner().run(plain, {"x": bad}, job, lanes=Lanes(plain, 2, 2))
    assert not job._in_flight


def test_cancelling_stops_every_lane(plain: ort.InferenceSession) -> None:
    lane = MeetingSession(plain, parties=2)
    job = Job()

    def progress(d: int, t: int) -> None:
        job.cancel()

    job.progress = progress
    with pytest.raises(Cancelled):
        BatchRunner().run(plain, {"x": _x(12)}, job, lanes=Lanes(lane, 2, 2))
    assert len(lane.feeds) == 2  # the first chunk of each lane, then nothing
    assert job.evaluations in (2, 4)  # the other lane's chunk may be stopped in flight
