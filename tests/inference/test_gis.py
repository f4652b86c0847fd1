"""Outputs for GIS tools: COG layout read back with rasterio, the VRT mosaic, the GeoPackage."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from cmdbnet.cli import app
from cmdbnet.data.registry import ISPRS_CLASSES

pyogrio = pytest.importorskip("pyogrio", reason="--vector needs the gis extra (pyogrio)")


def cli(*args):
    return CliRunner().invoke(app, ["predict", *[str(a) for a in args]])


def block_offsets(path: Path, overview: int | None = None) -> list[int]:
    kw = {"overview_level": overview} if overview is not None else {}
    with rasterio.open(path, **kw) as src:
        return [int(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1))
                for (r, c), _ in src.block_windows(1)]


def test_cog_products_are_cloud_optimised_and_hold_the_same_pixels(tiny_ckpt, city, tmp_path):
    src = city.write_tif(tmp_path / "scene.tif", 320, 320, seed=1)
    flags = ["-k", tiny_ckpt, "--tile", "64", "--format", "both", "--probs", "--boundary", "--device", "cpu"]
    res = cli(src, "-o", tmp_path / "cog", "--cog", *flags)
    assert res.exit_code == 0, res.output
    assert cli(src, "-o", tmp_path / "plain", *flags).exit_code == 0
    for product in ("mask", "color", "probs", "boundary"):
        path = tmp_path / "cog" / f"scene_{product}.tif"
        head = path.read_bytes()[:400]
        assert b"LAYOUT=IFDS_BEFORE_DATA" in head and b"BLOCK_ORDER=ROW_MAJOR" in head  # COG ghost header
        with rasterio.open(path) as c, rasterio.open(tmp_path / "plain" / path.name) as p:
            assert c.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and c.profile["tiled"]
            assert c.block_shapes[0] == (256, 256) and c.overviews(1) == [2]
            assert np.array_equal(c.read(masked=False), p.read(masked=False), equal_nan=True)
            assert c.crs == p.crs and c.transform == p.transform
            assert c.tags()["cmdb_fingerprint"] != p.tags()["cmdb_fingerprint"]  # --cog: another run's output
        # IFDs first, then the overview's blocks, then full resolution: a reader streams the overview alone
        assert max(block_offsets(path, overview=0)) < min(block_offsets(path))
    with rasterio.open(tmp_path / "cog" / "scene_mask.tif") as m:
        assert m.colormap(1)[1][:3] == (0, 0, 255) and m.nodata == 255
        overview = m.read(1, out_shape=(160, 160))
        assert set(np.unique(overview)) <= set(np.unique(m.read(1)))  # nearest: class ids only
    with rasterio.open(tmp_path / "cog" / "scene_probs.tif") as p:
        full = p.read(1)
        mean = full.reshape(160, 2, 160, 2).mean(axis=(1, 3))
        assert np.abs(p.read(1, out_shape=(160, 160)) - mean).max() < 2e-3  # average
    again = cli(src, "-o", tmp_path / "cog", "--cog", *flags)
    assert again.exit_code == 0 and "skipped" in again.stdout  # COGs verify as complete too


@pytest.fixture(scope="module")
def mosaic_run(tiny_ckpt, city, tmp_path_factory):
    """Five adjacent tiles plus one in another CRS, predicted with --vector: (folder, out, result)."""
    root = tmp_path_factory.mktemp("mosaic")
    inputs = city.make_folder(root / "in")
    city.write_tif(inputs / "zone32.tif", 96, 96, seed=8, crs="EPSG:32632")
    res = cli(inputs, "-o", root / "out", "-k", tiny_ckpt, "--tile", "64", "--device", "cpu",
              "--vector", root / "out" / "city.gpkg")
    assert res.exit_code == 0, res.output
    return inputs, root / "out", res


def test_vrt_mosaic_opens_as_one_layer_with_the_masks_and_colours(mosaic_run, city):
    _, out, res = mosaic_run
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("cmdb: note:")]
    assert any("zone32_mask.tif is in EPSG:32632, not EPSG:32633; left out of mosaic.vrt" in n for n in notes)
    assert (out / "zone32_mask.tif").is_file()  # its mask is still written
    with rasterio.open(out / "mosaic.vrt") as vrt:
        assert vrt.driver == "VRT" and vrt.crs.to_epsg() == 32633 and (vrt.width, vrt.height) == (480, 480)
        assert vrt.res == (city.gsd, city.gsd) and vrt.nodata == 255
        mosaic = vrt.read(1)
        with rasterio.open(out / "a_mask.tif") as a:
            assert [vrt.colormap(1)[i] for i in range(6)] == [a.colormap(1)[i] for i in range(6)]
    covered = np.zeros_like(mosaic, dtype=bool)
    for name, h, w, _, (col, row) in city.layout:
        with rasterio.open(out / f"{name}_mask.tif") as m:
            assert np.array_equal(mosaic[row:row + h, col:col + w], m.read(1)), name
        covered[row:row + h, col:col + w] = True
    assert (mosaic[~covered] == 255).all() and (~covered).any()


def test_geopackage_polygons_cover_the_masks_class_by_class(mosaic_run, tiny_ckpt, city):
    inputs, out, _ = mosaic_run
    assert [name for name, _ in pyogrio.list_layers(out / "city.gpkg")] == ["segments"]
    meta, _, geometry, fields = pyogrio.raw.read(out / "city.gpkg", layer="segments")
    cols = dict(zip(meta["fields"], fields))
    assert set(meta["fields"]) >= {"source", "class", "area"} and meta["geometry_type"] == "Polygon"
    assert "32633" in meta["crs"] and len(geometry) > 10
    assert "zone32_mask.tif" not in set(cols["source"])  # other CRS: left out, with a note
    pixel = city.gsd ** 2
    for name, *_ in city.layout:
        with rasterio.open(out / f"{name}_mask.tif") as m:
            mask = m.read(1)
        mine = cols["source"] == f"{name}_mask.tif"
        for k, cls in enumerate(ISPRS_CLASSES):
            want = float((mask == k).sum()) * pixel
            got = float(cols["area"][mine & (cols["class"] == cls)].sum())
            assert abs(got - want) <= 0.01 * want + 1e-9, (name, cls, got, want)
    # a re-run with a class filter predicts nothing again and rewrites the GeoPackage
    res = cli(inputs, "-o", out, "-k", tiny_ckpt, "--tile", "64", "--device", "cpu",
              "--vector", out / "city.gpkg", "--vector-classes", "building, Car")
    assert res.exit_code == 0 and res.stdout.count("skipped") == len(city.layout) + 1, res.output
    _, _, _, fields = pyogrio.raw.read(out / "city.gpkg", layer="segments")
    assert set(fields[1]) <= {"building", "car"} and len(fields[1]) > 0
    assert not [p for p in os.listdir(out) if p.startswith(".")]


@pytest.mark.parametrize("args, needle", [
    (["--vector-classes", "building"], "--vector-classes needs --vector"),
    (["--vector", "x.shp"], "must be a GeoPackage (.gpkg)"),
    (["--vector", "x.gpkg", "--vector-classes", "roads"], "unknown class 'roads'; this checkpoint has"),
    (["--vector", "x.gpkg", "--format", "color"], "--format index or both"),
])
def test_bad_vector_options_fail_before_any_work(tiny_ckpt, city, tmp_path, monkeypatch, args, needle):
    src = city.write_tif(tmp_path / "s.tif", 64, 64, seed=3)
    monkeypatch.chdir(tmp_path)
    res = cli(src, "-o", tmp_path / "out", "-k", tiny_ckpt, *args)
    err = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.gpkg").exists()
