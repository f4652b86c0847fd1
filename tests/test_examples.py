"""Every recipe in examples/ loads and validates; the ablation runs every variant by default."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import get_args

import pytest

from cmdbnet.settings import ModelSettings, load_settings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["potsdam.yaml", "vaihingen.yaml", "loveda.yaml", "laptop-6gb.yaml"])
def test_recipe_validates(name):
    s = load_settings(EXAMPLES / name)
    assert s.train.batch * s.train.accum == 16  # the effective batch of the default recipe
    if s.train.class_weights is not None:
        from cmdbnet.data.registry import get_spec

        assert len(s.train.class_weights) == get_spec(s.data.dataset).num_classes


def test_dataset_recipes_name_their_dataset():
    assert load_settings(EXAMPLES / "vaihingen.yaml").data.dataset == "vaihingen"
    assert load_settings(EXAMPLES / "vaihingen.yaml").data.eroded is True
    assert load_settings(EXAMPLES / "loveda.yaml").data.dataset == "loveda"


def test_ablation_runs_every_variant_by_default():
    from cmdbnet.ablation import ablation

    default = inspect.signature(ablation).parameters["variants"].default
    assert sorted(default) == sorted(get_args(ModelSettings.model_fields["variant"].annotation))


def test_cpu_quick_recipe_is_the_demo_recipe(tmp_path):
    """examples/cpu-quick.yaml documents what `cmdb demo` trains with; keep them equal."""
    from cmdbnet.demo import demo_settings

    recipe = load_settings(EXAMPLES / "cpu-quick.yaml")
    demo = demo_settings(tmp_path, "cpu", max_steps=60, minutes=5)
    for section in ("data", "model", "train"):
        want = getattr(recipe, section).model_dump()
        got = getattr(demo, section).model_dump()
        for key in ("crop", "workers", "variant", "pretrained", "batch", "accum", "amp", "lr", "schedule",
                    "warmup_steps", "val_interval", "seed"):
            if key in want:
                assert got[key] == want[key], (section, key)


@pytest.mark.parametrize("name", ["index-labels.yaml", "vector-labels.yaml"])
def test_custom_dataset_examples_validate(name):
    from cmdbnet.data.custom import read_dataset_yaml

    spec = read_dataset_yaml(EXAMPLES / "custom" / name)
    assert spec.source and spec.background == "background" and spec.num_classes >= 2
    assert (spec.vector is not None) == (name == "vector-labels.yaml")
