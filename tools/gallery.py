"""Write the README's pictures: each gradient method on the shapes demo model's example images.

    .venv/bin/python tools/gallery.py [--out docs/images]

Runs the server's core in this process on the bundled demo models (no server, no port) and
writes docs/images/<method>.png: the heatmaps the server renders for the four example images,
side by side and scaled up twice.
"""

from __future__ import annotations

import argparse
import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from xaid_server.core.requests import ExplainCall
from xaid_server.core.service import Core
from xaid_server.metrics import Metrics
from xaid_server.repository import ModelRepository
from xaid_server.runtime.model import SessionFactory
from xaid_server.runtime.providers import CPU
from xaid_server.server import prepare_explainers
from xaid_server.settings import DEMO_MODELS, Settings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = DEMO_MODELS.parent / "examples"
MODEL = "shapes"
SCALE = 2
SEED = 0
#: picture name -> (method, parameters)
PICTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "saliency": ("saliency", {}),
    "gradient_x_input": ("gradient_x_input", {}),
    "integrated_gradients": ("integrated_gradients", {}),
    "smoothgrad": ("smoothgrad", {}),
    "guided_backprop": ("guided_backprop", {}),
    "deconvnet": ("guided_backprop", {"rule": "deconvnet"}),
    "grad_cam": ("grad_cam", {}),
}


async def heatmaps(core: Core, method: str, parameters: dict[str, Any]) -> list[Image.Image]:
    pictures = []
    for path in sorted(EXAMPLES.glob("*.png")):
        call = ExplainCall(
            model=MODEL,
            method=method,
            parameters=parameters,
            image=path.read_bytes(),
            render=True,
            seed=SEED,
        )
        result = await core.explain(call)
        pictures.append(Image.open(io.BytesIO(result.heatmaps[0])).convert("RGB"))
    return pictures


def strip(pictures: list[Image.Image]) -> Image.Image:
    """The pictures side by side, each scaled up SCALE times (nearest: pixels stay pixels)."""
    width, height = pictures[0].size
    out = Image.new("RGB", (len(pictures) * width * SCALE, height * SCALE))
    for index, picture in enumerate(pictures):
        scaled = picture.resize((width * SCALE, height * SCALE), Image.Resampling.NEAREST)
        out.paste(scaled, (index * width * SCALE, 0))
    return out


async def write_gallery(out: Path) -> list[Path]:
    settings = Settings()
    metrics = Metrics()
    repository = ModelRepository(
        settings.models, SessionFactory((CPU,)), metrics, prepare_explainers
    )
    repository.scan()
    written = []
    with ThreadPoolExecutor(1) as executor:
        core = Core(settings, repository, metrics, executor)
        for name, (method, parameters) in PICTURES.items():
            path = out / f"{name}.png"
            strip(await heatmaps(core, method, parameters)).save(path, optimize=True)
            written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(write_gallery(args.out)):
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
