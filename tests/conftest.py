"""Session-wide test data: synthetic raw scenes and a prepared folder, generated once.

For everyone's tests (treat them as read-only; copy before changing anything):

* ``synth_potsdam_raw``: 6 Potsdam tiles of 256 x 256 in the download layout (RGB, IRRG,
  RGBIR, full and eroded labels), a :class:`cmdbnet.data.SynthScenes` (``.root``,
  ``.tiles[i].truth``); tile ids 2_10 (train), 2_12 (val), 2_13 (test), 2_11, 3_10, 3_11 (train).
* ``prepared_potsdam``: that raw folder prepared at crop 128 (RGB, full labels): a Path with
  train 16 / val 4 / test 4 crops and ``manifest.json``.
* ``synth_vaihingen_raw``: 4 Vaihingen tiles of 250 x 200 (rows x cols): 1 (train),
  7 (val), 2 (test), 3 (train).
* ``synth_loveda_raw``: 4 LoveDA tiles of 256 x 256: Train/Urban/0, Val/Rural/1,
  Train/Urban/2, Train/Rural/3; tiles 0 and 2 have a no-data margin on the right.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from cmdbnet.data.preparation import PrepareWarning, prepare
from cmdbnet.data.synthetic import SynthScenes, synth


@pytest.fixture(scope="session")
def synth_potsdam_raw(tmp_path_factory) -> SynthScenes:
    return synth("potsdam", tmp_path_factory.mktemp("potsdam") / "raw", tiles=6, size=256, seed=0)


@pytest.fixture(scope="session")
def prepared_potsdam(tmp_path_factory, synth_potsdam_raw) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "potsdam"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrepareWarning)  # a clean download layout: no warnings
        prepare("potsdam", synth_potsdam_raw.root, out, crop=128, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_vaihingen_raw(tmp_path_factory) -> SynthScenes:
    return synth("vaihingen", tmp_path_factory.mktemp("vaihingen") / "raw", tiles=4, size=200, seed=1)


@pytest.fixture(scope="session")
def synth_loveda_raw(tmp_path_factory) -> SynthScenes:
    return synth("loveda", tmp_path_factory.mktemp("loveda") / "raw", tiles=4, size=256, seed=2)
