"""The `xaid` command line against a real server: in-process through `main`, and once as a
separate process the way a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xaid
from xaid.cli import main

ROOT = Path(__file__).resolve().parents[2]
WINDOW = ["16", "16"]


@pytest.fixture(scope="module")
def shapes(server_address: str) -> xaid.ModelInfo:
    with xaid.Client(server_address, timeout=60) as client:
        return client.model("shapes")


@pytest.fixture
def images_npy(tmp_path: Path) -> Path:
    """Two model-ready shapes inputs: float32 NCHW in [0, 1]."""
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32))
    return path


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


def test_models_row_describes_the_model(
    server_address: str, shapes: xaid.ModelInfo, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--server", server_address, "models"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    provider = shapes.execution_provider.removesuffix("ExecutionProvider")
    spec = shapes.inputs[0]
    assert rows["shapes"] == [
        "shapes",
        shapes.version,
        "image",
        provider,
        f"{spec.name}:FP32[?,3,64,64]",
        ",".join(shapes.methods),
    ]


def test_server_from_the_environment(
    server_address: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XAID_SERVER", server_address)
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert {"shapes", "tabular"} <= set(listed)
    assert listed["shapes"]["kind"] == "image"
    assert listed["shapes"]["ready"] is True
    assert "occlusion" in listed["shapes"]["methods"]
    assert listed["tabular"]["inputs"] == ["input:FP32[?,30]"]


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


def test_predict_prints_the_servers_probabilities(
    server_address: str, image_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with xaid.Client(server_address) as client:
        prediction = client.predict("shapes", image_path, top_k=3)
    argv = ["--server", server_address, "predict", "--model", "shapes", str(image_path)]
    assert main([*argv, "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model shapes (version {prediction.version})")
    for score in prediction.top[0]:
        row = [str(score.index), score.label, f"{score.probability:.4f}", f"{score.score:.4f}"]
        assert row in [line.split() for line in out.splitlines()]


def test_predict_several_rows_as_json(
    server_address: str,
    images_npy: Path,
    shapes: xaid.ModelInfo,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--server", server_address, "predict", "--model", "shapes", "--npy", str(images_npy)]
    assert main([*argv, "--json", "--top-k", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [len(row) for row in result["top"]] == [1, 1]
    for row in result["top"]:
        assert row[0]["label"] == shapes.labels[row[0]["index"]]
    output = result["outputs"][shapes.outputs[0].name]
    assert output["shape"] == [2, shapes.outputs[0].shape[-1]]
    assert np.asarray(output["data"]).shape == (2, shapes.outputs[0].shape[-1])


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


def test_explain_options_reach_the_server(
    server_address: str,
    image_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--server", server_address, "explain", str(image_path), "--model", "shapes"]
    argv += ["--window", *WINDOW, "--param", f"stride={','.join(WINDOW)}"]
    argv += ["--param", "baseline=0.5", "--seed", "9"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["parameters"] == {"window": [16, 16], "stride": [16, 16], "baseline": 0.5}
    assert result["seed"] == 9
    evaluations = result["model_evaluations"]
    assert evaluations == 1 + 4 * 4  # the prediction, then one run per window position
    assert result["attribution_file"] is None
    assert result["heatmaps"] == []

    out = tmp_path / "heat.png"
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    target = result["target"]
    index, label = target["class_indices"][0], target["labels"][0]
    named = f" ({label})" if label and label != str(index) else ""
    assert f"target class {index}{named} of output {target['output']}" in captured.out
    assert f"model evaluations: {evaluations}" in captured.out
    assert "seed: 9" in captured.out
    assert f"heatmap: {out}" in captured.out
    assert f"{evaluations}/{evaluations}" in captured.err
    assert "[" + "#" * 30 + "]" in captured.err  # the finished progress bar
    assert captured.err.endswith("\n")
    with Image.open(out) as heatmap:
        assert heatmap.format == "PNG"


def test_explain_several_rows_writes_one_heatmap_each(
    server_address: str, images_npy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--server", server_address, "explain", "--model", "shapes", "--npy", str(images_npy)]
    argv += ["--out", str(tmp_path / "h.png"), "--json", "--no-progress"]
    argv += ["--param", "window=16,16", "--param", "stride=16,16"]
    argv += ["--save-attribution", str(tmp_path / "a.npy")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    result = json.loads(captured.out)
    assert result["heatmaps"] == [str(tmp_path / "h_0.png"), str(tmp_path / "h_1.png")]
    for path in result["heatmaps"]:
        with Image.open(path) as heatmap:
            assert heatmap.format == "PNG"
            assert heatmap.size == (64, 64)
    assert not (tmp_path / "h.png").exists()
    assert result["attribution_shape"] == [2, 3, 64, 64]
    assert np.load(tmp_path / "a.npy").shape == (2, 3, 64, 64)
    assert len(result["target"]["class_indices"]) == 2

    argv.remove("--json")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "row 0: target class" in out
    assert "row 1: target class" in out


def test_missing_input_file(
    server_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.npy")
    argv = ["--server", server_address, "predict", "--model", "tabular", "--npy", missing]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "missing.npy" in err
    assert "Traceback" not in err

    argv = ["--server", server_address, "explain", "--model", "shapes", str(tmp_path / "no.png")]
    assert main(argv) == 1
    assert "no.png" in capsys.readouterr().err


def test_unknown_model_error_is_the_servers_message(
    server_address: str, tabular_npy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with xaid.Client(server_address) as client, pytest.raises(xaid.NotFound) as info:
        client.model("no-such-model")
    argv = ["--server", server_address, "predict", "--model", "no-such-model"]
    assert main([*argv, "--npy", str(tabular_npy)]) == 1
    error, request_id = capsys.readouterr().err.splitlines()
    assert error == f"error: NOT_FOUND: {info.value.details}"
    assert request_id.startswith("request id: ")


def test_unreachable_server(tabular_npy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--server", "127.0.0.1:1", "--timeout", "5", "predict", "--model", "tabular"]
    assert main([*argv, "--npy", str(tabular_npy)]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--model", "shapes"],
        ["predict", "--model", "shapes", "x.png", "--npy", "x.npy"],
        ["explain", "--model", "shapes", "x.png", "--method", "magic"],
        ["explain", "--model", "shapes", "x.png", "--method", "saliency", "--window", "3"],
        ["explain", "--model", "shapes", "x.png", "--param", "novalue"],
        ["explain", "--model", "shapes", "x.png", "--param", "window=1.5"],
        ["explain", "--model", "shapes", "x.png", "--param", "windw=8"],
        ["explain", "--model", "shapes", "x.png", "--param", "window.size=8"],
        ["predict", "x.png"],
        ["frobnicate"],
    ],
)
def test_usage_errors(
    server_address: str,
    tmp_path: Path,
    tabular_npy: Path,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "x.png")
    files = {"x.png": str(tmp_path / "x.png"), "x.npy": str(tabular_npy)}
    argv = [files.get(a, a) for a in argv]
    assert main(["--server", server_address, *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert "Traceback" not in err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "models", "predict", "explain"):
        assert command in out
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    for method in xaid.explain_methods():
        assert method in out


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


# ---- serve: every argument goes to the server's own command line ----


def test_serve_help_is_the_servers(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["serve", "--help"], ["--server", "h:1", "--timeout=3", "serve", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: xaid serve")
        assert "--max-evaluations" in out
        assert "--models" in out


def test_serve_arguments_are_checked_by_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "many"]) == 2
    assert capsys.readouterr().err.startswith("xaid serve: port: ")

    with pytest.raises(SystemExit) as exit_:
        main(["--server", "h:1", "serve", "--frobnicate"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: xaid serve")
    assert "--frobnicate" in err


def test_serve_without_the_server_extra(tmp_path: Path) -> None:
    """Only the client's dependencies importable: `serve` explains what to install."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XAID_"))}
    # -S skips site processing, so the editable install's path to the server package is
    # not added; the dependencies stay importable from site-packages.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "clients"), sysconfig.get_paths()["purelib"]])
    code = (
        "import importlib.util, sys\n"
        "if importlib.util.find_spec('xaid_server') is not None: sys.exit(99)\n"
        "from xaid.cli import main\n"
        "sys.exit(main(['serve', '--port', 'many']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    if done.returncode == 99:
        pytest.skip("the server package is importable without site processing here")
    assert (done.returncode, done.stderr) == (
        2,
        "xaid serve needs the server extra: pip install 'xaid[server]'\n",
    )
