"""Scoring a network on a prepared split: shared by training-time validation and ``cmdb evaluate``.

The protocol (which classes enter the means, eroded or full labels, which split, the
boundary rule) is returned with every result, because papers differ on each of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmdbnet.checkpoint import load_model
from cmdbnet.data.loaders import eval_loader
from cmdbnet.data.manifest import read_manifest
from cmdbnet.errors import CmdbError
from cmdbnet.inference.window import forward_tta
from cmdbnet.metrics import SegmentationMetrics
from cmdbnet.progress import progress_bar
from cmdbnet.runtime import DistInfo, Precision, inference_precision, pick_device
from cmdbnet.settings import Settings
from cmdbnet.utils import check_output_file, write_text_atomic


@dataclass
class Scored:
    """Metric results plus the first batch's tensors, for TensorBoard previews."""

    metrics: dict[str, Any]
    preview: dict[str, torch.Tensor] | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.inference_mode()  # as prediction: faster than no_grad; previews and metrics only read the outputs
def score_loader(model: torch.nn.Module, loader, metrics: SegmentationMetrics, device: torch.device,
                 precision: Precision, dist_info: DistInfo = DistInfo(), tta: str = "none",
                 keep_preview: int = 0, on_batch: Callable[[int], None] | None = None) -> Scored:
    """Run ``model`` over ``loader`` and accumulate ``metrics`` (reduced across ranks).

    Crops that DistributedSampler repeats to pad ranks are skipped, so each crop counts once.
    """
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    metrics.reset()
    preview = None
    n_real = len(loader.dataset)
    seen = 0
    try:
        for batch in loader:
            image = batch["image"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            # positions of this rank's samples in the padded global order
            idx = torch.arange(image.shape[0]) * dist_info.world_size + dist_info.rank + seen * dist_info.world_size
            seen += image.shape[0]
            keep = idx < n_real
            with precision.autocast(device):
                if tta == "none":
                    out = net(image)
                    probs = out["seg"].float().softmax(1)
                    boundary = out.get("boundary")  # logits; forward_tta returns probabilities
                else:
                    probs, boundary = forward_tta(net, image, tta)
            pred = probs.argmax(1)
            if keep.all():
                metrics.update(pred, label)
            elif keep.any():
                metrics.update(pred[keep.to(pred.device)], label[keep.to(label.device)])
            if keep_preview and preview is None:
                preview = {"image": image[:keep_preview].float().cpu(), "label": label[:keep_preview].cpu(),
                           "pred": pred[:keep_preview].cpu()}
                if boundary is not None:
                    b = boundary[:keep_preview].float()
                    preview["boundary"] = (torch.sigmoid(b) if tta == "none" else b).cpu()
            if on_batch:
                on_batch(image.shape[0])
    finally:
        net.train(was_training)
    if dist_info.enabled:  # one rank scoring alone inside a process group (as the ablation's rank 0) must not wait
        metrics.all_reduce()
    return Scored(metrics.compute(), preview)


def make_metrics(classes: list[str], ignore_index: int, excluded: list[int], device: torch.device,
                 boundary_dilation: float | int = 0.02) -> SegmentationMetrics:
    return SegmentationMetrics(len(classes), ignore_index=ignore_index, class_names=classes,
                               exclude=excluded, boundary_dilation=boundary_dilation, device=device)


def evaluate(checkpoint: str | Path, prepared: str | Path, split: str = "val", tta: str = "none",
             ignore_clutter: bool = False, device: str = "auto", batch: int | None = None,
             workers: int | None = None, amp: bool = False, boundary_dilation: float | int = 0.02,
             json_out: str | Path | None = None, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Score a checkpoint on a prepared split; returns (and optionally writes) the result JSON.

    ``json_out`` replaces an earlier result of this function, and any other file only with ``overwrite``.
    """
    if json_out:
        check_json_out(json_out, overwrite)
    dev = pick_device(device)
    model, ckpt = load_model(checkpoint, dev)
    info = ckpt["dataset"]
    manifest = read_manifest(prepared)
    if list(manifest["classes"]) != list(info["classes"]):
        raise CmdbError(f"{prepared} holds classes {manifest['classes']} but the checkpoint was trained on "
                        f"{info['classes']}")
    if int(manifest.get("band_count", info["band_count"])) != int(info["band_count"]):
        raise CmdbError(f"{prepared} has {manifest.get('band_count')} bands; the checkpoint expects "
                        f"{info['band_count']}")
    saved: Settings = ckpt["settings_obj"]
    overrides: dict[str, Any] = {"prepared": Path(prepared), "mean": info["mean"], "std": info["std"]}
    if workers is not None:
        overrides["workers"] = workers
    settings = saved.model_copy(update={"data": saved.data.model_copy(update=overrides)})
    excluded = [info["classes"].index(c) for c in info.get("excluded_in_means", [])] if ignore_clutter else []
    if ignore_clutter and not excluded:
        raise CmdbError(f"--ignore-clutter: dataset {info.get('name')} has no clutter class to leave out")
    loader = eval_loader(settings, split, DistInfo(), dev, batch=batch or settings.predict.batch)
    metrics = make_metrics(list(info["classes"]), int(info["ignore_index"]), excluded, dev, boundary_dilation)
    precision = inference_precision(amp, dev)

    with progress_bar(f"evaluate {split}", enabled=progress, transient=True) as bar:
        task = bar.add_task("crops", total=len(loader.dataset))
        scored = score_loader(model, loader, metrics, dev, precision, tta=tta,
                              on_batch=lambda n: bar.advance(task, n))
    m = scored.metrics
    trained_on, data_is = f"{info.get('name')} {info.get('bands')}", f"{manifest['dataset']} {manifest.get('bands')}"
    result = {
        "warnings": [] if trained_on == data_is else [
            f"the checkpoint was trained on {trained_on} but {prepared} is {data_is}: the scores compare "
            "different data"],
        "protocol": {**metrics.protocol(), "dataset": manifest["dataset"], "bands": manifest.get("bands"),
                     "checkpoint_dataset": trained_on, "split": split,
                     "eroded_labels": bool(manifest.get("eroded", False)), "tta": tta,
                     "crops": len(loader.dataset), "checkpoint": str(checkpoint),
                     "split_policy": manifest.get("split_policy")},
        "mIoU": m["mIoU"], "OA": m["OA"], "mF1": m["mF1"],
        "boundary_iou": m["boundary_iou"], "boundary_distance": m["boundary_distance"],
        "per_class": {name: {"iou": v["iou"], "f1": v["f1"], "precision": v["precision"],
                             "recall": v["recall"], "boundary_iou": v["boundary_iou"]}
                      for name, v in m["per_class"].items()},
    }
    if len(info["classes"]) == 2:  # binary: the score that matters is the positive class's, not the mean
        background = (info.get("dataset_spec") or {}).get("background") or info["classes"][0]
        positive = next(c for c in info["classes"] if c != background)
        result["positive_class"] = {"class": positive, **{k: result["per_class"][positive][k] for k in ("iou", "f1")}}
    if json_out:
        write_text_atomic(json_out, json.dumps(result, indent=2, default=_json_float) + "\n")
    return result


SCORES_KEYS = ("protocol", "mIoU", "per_class")  # what marks a file as an earlier evaluate result


def check_json_out(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse a --json-out that is a folder, unwritable, or a file that is not an earlier result."""
    return check_output_file(path, "--json-out", overwrite, SCORES_KEYS)


def _json_float(x: Any) -> Any:
    return float(x) if isinstance(x, torch.Tensor) else str(x)
