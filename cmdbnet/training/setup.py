"""Settings resolved against the prepared data before a run starts (sizes, bands, dataset facts)."""

from __future__ import annotations

from typing import Any

from cmdbnet.errors import CmdbError
from cmdbnet.settings import DataSettings, Settings


def dataset_info(manifest: dict, settings: Settings) -> dict[str, Any]:
    """What a checkpoint must carry about the data so predict/evaluate need nothing else."""
    return {"name": manifest["dataset"], "classes": list(manifest["classes"]),
            "palette": [list(c) for c in manifest["palette"]], "ignore_index": int(manifest["ignore_index"]),
            "bands": manifest.get("bands"), "band_count": int(manifest["band_count"]),
            "dtype": manifest.get("dtype", "uint8"), "mean": list(settings.data.mean),
            "std": list(settings.data.std), "excluded_in_means": list(manifest.get("excluded_in_means", [])),
            "eroded": bool(manifest.get("eroded", False)), "crop": int(manifest.get("crop", 0))}


def settings_for_data(settings: Settings, manifest: dict) -> Settings:
    """Fit the model's input and output sizes, and non-8-bit data's statistics, to the prepared data."""
    bands = int(manifest["band_count"])
    dtype = manifest.get("dtype", "uint8")
    defaults = DataSettings()
    if dtype != "uint8" and (settings.data.mean, settings.data.std) == (defaults.mean, defaults.std):
        if not manifest.get("mean") or not manifest.get("std"):
            raise CmdbError(f"{settings.data.prepared} holds {dtype} pixels, but data.mean/data.std are 8-bit "
                            "ImageNet statistics: re-run cmdb prepare (it computes them) or set both in your config")
        data = settings.data.model_copy(update={"mean": list(manifest["mean"]), "std": list(manifest["std"])})
        settings = settings.model_copy(update={"data": data})
    if len(settings.data.mean) != bands:
        raise CmdbError(f"data.mean/data.std have {len(settings.data.mean)} values but the prepared data has "
                        f"{bands} bands; set data.mean and data.std (one value per band) in your config")
    model = settings.model.model_copy(update={"num_classes": len(manifest["classes"]), "in_channels": bands})
    return settings.model_copy(update={"model": model})
