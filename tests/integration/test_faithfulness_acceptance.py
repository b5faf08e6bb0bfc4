"""Faithfulness acceptance: on 100 fresh shapes images, the deletion AUC of occlusion, integrated
gradients and LIME maps is lower than that of a random map for at least 95% of the images.

About four minutes on two busy cores, so it runs only with XAID_ACCEPTANCE=1."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import explain, load
from tests.integration.test_pointing_game import model_inputs
from xaid_server.core.faithfulness import evaluate, steps_of
from xaid_server.demo.shapes import generate
from xaid_server.explainers import REGISTRY
from xaid_server.model_config import load_config
from xaid_server.settings import DEMO_MODELS

IMAGES = 100
BATCH = 25

# Measured (20 deletion steps, images of seed 20261128, ties in a seeded random order):
# integrated gradients 95 of 100 (94-97 with other random maps or 50 steps), occlusion 85
# (8x8 windows; 86 at 50 steps), LIME 69 (its defaults; 72 at 50 steps). Ranking plateaus in
# raster order instead changed none of these by more than two images. The model was trained to
# tolerate baseline-filled squares, so once the object is gone, the image with baseline blocks
# keeps about 0.2 of the target's probability while scattered random pixels push it to about 0.1;
# against random maps drawn per occlusion window or per LIME segment instead, occlusion wins on
# 100 and LIME on 90 images.
METHODS = [
    pytest.param("integrated_gradients", {}, id="integrated_gradients"),
    pytest.param(
        "occlusion",
        {"window": [8, 8], "stride": [8, 8]},
        id="occlusion",
        marks=pytest.mark.xfail(strict=True, reason="measured 85 of 100 images"),
    ),
    pytest.param(
        "lime",
        {},
        id="lime",
        marks=pytest.mark.xfail(strict=True, reason="measured 69 of 100 images"),
    ),
]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("XAID_ACCEPTANCE"), reason="set XAID_ACCEPTANCE=1")
@pytest.mark.parametrize(("method", "params"), METHODS)
def test_deletion_beats_a_random_map(tmp_path: Path, method: str, params: dict[str, Any]) -> None:
    if method not in REGISTRY:
        pytest.skip(f"{method} is not available")
    folder = DEMO_MODELS / "shapes"
    model = load(
        tmp_path, (folder / "1" / "model.onnx").read_bytes(), load_config(folder / "config.yaml")
    )
    images, _, _ = generate(np.random.default_rng(20261128), IMAGES)
    x = model_inputs(images)
    rng = np.random.default_rng(0)
    wins = 0
    for start in range(0, IMAGES, BATCH):
        explanation, ctx = explain(REGISTRY[method], model, x[start : start + BATCH], params)
        steps = steps_of(model)
        ours = evaluate(ctx, explanation.attribution, steps).deletion_auc
        random = evaluate(ctx, rng.standard_normal(ctx.x.shape), steps).deletion_auc
        wins += sum(a < b for a, b in zip(ours, random, strict=True))
    assert wins >= 0.95 * IMAGES, f"{method}: deletion AUC below random for {wins}/{IMAGES}"
