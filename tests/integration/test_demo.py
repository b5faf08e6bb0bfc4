"""`make demo`'s tour runs start to finish, and its heatmaps' maxima lie on the shapes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xaid
from xaid_server.demo import shapes
from xaid_server.render import aggregate

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "service" / "xaid_server" / "demo" / "examples"
EXAMPLES_SEED, EXAMPLES_DRAWN = 3, 200  # as tools/train_demo_models.py draws them


def test_the_demo_tour_writes_its_picture(tmp_path: Path) -> None:
    out = tmp_path / "heat.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "star" in done.stdout
    with Image.open(out) as picture:
        assert picture.width > picture.height  # the input beside its heatmap


@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.png")))
def test_the_heatmap_maximum_lies_on_the_shape(server_address: str, name: str) -> None:
    path = EXAMPLES / f"{name}.png"
    picture = np.asarray(Image.open(path).convert("RGB"))
    images, _, masks = shapes.generate(
        np.random.default_rng(EXAMPLES_SEED), EXAMPLES_DRAWN, picture.shape[0]
    )
    (index,) = [i for i in range(len(images)) if np.array_equal(images[i], picture)]
    with xaid.Client(server_address) as client:
        explanation = client.explain("shapes", path, "occlusion")
    heat, _ = aggregate(explanation.attribution[0])
    assert masks[index].mean() < 0.5  # the shape, not the picture
    assert masks[index].flat[int(np.argmax(heat))]
