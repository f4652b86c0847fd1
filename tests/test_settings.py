"""Settings: defaults < YAML file < CMDB_* environment < flags; one line per bad field; config show."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.errors import ConfigError
from cmdbnet.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("CMDB_"):
            monkeypatch.delenv(key)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cmdb.yaml"
    path.write_text(yaml.safe_dump({"data": {"crop": 64, "workers": 0}, "train": {"batch": 3, "lr": 0.001}}))
    return path


def test_precedence_file_env_flag(config, monkeypatch):
    assert load_settings().data.crop == 256  # default
    assert load_settings(config).data.crop == 64
    monkeypatch.setenv("CMDB_DATA__CROP", "96")
    s = load_settings(config)
    assert (s.data.crop, s.train.batch, s.train.lr) == (96, 3, 0.001)  # env over file, file kept elsewhere
    s = load_settings(config, {"data": {"crop": 128, "stride": None}, "train": {"batch": None}})
    assert (s.data.crop, s.data.stride, s.train.batch) == (128, None, 3)  # unset flags hide nothing


def test_precedence_through_cmdb_prepare(config, synth_vaihingen_raw, tmp_path):
    runner = CliRunner()

    def crop_used(*extra: str, env: dict | None = None) -> int:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = runner.invoke(app, ["prepare", "vaihingen", "--root", str(synth_vaihingen_raw.root), "--out",
                                     str(out), "--config", str(config), "--json", *extra], env=env)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["crop"]

    assert crop_used() == 64
    assert crop_used(env={"CMDB_DATA__CROP": "96"}) == 96
    assert crop_used("--crop", "128", env={"CMDB_DATA__CROP": "96"}) == 128


def test_validation_errors_are_one_line_per_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"crop": 8}, "train": {"batch": 0, "nonsense": 1}}))
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert any(line.startswith("settings: data.crop:") and "(got 8)" in line for line in lines)
    assert any(line.startswith("settings: train.batch:") and "(got 0)" in line for line in lines)
    assert "settings: train.nonsense: unknown setting (got 1)" in lines

    result = CliRunner().invoke(app, ["config", "show", "--config", str(bad)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line.split(":")[0] for line in result.stderr.strip().splitlines()] == ["cmdb"] * 3


@pytest.mark.parametrize("text, message", [
    ("data: [1, 2", "not valid YAML (line"),
    ("- just\n- a list\n", "expected a mapping of sections"),
    ("datta: {crop: 64}\n", "unknown section(s) datta"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.yaml")


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("CMDB_TRAIN__BATCH", "many")
    with pytest.raises(ConfigError, match="settings: train.batch: .*'many'"):
        load_settings()


def test_config_show_yaml_and_json(config):
    runner = CliRunner()
    result = runner.invoke(app, ["config", "show", "--config", str(config)], env={"CMDB_TRAIN__BATCH": "2"})
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert list(shown) == ["data", "model", "train", "predict"]
    assert (shown["data"]["crop"], shown["train"]["batch"], shown["train"]["lr"]) == (64, 2, 0.001)
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["data"]["crop"] == 256
    assert "config" in runner.invoke(app, ["--help"]).stdout
