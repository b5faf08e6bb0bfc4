"""The masking evaluation graph: one example, its fills and N binary masks over segments in, N
target scores out (LIME, KernelSHAP).

Row i of the masked batch keeps the elements whose segment is on in `xaid_masks[i]` and takes
every other element from fill row `xaid_fill_index[i]`: a segment mean colour image, a baseline,
one of the background rows, or a row of pad tokens. A chunk sends N·M booleans and N indices
instead of N copies of the input, and the same graph serves images, tabular rows and token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx import TensorProto, helper

from xaid_server.graphs.compose import compose_scored, example_type

MIN_OPSET = 13  # Gather, Where with every numeric type

X = "xaid_x"
FILL = "xaid_fill"
FILL_INDEX = "xaid_fill_index"
SEGMENTS = "xaid_segments"
MASKS = "xaid_masks"


def build_masking_graph(
    model: onnx.ModelProto, input_name: str, output_name: str
) -> onnx.ModelProto:
    """Compose `model` with the masking step and the selection of one class score.

    Inputs: `xaid_x` (one example, [1, ...]), `xaid_fill` ([K, ...], the input's type),
    `xaid_fill_index` int64 [N] (a fill row per mask), `xaid_segments` int64 with one dimension
    per example dimension, each the example's size or 1 (e.g. [1, H, W] for NCHW images: channels
    share a segment), holding segment ids in [0, M), `xaid_masks` bool [N, M], `xaid_target`
    int64 scalar. Output: `xaid_score` float [N].
    """

    def prelude(
        source: onnx.TypeProto,
    ) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], Sequence[onnx.TensorProto]]:
        rank = len(source.tensor_type.shape.dim)
        keep, fills = "xaid_keep", "xaid_fill_rows"
        nodes = [
            helper.make_node("Gather", [MASKS, SEGMENTS], [keep], "xaid_keep", axis=1),
            helper.make_node("Gather", [FILL, FILL_INDEX], [fills], "xaid_fills", axis=0),
            helper.make_node("Where", [keep, X, fills], [input_name], "xaid_mask"),
        ]
        feeds = [
            helper.make_value_info(X, example_type(source, 1)),
            helper.make_value_info(FILL, example_type(source, "xaid_k")),
            helper.make_tensor_value_info(FILL_INDEX, TensorProto.INT64, ["xaid_n"]),
            helper.make_tensor_value_info(
                SEGMENTS, TensorProto.INT64, [f"xaid_s{d}" for d in range(1, rank)]
            ),
            helper.make_tensor_value_info(MASKS, TensorProto.BOOL, ["xaid_n", "xaid_m"]),
        ]
        return nodes, feeds, ()

    return compose_scored(model, input_name, output_name, "masking", prelude, MIN_OPSET)
