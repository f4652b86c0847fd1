"""QGIS styles beside class masks, so QGIS's legend shows class names and colours.

QGIS loads ``<raster name without extension>.qml`` beside a raster as its default style.
The file is QGIS's own style XML for a paletted renderer (``QgsPalettedRasterRenderer``:
``<qgis><pipe><rasterrenderer type="paletted" band="1"><colorPalette><paletteEntry value
color alpha label/>``, laid out as QGIS 3.16 writes it); nodata (255) is left transparent.
GeoTIFF cannot hold GDAL category names inside the file (GDAL puts them in a ``.aux.xml``
sidecar), so masks carry them as band tags (``class_0``, ...) and the mosaic VRT as
category names.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from cmdbnet.utils import write_text_atomic

QGIS_STYLE_VERSION = "3.16.0-Hannover"  # the QGIS release whose style layout this follows


def style_path(raster: Path) -> Path:
    return raster.with_suffix(".qml")


def qml_text(classes: Sequence[str], palette: Sequence[Sequence[int]]) -> str:
    """A paletted-renderer QGIS style: one entry per class (value, colour, name)."""
    root = ET.Element("qgis", version=QGIS_STYLE_VERSION, styleCategories="AllStyleCategories",
                      hasScaleBasedVisibilityFlag="0", minScale="1e+08", maxScale="0")
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1",
                             nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    origin = ET.SubElement(renderer, "minMaxOrigin")
    for tag, text in (("limits", "None"), ("extent", "WholeRaster"), ("statAccuracy", "Estimated"),
                      ("cumulativeCutLower", "0.02"), ("cumulativeCutUpper", "0.98"), ("stdDevFactor", "2")):
        ET.SubElement(origin, tag).text = text
    entries = ET.SubElement(renderer, "colorPalette")
    for i, (name, rgb) in enumerate(zip(classes, palette)):
        colour = "#" + "".join(f"{int(c):02x}" for c in list(rgb)[:3])
        ET.SubElement(entries, "paletteEntry", value=str(i), color=colour, alpha="255", label=str(name))
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0", colorizeRed="255",
                  colorizeGreen="128", colorizeBlue="128", colorizeStrength="100")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(pipe, "resamplingStage").text = "resamplingFilter"
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def write_style(raster: Path, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> Path:
    """Write ``<raster>.qml`` (atomically) and return its path."""
    path = style_path(raster)
    write_text_atomic(path, qml_text(classes, palette))
    return path
