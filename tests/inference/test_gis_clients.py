"""What GIS clients read from our files: GeoPackage version and areas, the VRT's grid and
overviews, QGIS styles, GDAL scale and predictor (checked with GDAL 3.6 where it is installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine, from_origin

from cmdbnet.data.registry import ISPRS_CLASSES, ISPRS_PALETTE
from cmdbnet.errors import CmdbError
from cmdbnet.inference.gis import reference_crs, to_cog, write_vrt
from cmdbnet.inference.preview import save_preview
from cmdbnet.inference.styles import qml_text

pyogrio = pytest.importorskip("pyogrio", reason="--vector needs the gis extra (pyogrio)")
from cmdbnet.inference.vector import check_vector, merge_polygon_parts, polygonise, write_polygons  # noqa: E402

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-gdal: GDAL 3.6 and its validate_gpkg.py


def _system_gdal() -> bool:
    return Path(SYSTEM_PYTHON).exists() and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import osgeo_utils.samples.validate_gpkg"], capture_output=True).returncode == 0


def write_mask(path: Path, mask: np.ndarray, transform=None, crs="EPSG:32633", cog=False) -> Path:
    kw = dict(crs=crs, transform=transform) if transform is not None else {}
    tmp = path.with_name("plain_" + path.name) if cog else path
    with rasterio.open(tmp, "w", driver="GTiff", width=mask.shape[1], height=mask.shape[0], count=1,
                       dtype="uint8", nodata=255, photometric="palette", **kw) as d:
        d.write(mask, 1)
        d.write_colormap(1, {i: tuple(c) for i, c in enumerate(ISPRS_PALETTE)})
    if cog:
        to_cog(tmp, path, "mask")
        tmp.unlink()
    return path


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.repeat(np.repeat(rng.integers(0, 6, (h // 8 + 1, w // 8 + 1)), 8, 0), 8, 1)[:h, :w].astype(np.uint8)


# ------------------------------------------------------------------ GeoPackage (items 4, 12, 13, 14)
def test_polygon_areas_are_exact_at_utm_coordinates_and_equal_shapelys(tmp_path):
    shapely = pytest.importorskip("shapely")
    mask = _scene(64, 64, 1)
    mask[10, 10], mask[9:12, 9:12] = 5, 2  # a one-pixel polygon inside a ring: a hole
    mask[9:12, 9:12][1, 1] = 5
    t = from_origin(368123.45, 5808765.55, 0.05, 0.05)  # 5 cm pixels at UTM eastings / northings
    p = polygonise(write_mask(tmp_path / "m.tif", mask, t), list(range(6)), ISPRS_CLASSES)
    geoms = shapely.from_wkb(p["wkb"])
    ours, theirs = np.array(p["area"]), shapely.area(geoms)
    assert np.allclose(ours, theirs, rtol=1e-6, atol=0)
    one = [a for a, g in zip(ours, geoms) if g.bounds[0] == 368123.45 + 10 * 0.05]
    assert one and abs(one[0] - 0.0025) <= 1e-6 * 0.0025  # a one-pixel polygon: 0.0025 m2, not 0.0029
    for k in range(6):
        got = sum(a for a, c in zip(ours, p["class_id"]) if c == k)
        assert abs(got - (mask == k).sum() * 0.0025) <= 1e-9 * max(got, 1)


def test_mask_without_georeferencing_is_traced_where_qgis_draws_it(tmp_path):
    mask = np.full((8, 8), 0, np.uint8)
    mask[2, 3] = 4
    p = polygonise(write_mask(tmp_path / "m.tif", mask), [4], ISPRS_CLASSES)
    shapely = pytest.importorskip("shapely")
    assert p["crs"] is None and shapely.from_wkb(p["wkb"][0]).bounds == (3.0, -3.0, 4.0, -2.0)  # y = -row


def test_geopackage_is_version_1_2_keeps_the_users_layers_and_passes_gdal_36(tmp_path):
    mask = _scene(48, 48, 2)
    t = from_origin(368000, 5808000, 0.5, 0.5)
    part = tmp_path / "part.gpkg"
    write_polygons(part, [polygonise(write_mask(tmp_path / "m.tif", mask, t), list(range(6)), ISPRS_CLASSES)],
                   "EPSG:32633")
    fresh, user = tmp_path / "fresh.gpkg", tmp_path / "project.gpkg"
    n = merge_polygon_parts([part], fresh, "EPSG:32633")
    roads = np.array([bytes.fromhex("0101000000" + "00" * 16)], dtype=object)
    pyogrio.raw.write(str(user), roads, [np.array(["A1"], dtype=object)], ["name"], layer="roads",
                      driver="GPKG", geometry_type="Point", crs="EPSG:32633")
    check_vector(user, None, ISPRS_CLASSES)
    for _ in range(2):  # a re-run replaces our layer, never appends to it
        assert merge_polygon_parts([part], user, "EPSG:32633") == n
    assert sorted(str(name) for name, _ in pyogrio.list_layers(user)) == ["roads", "segments"]
    assert list(pyogrio.raw.read(user, layer="roads")[3][0]) == ["A1"]
    assert len(pyogrio.raw.read(user, layer="segments")[2]) == n
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with open(fresh, "rb") as f:  # SQLite header: application_id 'GPKG' at 68, user_version 10200 at 60
        head = f.read(72)
    assert head[68:72] == b"GPKG" and int.from_bytes(head[60:64], "big") == 10200
    if not _system_gdal():
        pytest.skip(f"{SYSTEM_PYTHON} lacks GDAL's osgeo bindings (Debian: apt install python3-gdal)")
    res = subprocess.run([SYSTEM_PYTHON, "-m", "osgeo_utils.samples.validate_gpkg", str(fresh)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_vector_refuses_a_file_that_is_not_ours_to_replace(tmp_path):
    text = tmp_path / "notes.gpkg"
    text.write_text("my notes\n")
    with pytest.raises(CmdbError, match="exists and is not a GeoPackage"):
        check_vector(text, None, ISPRS_CLASSES)
    foreign = tmp_path / "f.gpkg"
    point = np.array([bytes.fromhex("0101000000" + "00" * 16)], dtype=object)
    pyogrio.raw.write(str(foreign), point, [np.array([1])], ["id"], layer="segments", driver="GPKG", crs="EPSG:32633",
                      geometry_type="Point")
    with pytest.raises(CmdbError, match="has a layer 'segments' that cmdb did not write"):
        check_vector(foreign, None, ISPRS_CLASSES)
    assert text.read_text() == "my notes\n"


# ------------------------------------------------------------------------------ VRT (items 7, 14)
@pytest.mark.parametrize("kind", ["rotated", "south_up"])
def test_vrt_keeps_a_rotated_or_south_up_grid(tmp_path, kind):
    base = (Affine.translation(368000, 5808000) * Affine.rotation(30) * Affine.scale(0.5, -0.5)
            if kind == "rotated" else Affine(0.5, 0, 368000, 0, 0.5, 5800000))
    tiles = {"a": (base, _scene(32, 40, 1)), "b": (base * Affine.translation(40, 16), _scene(32, 24, 2))}
    paths = [write_mask(tmp_path / f"{n}.tif", m, t) for n, (t, m) in tiles.items()]
    vrt, notes = write_vrt(paths, tmp_path / "mosaic.vrt")
    assert not notes
    with rasterio.open(vrt) as v:
        assert (v.width, v.height) == (64, 48) and v.transform.almost_equals(base)
        mosaic = v.read(1)
    assert np.array_equal(mosaic[:32, :40], tiles["a"][1]) and np.array_equal(mosaic[16:48, 40:64], tiles["b"][1])


def test_vrt_over_cog_masks_has_overviews_category_names_and_the_majority_crs(tmp_path):
    t = from_origin(368000, 5808000, 0.5, 0.5)
    paths = [write_mask(tmp_path / "a.tif", _scene(600, 600, 1), t, crs="EPSG:32632", cog=True),
             write_mask(tmp_path / "b.tif", _scene(300, 600, 2), t * Affine.translation(600, 0), cog=True),
             write_mask(tmp_path / "c.tif", _scene(100, 100, 3), t * Affine.translation(0, 600), cog=True)]
    assert reference_crs(paths).to_epsg() == 32633  # two of three, though a.tif comes first
    vrt, notes = write_vrt(paths, tmp_path / "mosaic.vrt", ISPRS_CLASSES)
    assert len(notes) == 1 and "a.tif is in EPSG:32632, not EPSG:32633" in notes[0]
    ov = ET.parse(vrt).getroot().find("OverviewList")
    assert ov is not None and ov.text == "2 4" and ov.get("resampling") == "nearest"
    with rasterio.open(vrt) as v:
        assert v.overviews(1) == [2, 4] and v.crs.to_epsg() == 32633
    if not shutil.which("gdalinfo", path="/usr/bin") or not shutil.which("gdalbuildvrt", path="/usr/bin"):
        pytest.skip("GDAL's command-line tools (Debian: gdal-bin) are not installed")
    ours = subprocess.run(["/usr/bin/gdalinfo", str(vrt)], capture_output=True, text=True, check=True).stdout
    subprocess.run(["/usr/bin/gdalbuildvrt", "-q", str(tmp_path / "ref.vrt"), *map(str, paths[1:])], check=True)
    ref = subprocess.run(["/usr/bin/gdalinfo", str(tmp_path / "ref.vrt")], capture_output=True, text=True).stdout
    overviews = [ln.strip() for ln in ours.splitlines() if ln.strip().startswith("Overviews:")]
    assert overviews == ["Overviews: 600x350, 300x175"]
    assert overviews == [ln.strip() for ln in ref.splitlines() if ln.strip().startswith("Overviews:")]
    assert "Categories:" in ours and "1: building" in ours


# ---------------------------------------------------------------------------- styles (item 15)
# Element paths of the paletted raster styles QGIS 3.x writes (QgsPalettedRasterRenderer::writeXml
# inside QgsMapLayer's style document), of which a style may hold any subset.
QGIS_PALETTED_PATHS = {
    "qgis", "qgis/flags", "qgis/temporal", "qgis/customproperties", "qgis/pipe", "qgis/pipe/provider",
    "qgis/pipe/rasterrenderer", "qgis/pipe/rasterrenderer/rasterTransparency",
    "qgis/pipe/rasterrenderer/minMaxOrigin", *(f"qgis/pipe/rasterrenderer/minMaxOrigin/{t}" for t in (
        "limits", "extent", "statAccuracy", "cumulativeCutLower", "cumulativeCutUpper", "stdDevFactor")),
    "qgis/pipe/rasterrenderer/colorPalette", "qgis/pipe/rasterrenderer/colorPalette/paletteEntry",
    "qgis/pipe/rasterrenderer/colorramp", "qgis/pipe/brightnesscontrast", "qgis/pipe/huesaturation",
    "qgis/pipe/rasterresampler", "qgis/pipe/resamplingStage", "qgis/blendMode",
}


def _paths(el: ET.Element, prefix: str = "") -> set[str]:
    here = f"{prefix}{el.tag}"
    return {here}.union(*(_paths(c, here + "/") for c in el))


def test_qgis_style_is_a_paletted_renderer_with_class_names(tmp_path):
    text = qml_text(ISPRS_CLASSES, ISPRS_PALETTE)
    assert text.startswith("<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>")
    root = ET.fromstring(text.split("\n", 1)[1])
    assert _paths(root) <= QGIS_PALETTED_PATHS and root.get("version", "").startswith("3.")
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("label"), e.get("color"), e.get("alpha")) for e in entries] == [
        (str(i), c, "#" + bytes(ISPRS_PALETTE[i]).hex(), "255") for i, c in enumerate(ISPRS_CLASSES)]
    assert "impervious_surfaces" in {e.get("label") for e in entries}


def test_predict_writes_styles_scale_predictor_and_one_crs_rule(tiny_ckpt, city, tmp_path):
    from typer.testing import CliRunner

    from cmdbnet.cli import app

    inputs = tmp_path / "in"
    inputs.mkdir()
    city.write_tif(inputs / "a.tif", 64, 64, seed=1, crs="EPSG:32632")  # first, but in the minority CRS
    city.write_tif(inputs / "b.tif", 64, 64, seed=2, corner=(64, 0))
    city.write_tif(inputs / "c.tif", 64, 64, seed=3, corner=(0, 64))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["predict", str(inputs), "-o", str(out), "-k", str(tiny_ckpt), "--tile", "64",
                                   "--device", "cpu", "--probs", "--boundary", "--vector", str(out / "p.gpkg")])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["crs"] == "EPSG:32633"
    with rasterio.open(out / "mosaic.vrt") as v:
        assert v.crs.to_epsg() == 32633
    cols = dict(zip(*(lambda r: (r[0]["fields"], r[3]))(pyogrio.raw.read(out / "p.gpkg", layer="segments"))))
    assert set(cols["source"]) == {"b_mask.tif", "c_mask.tif"}
    assert "32633" in pyogrio.read_info(out / "p.gpkg", layer="segments")["crs"]
    for name in ("a", "b", "c"):
        assert ET.parse(out / f"{name}_mask.qml").getroot().find("pipe/rasterrenderer").get("type") == "paletted"
    assert (out / "mosaic.qml").is_file()
    with rasterio.open(out / "b_boundary.tif") as b:
        assert b.scales == (1 / 255,) and b.offsets == (0.0,) and "scale" not in b.tags(1)
    with rasterio.open(out / "b_probs.tif") as p:
        assert p.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "3"
    (out / "b_mask.qml").write_text("<qgis/>\n")  # the user's own style of a mask a re-run skips stays
    again = CliRunner().invoke(app, ["predict", str(inputs / "b.tif"), "-o", str(out), "-k", str(tiny_ckpt),
                                     "--tile", "64", "--device", "cpu", "--probs", "--boundary"])
    assert again.exit_code == 0 and "skipped" in again.stdout and (out / "b_mask.qml").read_text() == "<qgis/>\n"


def test_preview_legend_keeps_underscores(tmp_path):
    pred = np.zeros((20, 20), np.uint8)
    image = np.zeros((3, 20, 20), np.uint8)
    legends = []
    for name in ("low_vegetation", "low vegetation"):
        path = save_preview(tmp_path / "p.png", image, pred, [name], [(0, 255, 0)])
        legends.append(np.asarray(Image.open(path).convert("L"))[18 + 20 + 8:])  # below title and panels
    assert not np.array_equal(*legends)


def test_default_loader_workers_fit_the_cores_this_process_may_use():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from cmdbnet.settings import Settings; print(Settings().data.workers)")
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert out.stdout.strip() == "1"
