"""The ablation's tables: ``ablation.json``, ``ablation.md`` (the design's layout) and a bar chart PNG.

Rows are entries in run order; with several seeds each figure is the mean ± sample standard
deviation over seeds. ``Δ mIoU`` is against ``full`` (the same seed set). Scores are percent,
as the design's tables print them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cmdbnet.utils import atomic_path, format_bytes, write_text_atomic

LABELS = {"full": "full (fusion + boundary refinement)", "no_boundary": "both branches + fusion",
          "no_fusion": "both branches, no fusion", "cnn_only": "CNN branch only", "mamba_only": "Mamba branch only",
          "unet": "U-Net ({backbone})", "deeplabv3plus": "DeepLabV3+ ({backbone})", "segformer": "SegFormer (MiT-B2)"}
SCORES = ("mIoU", "OA", "mF1", "boundary_iou")


def _stats(values: list[float]) -> dict[str, float | None]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"mean": mean, "std": std}


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per entry name: mean and std over seeds of every figure, and the mIoU delta against full."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        rows.setdefault(r["name"], []).append(r)
    out = []
    for name, rs in rows.items():
        classes = list(rs[0]["per_class_iou"])
        label = LABELS.get(name, name).format(backbone=_backbone(rs[0].get("backbone", "resnet34")))
        row = {"name": name, "label": label, "arch": rs[0]["arch"], "seeds": [r["seed"] for r in rs],
               **{k: _stats([r[k] for r in rs]) for k in SCORES},
               "per_class_iou": {c: _stats([r["per_class_iou"].get(c) for r in rs]) for c in classes},
               "params": rs[0]["params"], "macs": rs[0]["macs"], "macs_crop": rs[0]["macs_crop"],
               "train_seconds": _stats([r["train_seconds"] for r in rs]),
               "peak_memory_bytes": _stats([r["peak_memory_bytes"] for r in rs]),
               "peak_memory_kind": rs[0]["peak_memory_kind"], "steps": rs[0]["steps"]}
        out.append(row)
    full = next((r for r in out if r["name"] == "full"), None)
    for row in out:
        a, b = row["mIoU"]["mean"], full["mIoU"]["mean"] if full else None
        row["delta_mIoU"] = None if a is None or b is None else a - b
    return out


def _backbone(name: str) -> str:
    return name.replace("resnet", "ResNet")


def _pct(s: dict[str, float | None]) -> str:
    if s["mean"] is None:
        return "-"
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["std"] is not None else "")


def _seconds(s: dict[str, float | None]) -> str:
    if s["mean"] is None:
        return "-"
    m = s["mean"]
    text = f"{m / 60:.1f} min" if m >= 120 else f"{m:.0f} s"
    return text + (f" ± {s['std']:.0f} s" if s["std"] is not None else "")


def markdown(rows: list[dict[str, Any]], protocol_line: str, recipe_line: str) -> str:
    """The design's table layout: scores, delta against full, per-class IoU, size and cost."""
    classes = list(rows[0]["per_class_iou"]) if rows else []
    head = (["entry", "mIoU", "OA", "mF1", "Boundary IoU", "Δ mIoU vs full"] + [f"IoU {c}" for c in classes]
            + ["params", "MACs", "training time", "peak memory"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = "-" if r["delta_mIoU"] is None or r["name"] == "full" else f"{100 * r['delta_mIoU']:+.1f}"
        mem = r["peak_memory_bytes"]["mean"]
        cells = ([r["label"]] + [_pct(r[k]) for k in SCORES] + [delta]
                 + [_pct(r["per_class_iou"][c]) for c in classes]
                 + [f"{r['params'] / 1e6:.1f} M", f"{r['macs'] / 1e9:.2f} G", _seconds(r["train_seconds"]),
                    format_bytes(mem) if mem is not None else "-"])
        lines.append("| " + " | ".join(cells) + " |")
    n = max((len(r["seeds"]) for r in rows), default=1)
    notes = [f"Scores in percent on the test split{'; mean ± std over ' + str(n) + ' seeds' if n > 1 else ''}.",
             protocol_line, recipe_line,
             f"MACs of one {rows[0]['macs_crop']} x {rows[0]['macs_crop']} image (inference); peak memory: "
             f"{rows[0]['peak_memory_kind'].replace('_', ' ')} while training." if rows else ""]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes if n) + "\n"


def bar_chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """mIoU and Boundary IoU per entry as grouped bars (error bars with several seeds), drawn with PIL."""
    w, h, left, bottom, top = max(480, 110 * len(rows) + 120), 420, 60, 110, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((left, 12), title, fill="black", font=font)
    plot_h = h - bottom - top
    for tick in range(0, 101, 20):
        y = top + plot_h * (1 - tick / 100)
        d.line([(left, y), (w - 20, y)], fill=(225, 225, 225))
        d.text((left - 28, y - 6), str(tick), fill="black", font=font)
    colours = {"mIoU": (46, 110, 180), "boundary_iou": (230, 140, 40)}
    slot = (w - left - 20) / max(1, len(rows))
    for i, r in enumerate(rows):
        x0 = left + i * slot + slot * 0.15
        for j, key in enumerate(("mIoU", "boundary_iou")):
            s = r[key]
            if s["mean"] is None:
                continue
            bx = x0 + j * slot * 0.35
            y = top + plot_h * (1 - s["mean"])
            d.rectangle([bx, y, bx + slot * 0.32, top + plot_h], fill=colours[key])
            d.text((bx, y - 12), f"{100 * s['mean']:.1f}", fill="black", font=font)
            if s["std"]:
                cx, dy = bx + slot * 0.16, plot_h * s["std"]
                d.line([(cx, y - dy), (cx, y + dy)], fill="black", width=2)
        for k, part in enumerate(_wrap(r["label"], 16)):
            d.text((x0, top + plot_h + 8 + 12 * k), part, fill="black", font=font)
    for j, (key, name) in enumerate((("mIoU", "mIoU"), ("boundary_iou", "Boundary IoU"))):
        d.rectangle([w - 220 + 110 * j, 14, w - 208 + 110 * j, 26], fill=colours[key])
        d.text((w - 204 + 110 * j, 13), name, fill="black", font=font)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def write_tables(out: Path, records: list[dict[str, Any]], protocol: dict[str, Any], protocol_line: str,
                 recipe: dict[str, Any], recipe_line: str) -> dict[str, Any]:
    """Write ablation.json, ablation.md and ablation.png under ``out``; return the JSON document."""
    rows = aggregate(records)
    doc = {"protocol": protocol, "protocol_text": protocol_line, "recipe": recipe, "recipe_text": recipe_line,
           "entries": records, "table": rows,
           "files": {"markdown": str(out / "ablation.md"), "chart": str(out / "ablation.png")}}
    write_text_atomic(out / "ablation.json", json.dumps(doc, indent=2, default=str) + "\n")
    write_text_atomic(out / "ablation.md", markdown(rows, protocol_line, recipe_line))
    bar_chart(rows, out / "ablation.png", f"test split of {protocol.get('dataset')}: mIoU and Boundary IoU (%)")
    return doc
