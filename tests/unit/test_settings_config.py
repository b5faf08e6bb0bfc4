"""Server settings (precedence, parsing, errors), model config.yaml parsing and the README table."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from xaid_server.errors import ModelLoadError
from xaid_server.model_config import (
    FeatureConfig,
    ImageConfig,
    ModelConfig,
    load_config,
    parse_config,
)
from xaid_server.settings import DEMO_MODELS, Settings, load_settings, settings_table

ROOT = Path(__file__).resolve().parents[2]


def _file(tmp_path: Path, text: str, name: str = "xaid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- settings: precedence ----


def test_defaults() -> None:
    settings = load_settings([], {})
    assert settings == Settings()
    assert settings.models == DEMO_MODELS
    assert settings.port == 50051
    assert settings.require_gpu is False


def test_environment_is_used_when_none_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAID_PORT", "6006")
    assert load_settings([]).port == 6006


def test_file_via_flag(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        "port: 7000\nrequire_gpu: true\npoll-interval: 0.5\nmodels: /srv/models\n",
    )
    settings = load_settings(["--config", str(path)], {})
    assert settings.port == 7000
    assert settings.require_gpu is True
    assert settings.poll_interval == 0.5
    assert settings.models == Path("/srv/models")
    assert settings.host == Settings().host


def test_file_via_environment(tmp_path: Path) -> None:
    path = _file(tmp_path, "workers: 9\n")
    assert load_settings([], {"XAID_CONFIG": str(path)}).workers == 9


def test_flag_file_wins_over_environment_file(tmp_path: Path) -> None:
    by_flag = _file(tmp_path, "workers: 3\n", "flag.yaml")
    by_env = _file(tmp_path, "workers: 5\nport: 1234\n", "env.yaml")
    settings = load_settings(["--config", str(by_flag)], {"XAID_CONFIG": str(by_env)})
    assert settings.workers == 3
    assert settings.port == Settings().port  # the environment's file is not read at all


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(["--config", str(_file(tmp_path, ""))], {}) == Settings()


def test_environment_wins_over_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "port: 7000\nworkers: 2\n")
    settings = load_settings(["--config", str(path)], {"XAID_PORT": "7100"})
    assert settings.port == 7100
    assert settings.workers == 2


def test_flags_win_over_environment_and_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "port: 7000\nhost: 0.0.0.0\nlog_level: DEBUG\n")
    env = {"XAID_CONFIG": str(path), "XAID_PORT": "7100", "XAID_HOST": "10.0.0.1"}
    settings = load_settings(["--port", "7200"], env)
    assert settings.port == 7200
    assert settings.host == "10.0.0.1"
    assert settings.log_level == "DEBUG"


def test_every_setting_has_a_flag_and_a_variable() -> None:
    values: dict[str, tuple[str, Any]] = {
        "models": ("/m", Path("/m")),
        "host": ("::", "::"),
        "port": ("1", 1),
        "metrics_host": ("0.0.0.0", "0.0.0.0"),
        "metrics_port": ("-1", -1),
        "poll_interval": ("0", 0.0),
        "max_message_bytes": ("1024", 1024),
        "max_evaluations": ("10", 10),
        "max_chunk_bytes": ("2048", 2048),
        "workers": ("2", 2),
        "intra_op_threads": ("3", 3),
        "max_deadline": ("1.5", 1.5),
        "grace_period": ("2.5", 2.5),
        "log_level": ("DEBUG", "DEBUG"),
        "require_gpu": ("true", True),
        "gradient_cache": ("/c", Path("/c")),
        "default_deadline": ("0.5", 0.5),
        "predict_limit": ("3", 3),
        "explain_limit": ("0", 0),
        "arena_max_bytes": ("4096", 4096),
        "probe_timeout": ("0", 0.0),
        "probe_memory_bytes": ("8192", 8192),
        "tls_cert": ("/s.pem", "/s.pem"),
        "tls_key": ("/s.key", "/s.key"),
        "tls_client_ca": ("/ca.pem", "/ca.pem"),
        "auth_token_file": ("/tokens", "/tokens"),
        "auth_token_env": ("TOKENS", "TOKENS"),
        "health_port": ("0", 0),
        "audit_log": ("/audit.db", "/audit.db"),
        "audit_fail_closed": ("yes", True),
    }
    assert set(values) == {f.name for f in dataclasses.fields(Settings)}
    for name, (raw, expected) in values.items():
        assert getattr(load_settings([], {f"XAID_{name.upper()}": raw}), name) == expected
        if not isinstance(expected, bool):  # boolean flags take no value
            flag = "--" + name.replace("_", "-")
            assert getattr(load_settings([flag, raw], {}), name) == expected


# ---- settings: booleans ----


def test_bool_flags() -> None:
    assert load_settings(["--require-gpu"], {}).require_gpu is True
    assert load_settings(["--no-require-gpu"], {}).require_gpu is False


def test_negative_bool_flag_wins_over_environment() -> None:
    assert load_settings(["--no-require-gpu"], {"XAID_REQUIRE_GPU": "true"}).require_gpu is False
    assert load_settings(["--require-gpu"], {"XAID_REQUIRE_GPU": "0"}).require_gpu is True


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("True", True),
        (" yes ", True),
        ("1", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_bool_environment(raw: str, expected: bool) -> None:
    assert load_settings([], {"XAID_REQUIRE_GPU": raw}).require_gpu is expected


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ("yes", True)])
def test_bool_in_file(tmp_path: Path, text: str, expected: bool) -> None:
    path = _file(tmp_path, f"require_gpu: {text}\n")
    assert load_settings(["--config", str(path)], {}).require_gpu is expected


# ---- settings: errors ----


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"XAID_REQUIRE_GPU": "maybe"}, "require_gpu"),
        ({"XAID_REQUIRE_GPU": ""}, "require_gpu"),
        ({"XAID_PORT": "http"}, "port"),
        ({"XAID_PORT": "80.5"}, "port"),
        ({"XAID_POLL_INTERVAL": "often"}, "poll_interval"),
        ({"XAID_WORKERS": ""}, "workers"),
    ],
)
def test_bad_environment_value(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        load_settings([], env)


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        (["--workers", "four"], "workers"),
        (["--max-deadline", "soon"], "max_deadline"),
        (["--metrics-port", "1e3"], "metrics_port"),
    ],
)
def test_bad_flag_value(argv: list[str], setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        load_settings(argv, {})


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("port: eighty\n", "port"),
        ("require_gpu: sometimes\n", "require_gpu"),
        ("grace_period: [1, 2]\n", "grace_period"),
    ],
)
def test_bad_file_value(tmp_path: Path, text: str, setting: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ValueError, match=setting):
        load_settings(["--config", str(path)], {})


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "port: 1\nthreads: 4\n")
    with pytest.raises(ValueError, match="threads"):
        load_settings(["--config", str(path)], {})


def test_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = _file(tmp_path, "- port\n- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(["--config", str(path)], {})


def test_unknown_flag_exits() -> None:
    with pytest.raises(SystemExit):
        load_settings(["--threads", "4"], {})


def test_unrelated_environment_is_ignored() -> None:
    assert load_settings([], {"XAID_THREADS": "4", "PORT": "1"}) == Settings()


# ---- settings table ----


def test_settings_table_lists_every_setting() -> None:
    table = settings_table()
    lines = table.splitlines()
    assert lines[0] == "| flag | environment | default | meaning |"
    fields = dataclasses.fields(Settings)
    assert len(lines) == 2 + len(fields)
    for f, line in zip(fields, lines[2:], strict=True):
        assert line.startswith(f"| `--{f.name.replace('_', '-')}` | `XAID_{f.name.upper()}` |")
        assert f.metadata["doc"] in line
    assert "bundled demo models" in table
    assert str(DEMO_MODELS) not in table  # no machine paths in the documentation


def test_readme_contains_the_settings_table() -> None:
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not present at the repository root yet")
    assert settings_table() in readme.read_text(encoding="utf-8"), (
        "README.md's settings table differs from settings_table(); paste its output"
    )


# ---- model config.yaml ----


def _bad(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        parse_config(raw)


def test_empty_config_is_all_defaults() -> None:
    assert parse_config({}) == ModelConfig()


def test_unknown_keys() -> None:
    _bad({"kind": "image", "colour": "blue"}, "colour")


@pytest.mark.parametrize("kind", ["audio", "Image", "video"])
def test_bad_kind(kind: str) -> None:
    _bad({"kind": kind}, "kind")


def test_bad_layout() -> None:
    _bad({"image": {"height": 8, "width": 8, "layout": "CHW"}}, "layout")


def test_wrong_mean_length() -> None:
    _bad({"image": {"height": 8, "width": 8, "mean": [0.5, 0.5]}}, "mean")


def test_wrong_std_length() -> None:
    _bad({"image": {"height": 8, "width": 8, "channels": 1, "std": [0.2, 0.2, 0.2]}}, "std")


def test_zero_std() -> None:
    _bad({"image": {"height": 8, "width": 8, "std": [0.2, 0.0, 0.2]}}, "std")


def test_zero_scale() -> None:
    _bad({"image": {"height": 8, "width": 8, "scale": 0}}, "scale")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"image": {"width": 8}}, "image"),
        ({"image": {"height": "tall", "width": 8}}, "image"),
        ({"image": {"height": 8, "width": 8, "channels": 4}}, "channels"),
        ({"image": [8, 8]}, "image"),
        ({"features": ["a", "b"]}, "features"),
        ({"features": {"mean": ["x"]}}, "features"),
        ({"features": {"quartiles": [[1, 2]]}}, "features"),
        ({"defaults": ["occlusion"]}, "defaults"),
        ({"defaults": {"occlusion": 3}}, "defaults"),
        ({"max_batch_size": "many"}, "malformed"),
        ({"baseline": "zero"}, "malformed"),
        ({"input_range": [0]}, "malformed"),
    ],
)
def test_malformed_values(raw: dict[str, Any], match: str) -> None:
    _bad(raw, match)


def test_full_config_round_trips() -> None:
    raw: dict[str, Any] = {
        "kind": "image",
        "input": "pixels",
        "output": "logits",
        "labels": ["cat", "dog"],
        "max_batch_size": 16,
        "baseline": -1.5,
        "input_range": [-2, 2],
        "image": {
            "height": 224,
            "width": 200,
            "channels": 3,
            "layout": "NHWC",
            "scale": 255,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "features": {
            "names": ["a", "b"],
            "mean": [1, 2],
            "std": [0.5, 0.25],
            "min": [0, 0],
            "max": [10, 20],
            "quartiles": [[0.5, 1, 1.5], [1, 2, 3]],
        },
        "defaults": {"occlusion": {"window": [8, 8], "stride": [4, 4]}},
    }
    assert parse_config(raw) == ModelConfig(
        kind="image",
        input="pixels",
        output="logits",
        labels=("cat", "dog"),
        max_batch_size=16,
        baseline=-1.5,
        input_range=(-2.0, 2.0),
        image=ImageConfig(
            height=224,
            width=200,
            channels=3,
            layout="NHWC",
            scale=255.0,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        features=FeatureConfig(
            names=("a", "b"),
            mean=(1.0, 2.0),
            std=(0.5, 0.25),
            min=(0.0, 0.0),
            max=(10.0, 20.0),
            quartiles=((0.5, 1.0, 1.5), (1.0, 2.0, 3.0)),
        ),
        defaults={"occlusion": {"window": [8, 8], "stride": [4, 4]}},
    )


def test_image_defaults() -> None:
    config = parse_config({"image": {"height": 32, "width": 48}})
    assert config.image == ImageConfig(height=32, width=48)
    assert config.image.channels == 3
    assert config.image.layout == "NCHW"
    assert config.image.scale == 1.0


def test_load_config_missing_file(tmp_path: Path) -> None:
    assert load_config(tmp_path / "config.yaml") == ModelConfig()


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = _file(tmp_path, "kind: tabular\nlabels: [low, high]\nmax_batch_size: 4\n", "config.yaml")
    config = load_config(path)
    assert config == ModelConfig(kind="tabular", labels=("low", "high"), max_batch_size=4)


def test_load_config_empty_file(tmp_path: Path) -> None:
    assert load_config(_file(tmp_path, "", "config.yaml")) == ModelConfig()


@pytest.mark.parametrize(
    ("text", "match"),
    [("kind: [unclosed\n", "YAML"), ("- a\n- b\n", "mapping"), ("just text\n", "mapping")],
)
def test_load_config_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_config(_file(tmp_path, text, "config.yaml"))
