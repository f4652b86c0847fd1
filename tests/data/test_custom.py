"""A user's own dataset: YAML -> DatasetSpec, index/colour/vector labels, band selection, splits."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from custom_scene import (
    COLOURS,
    CRS,
    NAMES,
    image,
    index_dataset,
    polygonise,
    transform,
    truth,
    write_raster,
    write_yaml,
)
from PIL import Image
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.data import prepare
from cmdbnet.data.custom import read_dataset_yaml
from cmdbnet.data.preparation import PrepareWarning
from cmdbnet.errors import CmdbError


def assemble(out: Path, manifest: dict, image_stem: str, size: int) -> np.ndarray:
    """The prepared labels of one image put back together (255 where no crop lies)."""
    got = np.full((size, size), 254, np.uint8)
    for split, stems in manifest["crops"].items():
        for stem in stems:
            if not stem.startswith(image_stem + "_"):
                continue
            with rasterio.open(out / split / "labels" / f"{stem}.tif") as src:
                y, x = map(int, stem.rsplit("_", 2)[1:])
                got[y:y + src.height, x:x + src.width] = src.read(1)
    return got


def test_index_labels_from_yaml(tmp_path):
    yml, truths = index_dataset(tmp_path / "raw", n=3, split={"val": ["scene1"]})
    spec = read_dataset_yaml(yml)
    assert (spec.name, spec.label_kind, spec.label_values, spec.nodata_values) == ("mine", "index", (10, 20, 30), (0,))
    m = prepare(str(yml), None, tmp_path / "out", crop=64, progress=False)
    assert m["dataset"] == "mine" and m["classes"] == NAMES and m["palette"][1] == list(COLOURS[1])
    assert m["splits"] == {"train": {"tiles": 2, "crops": 8}, "val": {"tiles": 1, "crops": 4}}
    assert m["dataset_spec"]["source"] == str(yml) and len(m["mean"]) == 3  # stats even for 8-bit data
    for i, t in enumerate(truths):
        assert np.array_equal(assemble(tmp_path / "out", m, f"scene{i}", 128), t)
    assert m["class_pixels"]["val"]["ignored"] == 128 * 4


def test_colour_labels(tmp_path):
    root = tmp_path / "raw"
    t = truth(128, 128, seed=5)
    rgb = np.moveaxis(np.array(COLOURS + [(9, 9, 9)], np.uint8)[np.where(t == 255, 3, t)], -1, 0)
    write_raster(root / "img" / "a.tif", image(t, 3, "uint8", 5))
    (root / "gt").mkdir()
    Image.fromarray(np.moveaxis(rgb, 0, -1)).save(root / "gt" / "a_mask.png")
    yml = write_yaml(root / "d.yaml", {"name": "colours", "images": "img", "labels": "gt",
                                       "label_pattern": "{stem}_mask.png",
                                       "classes": [{"name": n, "color": list(c)} for n, c in zip(NAMES, COLOURS)]})
    m = prepare(yml, None, tmp_path / "out", crop=64, progress=False)
    assert m["dataset_spec"]["label_kind"] == "color"
    assert np.array_equal(assemble(tmp_path / "out", m, "a", 128), t)


def test_vector_labels_in_another_crs_rasterise_back(tmp_path):
    """Polygons in EPSG:4326 over a UTM image come back as the original labels (>= 99.5%)."""
    pytest.importorskip("pyogrio")
    root = tmp_path / "raw"
    size = 192
    truths = [truth(size, size, seed=s) for s in (11, 12)]
    for i, t in enumerate(truths):
        tf = transform((500_000.0 + 200 * i, 5_800_000.0))
        write_raster(root / "images" / f"t{i}.tif", image(t, 3, "uint8", i), tf=tf)
        polygonise(t, tf, CRS, "EPSG:4326", root / f"part{i}.gpkg")
    # one layer for both images (and a third image it does not cover)
    import pyogrio

    for i in range(2):
        pyogrio.raw.write(str(root / "labels.gpkg"), *_read(root / f"part{i}.gpkg"), layer="labels", append=i > 0,
                      geometry_type="Polygon", crs="EPSG:4326")
    write_raster(root / "images" / "far.tif", image(truths[0], 3, "uint8", 9), tf=transform((600_000.0, 5_900_000.0)))
    yml = write_yaml(root / "v.yaml", {"name": "vec", "images": "images", "labels": "labels.gpkg",
                                       "vector": {"field": "kind", "outside": "background"},
                                       "classes": [{"name": n} for n in NAMES]})
    with pytest.warns(PrepareWarning, match="far.tif"):
        m = prepare(yml, None, tmp_path / "out", crop=64, progress=False)
    assert m["splits"]["train"]["tiles"] == 2
    for i, t in enumerate(truths):
        agree = (assemble(tmp_path / "out", m, f"t{i}", size) == t).mean()
        assert agree >= 0.995, agree


def _read(path: Path):
    import pyogrio

    meta, _, geoms, fields = pyogrio.raw.read(str(path))
    return geoms, fields, meta["fields"]


def test_blocks_of_one_image_never_overlap_across_splits(tmp_path):
    yml, _ = index_dataset(tmp_path / "raw", n=1, size=192,
                           split={"val": 0.25, "test": 0.25, "blocks": 48, "seed": 1})
    m = prepare(yml, None, tmp_path / "out", crop=16, stride=16, progress=False)
    assert set(m["splits"]) == {"train", "val", "test"} and (tmp_path / "out" / "split.png").is_file()
    assert all("window" in s for s in m["sources"])
    boxes = {s: [tuple(map(int, st.rsplit("_", 2)[1:])) for st in stems] for s, stems in m["crops"].items()}
    for a in boxes:
        for b in boxes:
            if a < b:
                ya = np.array(boxes[a])[:, None]
                yb = np.array(boxes[b])[None]
                # crops of two splits lie a crop (16 px) apart or more: their offsets differ by >= 32 on an axis
                near = (np.abs(ya[..., 0] - yb[..., 0]) < 32) & (np.abs(ya[..., 1] - yb[..., 1]) < 32)
                assert not near.any(), (a, b)


def test_band_selection_and_uint16_statistics(tmp_path):
    yml, _ = index_dataset(tmp_path / "raw", n=2, size=64, bands=5, dtype="uint16")
    m = prepare(yml, None, tmp_path / "out", crop=64, bands="4,3,2,1", progress=False)
    assert (m["band_count"], m["dtype"], m["band_indexes"]) == (4, "uint16", [4, 3, 2, 1])
    with rasterio.open(tmp_path / "out" / "train" / "images" / "scene0_00000_00000.tif") as src:
        crop = src.read()
    with rasterio.open(tmp_path / "raw" / "images" / "scene0.tif") as src:
        full = src.read()
    assert np.array_equal(crop, full[[3, 2, 1, 0]])
    with rasterio.open(tmp_path / "raw" / "images" / "scene1.tif") as src:
        band4 = np.concatenate([full[3], src.read(4)]).astype(np.float64)
    assert m["mean"][0] == pytest.approx(band4.mean(), abs=1e-3) and m["std"][0] == pytest.approx(band4.std(), 1e-4)
    with pytest.raises(CmdbError, match=r"scene0.tif: --bands 6,1: band 6 is out of range \(the image has 5"):
        prepare(yml, None, tmp_path / "out2", crop=64, bands="6,1", progress=False)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(clases=d.pop("classes")), r"dataset.yaml: clases: unknown key \(a typo\?\)"),
    (lambda d: d["classes"].pop(), r"scene0.tif: label value 30 is not in the mine palette \(\d+ px\).*dataset.yaml"),
    (lambda d: d.update(labels="missing"), r"dataset.yaml: label folder not found: .*missing"),
    (lambda d: d.update(labels="nolabels"), r"image without its label: .*scene0.tif \(expected .*nolabels/scene0.tif"),
])
def test_bad_yaml_and_labels(tmp_path, change, message):
    yml, _ = index_dataset(tmp_path / "raw", n=1, size=64)
    import yaml

    doc = yaml.safe_load(yml.read_text())
    change(doc)
    write_yaml(yml, doc)
    (tmp_path / "raw" / "nolabels").mkdir()
    r = CliRunner().invoke(app, ["prepare", str(yml), "--out", str(tmp_path / "out"), "--crop", "64"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert __import__("re").search(message, r.output), r.output
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_image_without_label_and_vector_errors(tmp_path):
    yml, _ = index_dataset(tmp_path / "raw", n=2, size=64)
    (tmp_path / "raw" / "labels" / "scene1.tif").unlink()
    with pytest.raises(CmdbError, match="image without its label: .*scene1.tif"):
        prepare(yml, None, tmp_path / "out", crop=64, progress=False)
    pytest.importorskip("pyogrio")
    root = tmp_path / "raw"
    t = truth(64, 64, 3)
    far = polygonise(t, transform((0.0, 0.0)), CRS, CRS, root / "far.gpkg")
    doc = {"name": "v", "images": "images", "labels": far.name, "vector": {"field": "kind"},
           "classes": [{"name": n} for n in NAMES]}
    with pytest.raises(CmdbError, match="far.gpkg: no feature of the layer lies over any image"):
        prepare(write_yaml(root / "v.yaml", doc), None, tmp_path / "o2", crop=64, progress=False)
    doc["vector"]["field"] = "klass"
    with pytest.raises(CmdbError, match="far.gpkg: class field 'klass' missing; the layer's fields: kind"):
        prepare(write_yaml(root / "v.yaml", doc), None, tmp_path / "o3", crop=64, progress=False)
    # an image without a CRS cannot receive polygons that have one
    write_raster(root / "plain" / "p.tif", image(t, 3, "uint8", 0), crs=None)
    doc.update(images="plain", vector={"field": "kind"})
    with pytest.raises(CmdbError, match="p.tif: cannot place the polygons of .*far.gpkg: the image has no CRS"):
        prepare(write_yaml(root / "v.yaml", doc), None, tmp_path / "o4", crop=64, progress=False)
    assert not any((tmp_path / o / "manifest.json").exists() for o in ("out", "o2", "o3", "o4"))


def test_invalid_geometry_is_repaired(tmp_path):
    pyogrio = pytest.importorskip("pyogrio")
    import shapely

    root = tmp_path / "raw"
    write_raster(root / "images" / "a.tif", image(np.zeros((64, 64), np.uint8), 3, "uint8", 0))
    x0, y0 = 500_000.0, 5_800_000.0
    bowtie = shapely.Polygon([(x0, y0), (x0 + 32, y0 - 32), (x0 + 32, y0), (x0, y0 - 32)])  # self-intersecting
    assert not bowtie.is_valid
    pyogrio.raw.write(str(root / "l.gpkg"), np.array([shapely.to_wkb(bowtie)], dtype=object),
                  [np.array(["building"], dtype=object)], ["kind"], geometry_type="Polygon", crs=CRS)
    yml = write_yaml(root / "v.yaml", {"name": "v", "images": "images", "labels": "l.gpkg",
                                       "vector": {"field": "kind", "outside": "ignore"},
                                       "classes": [{"name": n} for n in NAMES]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = prepare(yml, None, tmp_path / "out", crop=64, progress=False)
    assert any("1 invalid geometr" in str(w.message) for w in caught)
    px = m["class_pixels"]["train"]
    assert px["building"] > 400 and px["background"] == 0 and px["ignored"] == 64 * 64 - px["building"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["dataset_spec"]["vector"]["outside"] == "ignore"


def test_starter_yaml_from_a_look_at_the_data(tmp_path):
    pytest.importorskip("pyogrio")
    yml, truths = index_dataset(tmp_path / "raw", n=2, size=64)
    root = tmp_path / "raw"
    cli = CliRunner()
    r = cli.invoke(app, ["prepare", "custom", "--images", str(root / "images"), "--labels", str(root / "labels"),
                         "--init", str(root / "index.yaml"), "--json"])
    assert r.exit_code == 0, r.output
    found = json.loads(r.stdout)
    assert found["kind"] == "index" and found["pixels"]["0"] == 2 * 64 * 4  # the unlabelled margins
    assert sum(found["pixels"].values()) == 2 * 64 * 64
    spec = read_dataset_yaml(root / "index.yaml")
    assert spec.label_values == (0, 10, 20, 30) and spec.bands[0].band_names == ("band1", "band2", "band3")
    # a layer whose text field names the classes: the starter works as written
    for i, t in enumerate(truths):
        polygonise(np.where(t == 255, 0, t), transform((500_000.0 + 1000 * i, 5_800_000.0)), CRS, CRS,
                   root / f"p{i}.gpkg")
    import pyogrio

    for i in range(2):
        pyogrio.raw.write(str(root / "all.gpkg"), *_read(root / f"p{i}.gpkg"), layer="labels", append=i > 0,
                          geometry_type="Polygon", crs=CRS)
    r = cli.invoke(app, ["prepare", "custom", "--images", str(root / "images"), "--labels", str(root / "all.gpkg"),
                         "--init", str(root / "vector.yaml")])
    assert r.exit_code == 0, r.output
    m = prepare(root / "vector.yaml", None, tmp_path / "out", crop=64, progress=False)
    assert m["classes"] == NAMES and set(m["splits"]) == {"train", "val"}
    r = cli.invoke(app, ["prepare", "custom", "--images", str(root / "images"), "--labels", str(root / "all.gpkg"),
                         "--init", str(root / "vector.yaml")])
    assert r.exit_code == 2 and "vector.yaml exists" in r.output
