"""The metadata an exported model carries: QGIS Deepness's keys and cmdbnet's own entry.

Deepness (PUTvision/qgis-plugin-deepness) reads ``metadata_props``, each value JSON-encoded:
``model_type`` "Segmentor"; ``class_names`` ``{"0": name, ...}`` whose keys, sorted as
integers, must run 0, 1, 2 ... without a gap; ``resolution`` in cm per pixel; ``tile_size``
(its code) and ``tiles_size`` (its documentation): both are written; ``tiles_overlap`` in
percent; ``standardization_mean`` / ``standardization_std``, one value per input band;
``seg_thresh`` and ``seg_small_segment``.

Normalisation: Deepness divides the pixels by 255, then subtracts the mean and divides by the
std. The graph takes our normalised input ((x - mean) / std on the raw scale), so the values
given to Deepness are our mean and std divided by 255: (x / 255 - mean / 255) / (std / 255) is
the same input, and the graph stays the trained network, which ``cmdb predict`` and
onnxruntime users feed exactly as PyTorch is fed. ``seg_thresh`` 0 and ``seg_small_segment`` 0
keep Deepness's mask the per-pixel arg-max that ``cmdb predict`` writes.

cmdbnet's entry (``onnx_runner.METADATA_KEY``) holds what ``cmdb predict -k model.onnx`` needs:
classes, palette, bands, normalisation, pixel size, tile, overlap, the outputs, the cmdbnet
version and the checkpoint's SHA-256.
"""

from __future__ import annotations

import json
from typing import Any

from cmdbnet import __version__
from cmdbnet.inference.onnx_runner import FORMAT, METADATA_KEY, VERSION
from cmdbnet.inference.rasters import ModelMeta

__all__ = ["model_metadata", "deepness_metadata", "cmdbnet_metadata"]


def deepness_metadata(meta: ModelMeta, tile: int, overlap: float, pixel_size_m: float | None) -> dict[str, Any]:
    """Deepness's keys (values not yet JSON-encoded)."""
    out: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {str(i): name for i, name in enumerate(meta.classes)},
        "tile_size": tile, "tiles_size": tile,
        "tiles_overlap": int(round(overlap * 100)),
        "standardization_mean": [m / 255.0 for m in meta.mean],
        "standardization_std": [s / 255.0 for s in meta.std],
        "seg_thresh": 0.0, "seg_small_segment": 0,
    }
    if pixel_size_m:
        out["resolution"] = round(pixel_size_m * 100.0, 6)
    return out


def cmdbnet_metadata(meta: ModelMeta, ds: dict[str, Any], tile: int, overlap: float, pixel_size_m: float | None,
                     boundary: bool, variant: str, checkpoint_sha256: str) -> dict[str, Any]:
    """cmdbnet's own entry (read back by ``onnx_runner.load_onnx_model``)."""
    return {
        "format": FORMAT, "version": VERSION, "cmdbnet_version": __version__,
        "checkpoint_sha256": checkpoint_sha256, "variant": variant, "name": meta.name,
        "classes": list(meta.classes), "palette": meta.palette.tolist(), "bands": ds.get("bands"),
        "band_count": meta.band_count, "dtype": meta.dtype, "mean": list(meta.mean), "std": list(meta.std),
        "pixel_size_m": pixel_size_m, "tile": tile, "overlap": overlap,
        "input": "(x - mean) / std of the raw pixels, (B, bands, tile, tile) float32",
        "outputs": ["probs"] + (["boundary"] if boundary else []), "boundary_output": boundary,
    }


def model_metadata(deepness: dict[str, Any], ours: dict[str, Any]) -> dict[str, str]:
    """Every key with its value JSON-encoded, as Deepness and onnx's metadata_props want them."""
    return {**{k: json.dumps(v) for k, v in deepness.items()}, METADATA_KEY: json.dumps(ours)}
