"""A user's own dataset, described by a small YAML file and turned into a :class:`DatasetSpec`.

Why a YAML and not a dataset class: users hold rasters and QGIS layers, not code. The file
says what the classes are (a raw value for index labels, a colour for colour-coded ones,
field values for polygons), what is ignored, how images pair with labels and how splits
are made; ``cmdb prepare dataset.yaml`` then treats it exactly as a built-in dataset: the
resulting spec travels into the manifest and the checkpoint, so train, evaluate and predict
need no further flag. Paths are relative to the YAML's folder. Unknown keys are errors
(a typo must not be silently ignored). See ``examples/custom/`` for both kinds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cmdbnet.data.raw import RawScan, RawTile, _images_in, _pair
from cmdbnet.data.registry import DATASETS, BandChoice, DatasetSpec, SplitPlan, VectorLabels, get_spec
from cmdbnet.data.splits import assign_images, block_tiles, image_size
from cmdbnet.data.vector import shapes_per_image
from cmdbnet.errors import CmdbError
from cmdbnet.settings import format_validation_error

RASTER_EXTS = (".tif", ".tiff", ".png", ".jp2", ".img", ".vrt")
VECTOR_EXTS = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite")
# distinct colours for classes that name none (masks and legends need one per class)
DEFAULT_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                   (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                   (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassEntry(_Strict):
    name: str = Field(min_length=1)
    value: int | None = Field(None, ge=0, le=65535, description="raw label value (index labels)")
    color: tuple[int, int, int] | None = Field(None, description="label colour (colour labels) and mask colour")
    values: list[Union[str, int]] | None = Field(None, description="vector labels: field values of this class")

    @field_validator("color")
    @classmethod
    def _rgb(cls, v):
        if v is not None and not all(0 <= c <= 255 for c in v):
            raise ValueError("colour components must be 0..255")
        return v


class VectorEntry(_Strict):
    field: str = Field(min_length=1, description="attribute holding the class")
    layer: str | None = None
    priority: list[str] | None = Field(None, description="classes, winner first, where polygons overlap")
    outside: Literal["background", "ignore"] = "background"


class SplitEntry(_Strict):
    val: Union[float, list[str]] = 0.0
    test: Union[float, list[str]] = 0.0
    seed: int = 0
    blocks: int = Field(0, ge=0, description="split each image into blocks of this many pixels")
    stripes: bool = False

    @field_validator("val", "test")
    @classmethod
    def _fraction(cls, v):
        if isinstance(v, float) and not 0 <= v < 1:
            raise ValueError("a fraction must be in [0, 1)")
        return v


class DatasetFile(_Strict):
    """The schema of a dataset YAML."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    title: str | None = None
    images: str = Field(description="folder of images, relative to the YAML")
    labels: str = Field(description="folder of label rasters, or one vector file")
    label_pattern: str = Field("{stem}", description="label file name from the image stem, e.g. {stem}_mask.tif")
    label_kind: Literal["index", "color"] | None = None
    classes: list[ClassEntry] = Field(min_length=1, max_length=254)
    ignore: list[Union[int, tuple[int, int, int]]] = Field(default_factory=list)
    background: str | None = None
    bands: list[str] | None = None
    pixel_size: float | None = Field(None, gt=0, description="metres, when the rasters carry no geotransform")
    vector: VectorEntry | None = None
    split: SplitEntry | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DatasetFile:
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"class names repeat: {names}")
        if self.name.lower() in DATASETS:
            raise ValueError(f"name {self.name!r} is a built-in dataset; choose another")
        if self.background is not None and self.background not in names:
            raise ValueError(f"background {self.background!r} is not a class")
        if self.vector is None:
            kind = self.kind()
            key = "value" if kind == "index" else "color"
            missing = [c.name for c in self.classes if getattr(c, key) is None]
            if missing:
                raise ValueError(f"{kind} labels: class {missing[0]!r} needs a {key}")
            if len(self.classes) < 2:
                raise ValueError("needs at least two classes (a background and one more)")
        elif self.vector.priority:
            bad = [p for p in self.vector.priority if p not in names]
            if bad:
                raise ValueError(f"vector.priority: {bad[0]!r} is not a class")
        return self

    def kind(self) -> Literal["index", "color"]:
        if self.label_kind:
            return self.label_kind
        return "index" if any(c.value is not None for c in self.classes) else "color"


