"""The measured chunk size: a power of two within the limit, within the time budget."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from tests.helpers import make_model
from xaid_server.runtime.tuning import fastest_chunk


def _relu_session() -> ort.InferenceSession:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 256])],
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(size: int) -> dict[str, np.ndarray]:
    return {"x": np.ones((size, 256), dtype=np.float32)}


def test_the_chunk_is_a_measured_power_of_two_within_the_limit() -> None:
    session = _relu_session()
    for limit in (1, 5, 64):
        measured = fastest_chunk(session, _feeds, limit, budget_s=10.0)
        assert measured is not None
        size, seconds = measured
        assert size <= limit
        assert size & (size - 1) == 0
        assert seconds > 0


def test_the_budget_stops_the_measurement() -> None:
    sizes: list[int] = []

    def feeds(size: int) -> dict[str, np.ndarray]:
        sizes.append(size)
        return _feeds(size)

    fastest_chunk(_relu_session(), feeds, 1024, budget_s=0.0)
    assert sizes == [1]


def test_a_size_that_fails_ends_the_search() -> None:
    def feeds(size: int) -> dict[str, np.ndarray]:
        return _feeds(size) if size < 4 else {"x": np.ones((size, 7), dtype=np.float32)}

    measured = fastest_chunk(_relu_session(), feeds, 64, budget_s=10.0)
    assert measured is not None
    assert measured[0] <= 2
    assert fastest_chunk(_relu_session(), lambda size: {"x": np.ones((size, 7))}, 64) is None


class ThreadRecorder:
    """A session that notes the thread of every run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.threads: list[int] = []

    def run(self, names: Any, feeds: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self.session.run(names, feeds)


def test_side_by_side_runs_go_on_the_lane_threads() -> None:
    session = ThreadRecorder(_relu_session())
    measured = fastest_chunk(session, _feeds, 1, budget_s=10.0, side_by_side=2)
    assert measured is not None
    assert len(session.threads) == 2 * 3  # the untimed run and two timed, each twice at once
    assert threading.get_ident() not in session.threads
