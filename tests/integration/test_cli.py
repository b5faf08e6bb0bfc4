"""The `xaid` command line against a real server: in-process through `main`, and once as a
separate process the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xaid.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "service" / "xaid_server" / "demo" / "examples"
WINDOW = ["16", "16"]


@pytest.fixture(scope="module")
def image_path() -> Path:
    pngs = sorted(EXAMPLES.glob("*.png"))
    assert pngs, f"no example PNGs in {EXAMPLES}"
    return pngs[0]


@pytest.fixture
def tabular_npy(tmp_path: Path) -> Path:
    path = tmp_path / "rows.npy"
    np.save(path, np.random.default_rng(1).standard_normal((2, 30), dtype=np.float32))
    return path


def test_models(server_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", server_address, "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "KIND", "PROVIDER", "INPUTS", "METHODS"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert {"shapes", "tabular"} <= set(rows)
    assert "image" in rows["shapes"]
    assert "occlusion" in rows["shapes"]


def test_predict_image(
    server_address: str, image_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", server_address, "predict", "--model", "shapes", str(image_path)]
    assert main([*argv, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["CLASS", "LABEL"])
    assert len(lines) - header - 1 == 2  # two classes under the header

    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "shapes"
    assert len(result["top"]) == 1
    best = result["top"][0][0]
    assert best["label"] in out
    assert 0.0 <= best["probability"] <= 1.0


def test_predict_npy(
    server_address: str, tabular_npy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", server_address, "predict", "--model", "tabular", "--npy", str(tabular_npy)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "row 0:" in out
    assert "row 1:" in out

    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["top"]) == 2
    for output in result["outputs"].values():
        assert output["shape"][0] == 2


def test_explain_writes_a_png(
    server_address: str,
    image_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "heat.png"
    attribution = tmp_path / "attr.npy"
    argv = ["--server", server_address, "explain", str(image_path), "--model", "shapes"]
    argv += ["--method", "occlusion", "--out", str(out), "--window", *WINDOW, "--stride", *WINDOW]
    argv += ["--save-attribution", str(attribution)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    with Image.open(out) as heatmap, Image.open(image_path) as original:
        assert heatmap.format == "PNG"
        assert heatmap.size == original.size
    assert np.load(attribution).shape == (1, 3, 64, 64)
    assert "target class" in captured.out
    assert "model evaluations:" in captured.out
    assert f"heatmap: {out}" in captured.out
    assert "]" in captured.err  # the progress bar
    assert "Traceback" not in captured.err


def test_explain_json_without_progress(
    server_address: str, tabular_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", server_address, "explain", "--model", "tabular", "--npy", str(tabular_npy)]
    argv += ["--param", "window=5", "--param", "stride=5", "--target", "0", "--json"]
    argv += ["--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    result = json.loads(captured.out)
    assert result["method"] == "occlusion"
    assert result["parameters"]["window"] == [5]
    assert result["target"]["class_indices"] == [0, 0]
    assert result["attribution_shape"] == [2, 30]
    assert result["model_evaluations"] > 0


def test_unknown_model(
    server_address: str, image_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", server_address, "predict", "--model", "no-such-model", str(image_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: NOT_FOUND: ")
    assert "Traceback" not in err

    argv = ["--server", server_address, "explain", "--model", "no-such-model", str(image_path)]
    assert main(argv) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_wrong_shape_is_a_client_error(
    server_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((1, 7), dtype=np.float32))
    argv = ["--server", server_address, "predict", "--model", "tabular"]
    assert main([*argv, "--npy", str(tmp_path / "bad.npy")]) == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: ")


def test_as_a_separate_process(server_address: str, image_path: Path) -> None:
    env = dict(os.environ)
    paths = [str(ROOT / "clients"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["XAID_SERVER"] = server_address
    done = subprocess.run(
        [sys.executable, "-m", "xaid.cli", "predict", "--model", "shapes", str(image_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "LABEL" in done.stdout

    del env["XAID_SERVER"]
    listed = subprocess.run(
        [sys.executable, "-m", "xaid.cli", "models", "--server", server_address],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "shapes" in listed.stdout
