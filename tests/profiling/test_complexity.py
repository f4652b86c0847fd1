"""Parameter and multiply-add counting, and ``cmdb count-params``."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.models import build_model
from cmdbnet.models.scan import scan_macs
from cmdbnet.profiling.complexity import DESIGN_BUDGET, MODULES, count_complexity
from cmdbnet.settings import ModelSettings

SMALL = dict(backbone="resnet18", pretrained="off", mamba_dims=[16, 32, 64, 128], mamba_depths=[1, 1, 2, 1],
             fusion_channels=32, num_classes=3)


def _small(**kw):
    torch.manual_seed(0)
    return build_model(ModelSettings(**{**SMALL, **kw}))


def test_modules_add_up_and_params_are_all_counted():
    net = _small()
    report = count_complexity(net, crop=64)
    assert set(report["modules"]) == set(MODULES) == {"cnn_branch", "mamba_branch", "fusion",
                                                      "boundary_refinement", "heads"}
    assert report["total"]["params"] == sum(m["params"] for m in report["modules"].values())
    assert report["total"]["params"] == sum(p.numel() for p in net.parameters())
    assert report["total"]["macs"] == sum(m["macs"] for m in report["modules"].values())
    assert report["modules"]["cnn_branch"]["params"] == sum(p.numel() for p in net.cnn.parameters())
    assert all(m["macs"] > 0 for m in report["modules"].values())


@pytest.mark.parametrize("variant", ["full", "cnn_only", "mamba_only", "no_fusion", "no_boundary"])
def test_every_variant_counts(variant):
    net = _small(variant=variant)
    report = count_complexity(net, crop=64)
    assert report["variant"] == variant
    assert report["total"]["params"] == sum(p.numel() for p in net.parameters())
    assert report["total"]["macs"] == sum(m["macs"] for m in report["modules"].values()) > 0
    absent = {"cnn_only": ["mamba_branch", "boundary_refinement"], "mamba_only": ["cnn_branch", "boundary_refinement"],
              "no_fusion": ["boundary_refinement"], "no_boundary": ["boundary_refinement"], "full": []}[variant]
    assert [k for k, m in report["modules"].items() if m["params"] == 0] == absent


def test_scan_is_counted_explicitly():
    """Mamba MACs = what the FLOP counter sees + scan_macs of each of the (depth) scan calls."""
    net = _small().eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, 3, 64, 64))
    seen = sum(fc.get_flop_counts()["CMDBNet.mamba"].values()) // 2
    # Stage i: 4 directions x expand * dims[i] channels, (64 / 2**(i+2))**2 tokens, d_state 1.
    s = ModelSettings(**SMALL)
    expected_scan = sum(depth * scan_macs(1, 4 * int(s.ssm_expand * dim), (64 >> (i + 2)) ** 2, s.d_state,
                                          has_z=False, has_D=True)
                        for i, (dim, depth) in enumerate(zip(s.mamba_dims, s.mamba_depths)))
    report = count_complexity(net, crop=64)
    assert report["modules"]["mamba_branch"]["macs"] == seen + expected_scan


def test_cnn_only_has_no_mamba_and_counts_resnet18():
    report = count_complexity(_small(variant="cnn_only"), crop=224)
    assert report["modules"]["mamba_branch"] == {"params": 0, "macs": 0}
    assert report["modules"]["boundary_refinement"] == {"params": 0, "macs": 0}
    # torchvision's published resnet18 figures: 11.69 M params (0.51 M in fc), 1.81 G MACs at 224.
    assert report["modules"]["cnn_branch"]["params"] == 11_689_512 - 513_000
    assert abs(report["modules"]["cnn_branch"]["macs"] / 1.814e9 - 1) < 0.01


def test_default_network_meets_the_budget():
    """The design budget: 34.8 M parameters (within 10%), and at most 7.0 G multiply-adds at 256 x 256."""
    torch.manual_seed(0)
    report = count_complexity(build_model(ModelSettings(pretrained="off")), crop=256)
    params, macs = report["total"]["params"], report["total"]["macs"]
    assert 31.3e6 <= params <= 38.3e6, params
    assert macs <= 7.0e9, macs
    assert report["modules"]["cnn_branch"]["params"] == 21_284_672  # resnet34 without fc


def test_count_params_cli_json(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(json.dumps({"model": {k: v for k, v in SMALL.items() if k != "pretrained"}}))
    result = CliRunner().invoke(app, ["count-params", "--config", str(cfg), "--crop", "64", "--variant",
                                      "no_boundary", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == {"crop", "variant", "modules", "total"}
    assert report["crop"] == 64 and report["variant"] == "no_boundary"
    assert set(report["modules"]) == set(MODULES)
    assert all(set(v) == {"params", "macs"} for v in report["modules"].values())
    assert report["modules"]["boundary_refinement"] == {"params": 0, "macs": 0}
    assert report["total"]["params"] == sum(v["params"] for v in report["modules"].values())
    assert report["total"]["macs"] == sum(v["macs"] for v in report["modules"].values())
    assert report["total"]["params"] == sum(p.numel() for p in _small(variant="no_boundary").parameters())


def test_count_params_cli_table(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(json.dumps({"model": {k: v for k, v in SMALL.items() if k != "pretrained"}}))
    result = CliRunner().invoke(app, ["count-params", "--config", str(cfg), "--crop", "256"])
    assert result.exit_code == 0, result.output
    as_json = CliRunner().invoke(app, ["count-params", "--config", str(cfg), "--crop", "256", "--json"])
    report = json.loads(as_json.stdout)
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 6}
    assert set(rows) == {"CNN branch", "Mamba branch", "fusion", "boundary refinement", "heads", "total"}
    # the table prints the counted figures of this network and the design's budget beside them
    assert f"{report['total']['params'] / 1e6:.2f} M" in rows["total"]
    assert f"{report['total']['macs'] / 1e9:.2f} G" in rows["total"]
    assert f"{DESIGN_BUDGET['total'][0] / 1e6:.2f} M" in rows["total"]
    assert "design params" in result.output


@pytest.mark.parametrize("args, message", [(["--variant", "huge"], "unknown variant 'huge'"),
                                           (["--crop", "8"], "data.crop")])
def test_count_params_cli_bad_input(args, message):
    result = CliRunner().invoke(app, ["count-params", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
