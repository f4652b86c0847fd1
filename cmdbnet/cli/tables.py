"""Metric tables as papers print them, shared by train, evaluate and demo."""

from __future__ import annotations

import math

from rich.table import Table


def fmt(x: float, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.2f}"


def metrics_table(result: dict, title: str) -> Table:
    """Per-class IoU / F1 / Boundary IoU and the means, in percent, as papers print them."""
    table = Table(title=title)
    for col in ("class", "IoU", "F1", "Boundary IoU"):
        table.add_column(col, justify="right" if col != "class" else "left")
    excluded = set(result.get("protocol", {}).get("excluded_from_means", []))
    for name, v in result["per_class"].items():
        label = f"{name} (not in means)" if name in excluded else name
        table.add_row(label, fmt(v["iou"]), fmt(v["f1"]), fmt(v["boundary_iou"]))
    table.add_section()
    table.add_row("[bold]mean[/]", fmt(result["mIoU"]), fmt(result["mF1"]), fmt(result["boundary_iou"]))
    table.caption = (f"OA {fmt(result['OA'])} | boundary distance (ASSD) {fmt(result['boundary_distance'], False)} px")
    return table


def protocol_line(p: dict) -> str:
    inc = ", ".join(p.get("included_in_means", []))
    trained, data = p.get("checkpoint_dataset"), f"{p.get('dataset')} {p.get('bands')}"
    data = p.get("dataset") if trained in (None, data) else f"{data} (checkpoint: {trained})"
    return (f"protocol: dataset {data} split {p.get('split')} | means over: {inc} | "
            f"labels {'eroded' if p.get('eroded_labels') else 'full'} | OA over all classes | "
            f"boundary {p.get('boundary_dilation')} | TTA {p.get('tta', 'none')}")