def read_dataset_yaml(path: str | Path) -> DatasetSpec:
    """The spec of a dataset YAML; one clear error naming the file (and the key) when it is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CmdbError(f"dataset file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise CmdbError(f"{path}: not valid YAML" + (f" (line {mark.line + 1})" if mark else "")) from None
    try:
        spec_file = DatasetFile.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        lines = sorted(format_validation_error(exc, str(path)).splitlines(), key=lambda x: "unknown setting" not in x)
        more = f" (and {len(lines) - 1} more problem(s))" if len(lines) > 1 else ""
        raise CmdbError(lines[0].replace("unknown setting", "unknown key (a typo?)") + more) from None
    return to_spec(spec_file, path)


def to_spec(f: DatasetFile, path: Path) -> DatasetSpec:
    """A :class:`DatasetSpec` like the built-in ones, paths made absolute."""
    base = path.resolve().parent
    classes = tuple(c.name for c in f.classes)
    kind = f.kind()
    palette = tuple(tuple(c.color) if c.color else DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]
                    for i, c in enumerate(f.classes))
    background = f.background or next((c for c in classes if c.lower() == "background"), classes[0])
    vector = None
    labels = (base / f.labels).resolve()
    if f.vector is not None or labels.suffix.lower() in VECTOR_EXTS:
        v = f.vector or VectorEntry(field="class")
        values = {str(x): i for i, c in enumerate(f.classes) for x in (c.values or [c.name])}
        priority = tuple(classes.index(p) for p in (v.priority or reversed(classes)))
        vector = VectorLabels(str(labels), v.layer, v.field, values, priority, v.outside)
    split = None
    if f.split is not None:
        s = f.split
        split = SplitPlan(tuple(s.val) if isinstance(s.val, list) else float(s.val),
                          tuple(s.test) if isinstance(s.test, list) else float(s.test), s.seed, s.blocks, s.stripes)
    names = tuple(f.bands or ())
    label_exts = RASTER_EXTS if "." not in f.label_pattern else ("",)
    return DatasetSpec(
        name=f.name, title=f.title or f.name, classes=classes, palette=palette, label_kind=kind,
        bands=(BandChoice("all", "", len(names), names),), default_bands="all", image_exts=RASTER_EXTS,
        image_pattern=r"(?i)^(?P<id>.+)(" + "|".join(re.escape(e) for e in RASTER_EXTS) + r")$",
        image_template="{id}.tif",
        label_templates=tuple(f.label_pattern.replace("{stem}", "{id}") + e for e in label_exts),
        label_values=tuple(c.value for c in f.classes) if kind == "index" and vector is None else (),
        nodata_values=tuple(x for x in f.ignore if isinstance(x, int)),
        ignore_colors=tuple(tuple(x) for x in f.ignore if not isinstance(x, int)),
        pixel_size_m=f.pixel_size or 0.0, tile_size=(0, 0), source=str(path), images_dir=str((base / f.images).resolve()),
        labels_path=str(labels), vector=vector, split_plan=split, band_stats=True, background=background)


def load_spec(dataset: str | Path | DatasetSpec) -> DatasetSpec:
    """A built-in dataset by name, a dataset YAML by path, or a spec as it is."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    text = str(dataset)
    if text.lower().endswith((".yaml", ".yml")) or Path(text).is_file():
        return read_dataset_yaml(text)
    if text.lower() not in DATASETS:
        raise CmdbError(f"unknown dataset {text!r}; known: {', '.join(DATASETS)}, or a dataset YAML file")
    return get_spec(text)


def scan_custom(spec: DatasetSpec, band: BandChoice, crop: int) -> tuple[RawScan, dict[str, tuple]]:
    """Every image of a user's dataset with its label file (the layer itself for vector labels),
    split as its YAML says; with vector labels only the images under the layer's polygons, and
    their polygons (``vector.shapes_per_image``)."""
    images_dir = Path(spec.images_dir)
    if not images_dir.is_dir():
        raise CmdbError(f"{spec.source}: images folder not found: {images_dir}")
    images = _images_in(spec, band, images_dir)
    if not images:
        raise CmdbError(f"{spec.source}: no images ({', '.join(RASTER_EXTS)}) in {images_dir}")
    labels = Path(spec.labels_path)
    if spec.vector is not None:
        pairs = [(i, p, labels) for i, p in images]
    elif not labels.is_dir():
        raise CmdbError(f"{spec.source}: label folder not found: {labels}")
    else:
        pairs = _pair(spec, images, labels, spec.label_templates, False)
    scan = RawScan("custom", "", [RawTile(image.stem, tile_id, "train", image, label)
                                  for tile_id, image, label in pairs])
    shapes: dict[str, tuple] = {}
    if spec.vector is not None:
        shapes, scan.tiles, notes = shapes_per_image(spec, scan.tiles)
        scan.notes += notes
    plan = spec.split_plan
    scan.tiles = assign_images(plan, scan.tiles, spec.source)
    if plan is not None and plan.blocks:
        scan.tiles = block_tiles(plan, scan.tiles, [image_size(t.image) for t in scan.tiles], crop)
        scan.split_policy = (f"spatial blocks of {plan.blocks} px{' (stripes)' if plan.stripes else ''} drawn into "
                             f"splits (seed {plan.seed}); half a crop given up on each side facing another split")
    elif plan is not None:
        scan.split_policy = f"whole images: val {plan.val}, test {plan.test} (seed {plan.seed}), the rest train"
    else:
        scan.split_policy = "every image in train (the dataset YAML has no split)"
    return scan, shapes
