"""``cmdb profile-vram``: JSON and table output."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.profiling.budget import CONTEXT_RESERVE
from memory_recipes import TINY_MODEL, GiB, MiB, tiny  # noqa: F401 - tests/memory_recipes.py


def test_cli_profile_vram_json_and_table(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY_MODEL, "data": {"crop": 128}, "train": {"batch": 2, "accum": 2}}))
    runner = CliRunner()
    res = runner.invoke(app, ["profile-vram", "-c", str(cfg), "--device", "cpu", "--budget", "1GB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["device"] == "estimate" and out["config"]["batch"] == 2 and out["config"]["crop"] == 128
    assert set(out["parts"]) == {"weights", "gradients", "optimizer", "activations"}
    assert out["peak_bytes"] == sum(out["parts"].values()) + sum(out["overheads"].values())
    assert out["fits"] and all(f["peak_bytes"] + CONTEXT_RESERVE <= GiB for f in out["fits"])
    assert all(f["config"]["effective_batch"] == 4 for f in out["fits"])
    assert out["fits"][0]["config"]["crop"] == 128

    res = runner.invoke(app, ["profile-vram", "-c", str(cfg), "--device", "cpu", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["fits"] == []

    res = runner.invoke(app, ["profile-vram", "-c", str(cfg), "--device", "cpu", "--no-amp", "--budget", "1GB"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.replace("│", " ").split())
    assert "estimated for a CUDA run" in text and "fp32" in text and "Recipes that fit 1.00 GiB" in text
    assert "| 1 | 4 x 1 | 128 | fp16 | no |" in " ".join(res.stdout.replace("│", " | ").split())
