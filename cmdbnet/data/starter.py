"""``cmdb prepare custom --init dataset.yaml``: a starter dataset YAML written from a look at the data.

Why: nobody should write a dataset YAML from scratch. The images tell the band count, data
type and CRS; label rasters tell their distinct values (or colours) with pixel counts, and
their colour table when they carry one; a vector layer tells its fields and, for the text
field with fewest distinct values, those values, which become the classes (usable as
written). Counts go into comments so the user sees what each value covers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cmdbnet.data.custom import RASTER_EXTS, VECTOR_EXTS
from cmdbnet.data.raw import open_raster, read_rows
from cmdbnet.data.vector import read_layer_fields
from cmdbnet.errors import CmdbError
from cmdbnet.utils import write_text_atomic

MAX_CLASSES = 64


def _rasters(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CmdbError(f"--images {folder}: not a folder")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in RASTER_EXTS and p.is_file())
    if not found:
        raise CmdbError(f"--images {folder}: no rasters ({', '.join(RASTER_EXTS)})")
    return found


def _label_values(paths: list[Path]) -> tuple[str, Counter, dict]:
    """("index" or "color", value or colour -> pixel count, colour table) over every label, by strips."""
    counts: Counter = Counter()
    kind, table = "index", {}
    for path in paths:
        with open_raster(path, "label") as ds:
            kind = "color" if ds.count >= 3 else "index"
            if kind == "index":
                try:
                    table = table or {int(k): v[:3] for k, v in ds.colormap(1).items()}
                except ValueError:
                    pass
            for row in range(0, ds.height, 512):
                raw = read_rows(ds, row, min(512, ds.height - row), "label")
                keys = (raw[0].astype(np.uint32) << 16 | raw[1].astype(np.uint32) << 8 | raw[2]) if kind == "color" \
                    else raw[0]
                values, n = np.unique(keys, return_counts=True)
                counts.update(dict(zip(values.tolist(), n.tolist())))
                if len(counts) > MAX_CLASSES:
                    raise CmdbError(f"{path}: more than {MAX_CLASSES} distinct label values: is it a class label "
                                    "(not a continuous raster)?")
    return kind, counts, table


def _pattern(images: list[Path], labels: Path) -> str:
    """How a label is named from its image's stem: ``{stem}`` plus what follows it in the label folder."""
    names = sorted(p.name for p in labels.iterdir() if p.is_file())
    for image in images:
        for name in names:
            rest = name[len(image.stem):]
            if name.startswith(image.stem) and rest[:1] in "._-" and not (
                    name == image.name and labels.resolve() == image.parent.resolve()):
                return "{stem}" if rest.lower() in RASTER_EXTS else "{stem}" + rest
    raise CmdbError(f"--labels {labels}: no file named after an image of {images[0].parent} "
                    f"(e.g. {images[0].stem}.tif or {images[0].stem}_label.tif)")


def write_starter(images: Path, labels: Path, dst: Path) -> dict[str, Any]:
    """Write a starter YAML at ``dst`` (never over an existing file); returns what it found."""
    if dst.exists():
        raise CmdbError(f"{dst} exists: delete it or choose another --init file")
    image_files = _rasters(images)
    with open_raster(image_files[0]) as img:
        bands, dtype, crs = img.count, img.dtypes[0], img.crs.to_string() if img.crs else None
        size = (img.height, img.width)
        band_names = [d or f"band{i + 1}" for i, d in enumerate(img.descriptions)]
    base = dst.resolve().parent
    rel = {p: Path(p).resolve().relative_to(base).as_posix() if Path(p).resolve().is_relative_to(base)
           else str(Path(p).resolve()) for p in (images, labels)}
    doc: dict[str, Any] = {"name": images.resolve().parent.name or "mydata", "images": rel[images],
                           "labels": rel[labels], "bands": band_names}
    comments = [f"starter written by cmdb prepare custom --init: {len(image_files)} image(s), {bands} band(s) of "
                f"{dtype}, CRS {crs or 'none'}", "check the class names, then: cmdb prepare THIS.yaml --out PREPARED"]
    if labels.suffix.lower() in VECTOR_EXTS:
        field, values, fields = read_layer_fields(labels)
        doc["vector"] = {"field": field, "outside": "background"}
        doc["classes"] = [{"name": "background"}] + [{"name": str(v)} for v in values]
        comments.append(f"layer fields: {', '.join(fields)}; class field {field!r} with {len(values)} value(s): "
                        f"{', '.join(f'{v} ({n} features)' for v, n in values.items())}")
        found = {"kind": "vector", "field": field, "values": {str(k): n for k, n in values.items()}}
    else:
        if not labels.is_dir():
            raise CmdbError(f"--labels {labels}: neither a folder of label rasters nor a vector file "
                            f"({', '.join(VECTOR_EXTS)})")
        doc["label_pattern"] = _pattern(image_files, labels)
        stems = [p.stem for p in image_files]
        label_files = [f for f in (labels / doc["label_pattern"].replace("{stem}", s) for s in stems) if f.is_file()] \
            or [p for p in labels.iterdir() if p.suffix.lower() in RASTER_EXTS]
        kind, counts, table = _label_values(label_files)
        if kind == "color":
            doc["classes"] = [{"name": f"class_{i}", "color": [k >> 16, (k >> 8) & 255, k & 255]}
                              for i, k in enumerate(sorted(counts))]
        else:
            doc["classes"] = [{"name": f"class_{k}", "value": int(k)} | ({"color": list(table[k])} if k in table else {})
                              for k in sorted(counts)]
        comments.append("pixels per label " + ("colour" if kind == "color" else "value") + ": " + ", ".join(
            f"{c.get('value', c.get('color'))}: {counts[k]}" for c, k in zip(doc["classes"], sorted(counts))))
        comments.append("rename the classes; move nodata/unlabelled values from classes to ignore: [...]")
        found = {"kind": kind, "pixels": {str(k): n for k, n in sorted(counts.items())}}
    n = len(image_files)
    doc["split"] = ({"val": 0.2, "test": 0.2, "seed": 0} if n > 2 else {"val": 0.5, "seed": 0} if n == 2 else
                    {"val": 0.2, "test": 0.2, "blocks": max(256, min(size) // 5 // 64 * 64), "seed": 0})
    text = "".join(f"# {c}\n" for c in comments) + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    write_text_atomic(dst, text)
    return {"init": str(dst), "images": len(image_files), "bands": bands, "dtype": dtype, "crs": crs, **found}
