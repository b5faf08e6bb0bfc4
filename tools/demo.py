"""`make demo`: start a server on the bundled models, explain a bundled image, write a PNG, stop.

Usage: python tools/demo.py [--out demo-heatmap.png]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from xaid import Client
from xaid_server import healthcheck
from xaid_server.settings import DEMO_MODELS

EXAMPLE = DEMO_MODELS.parent / "examples" / "star.png"
ENLARGE = 4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_serving(
    address: str, server: subprocess.Popen[bytes], timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        if healthcheck.check(address, timeout=1.0):
            return
        time.sleep(0.2)
    raise SystemExit("the server did not become ready in time")


def side_by_side(image: Image.Image, heatmap: Image.Image) -> Image.Image:
    """The input next to its heatmap, enlarged so that 64-pixel images are easy to look at."""
    size = (image.width * ENLARGE, image.height * ENLARGE)
    canvas = Image.new("RGB", (2 * size[0] + 8, size[1]), "white")
    canvas.paste(image.convert("RGB").resize(size, Image.Resampling.NEAREST), (0, 0))
    canvas.paste(heatmap.convert("RGB").resize(size, Image.Resampling.NEAREST), (size[0] + 8, 0))
    return canvas


def tour(address: str, out: Path) -> None:
    with Client(address) as client:
        for info in client.models():
            print(f"model {info.name} v{info.version} ({info.kind}) on {info.execution_provider}")
        prediction = client.predict("shapes", EXAMPLE, top_k=3)
        print(f"\n{EXAMPLE.name}: top classes")
        for score in prediction.top[0]:
            print(f"  {score.label:<10} p={score.probability:.3f}  logit={score.score:+.2f}")
        explanation = client.explain("shapes", EXAMPLE, "occlusion", render=True)
        side_by_side(Image.open(EXAMPLE), explanation.heatmaps[0]).save(out)
        params = explanation.parameters
        print(
            f"\nocclusion of '{explanation.target.labels[0]}' with window {params['window']} "
            f"stride {params['stride']}: {explanation.model_evaluations} model evaluations "
            f"in {explanation.timing.total_seconds:.2f} s"
        )
        print(f"input and heatmap written to {out} (enlarged {ENLARGE}x for viewing)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo-heatmap.png"))
    args = ap.parse_args()
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "xaid_server", "--port", str(port), "--metrics-port", "-1"]
    print("starting:", " ".join(["xaid serve", *command[3:]]))
    server = subprocess.Popen(command)
    try:
        wait_until_serving(address, server)
        tour(address, args.out)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    print(f"server stopped (exit code {code})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
