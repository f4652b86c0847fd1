"""The registry's facts, checked against the dataset descriptions of the prepare issue."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmdbnet.data.registry import DATASETS, ISPRS_PALETTE, get_spec
from cmdbnet.errors import CmdbError

POTSDAM_TRAIN = ("2_10 2_11 2_12 3_10 3_11 3_12 4_10 4_11 4_12 5_10 5_11 5_12 "
                 "6_7 6_8 6_9 6_10 6_11 6_12 7_7 7_8 7_9 7_10 7_11 7_12").split()
POTSDAM_TEST = "2_13 2_14 3_13 3_14 4_13 4_14 4_15 5_13 5_14 5_15 6_13 6_14 6_15 7_13".split()
VAIHINGEN_TRAIN = [str(i) for i in (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)]
VAIHINGEN_TEST = [str(i) for i in (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)]


@pytest.mark.parametrize("name, train, test", [("potsdam", POTSDAM_TRAIN, POTSDAM_TEST),
                                               ("vaihingen", VAIHINGEN_TRAIN, VAIHINGEN_TEST)])
def test_official_splits(name, train, test):
    spec = get_spec(name)
    assert sorted(spec.official_train) == sorted(train) and sorted(spec.official_test) == sorted(test)
    assert set(spec.val_tiles) < set(spec.official_train)  # never validate on test tiles
    assert not set(train) & set(test)


def test_isprs_colours_and_boundary():
    assert ISPRS_PALETTE == ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
    for name in ("potsdam", "vaihingen"):
        spec = get_spec(name)
        assert spec.classes == ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
        assert spec.boundary_color == (0, 0, 0) and spec.ignore_index == 255 and spec.label_kind == "color"


def test_loveda_values():
    spec = get_spec("loveda")
    assert spec.classes == ("background", "building", "road", "water", "barren", "forest", "agriculture")
    assert spec.label_values == (1, 2, 3, 4, 5, 6, 7) and spec.nodata_values == (0,)
    assert spec.tile_size == (1024, 1024) and spec.image_exts == (".png",)
    assert spec.split_folders["train"][0] == "Train" and spec.scene_folders == ("Urban", "Rural")


def test_file_names_follow_the_downloads():
    p = get_spec("potsdam")
    assert p.tile_size == (6000, 6000) and p.pixel_size_m == 0.05 and p.crs_epsg == 32633
    assert [b.download_folders[0] for b in p.bands] == ["2_Ortho_RGB", "3_Ortho_IRRG", "4_Ortho_RGBIR"]
    assert [b.count for b in p.bands] == [3, 3, 4]
    assert p.label_templates[0].format(id="2_10") == "top_potsdam_2_10_label.tif"
    assert p.eroded_label_templates[0].format(id="2_10") == "top_potsdam_2_10_label_noBoundary.tif"
    assert (p.label_folders[0], p.eroded_label_folders[0]) == ("5_Labels_all", "5_Labels_all_noBoundary")
    v = get_spec("vaihingen")
    assert v.pixel_size_m == 0.09 and v.bands[0].download_folders[0] == "top"
    assert v.label_templates[0].format(id="1") == "top_mosaic_09cm_area1.tif"
    assert {"gts_for_participants", "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE"} <= set(v.label_folders)
    assert {"gts_eroded_for_participants",
            "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"} <= set(v.eroded_label_folders)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_image_template_matches_image_pattern(name):
    spec = get_spec(name)
    for band in spec.bands:
        for tile_id in (spec.official_train or ("17",))[:3]:
            file_name = spec.image_template.format(id=tile_id, tag=band.tag)
            m = re.match(spec.image_pattern, file_name)
            assert m and m.group("id") == tile_id
            assert m.groupdict().get("tag") in (None, band.tag)


def test_unknown_names_are_one_line_errors():
    with pytest.raises(CmdbError, match="unknown dataset 'isaid'; known: potsdam, vaihingen, loveda"):
        get_spec("isaid")
    with pytest.raises(CmdbError, match="choose one of: rgb, irrg, rgbir"):
        get_spec("Potsdam").band("nir")
    assert get_spec("potsdam").to_dict()["classes"][0] == "impervious_surfaces"


def test_only_the_registry_names_a_dataset():
    package = Path(__file__).resolve().parents[2] / "cmdbnet"
    pattern = re.compile(r"""(==|!=|\bin)\s*['"](potsdam|vaihingen|loveda)['"]""", re.IGNORECASE)
    hits = [f"{p.relative_to(package)}:{i}" for p in package.rglob("*.py") if p.name != "registry.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
