"""What each dataset is, as data: the only module that names a dataset.

Why: peers scatter ``if "vaihingen" in name`` through readers, trainers and metrics, and
every new dataset means hunting those branches. Here a dataset is a :class:`DatasetSpec`
value; readers, the trainer, the metrics and the synthetic generator only read its fields.
Adding a dataset means adding one spec below.

Splits. Papers disagree; cmdbnet writes three prepared splits from a
download layout and says which it used in the manifest:

* ``train``: the official training tiles minus the validation tiles below,
* ``val``: a few official training tiles held out to pick checkpoints,
* ``test``: the official test tiles, used only by ``cmdb evaluate --split test``.

Validating on the test tiles (as GeoSeg-family configs do) leaks the test set into model
selection; we do not do it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Literal

from cmdbnet.errors import CmdbError

IGNORE_INDEX = 255

ISPRS_CLASSES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))


@dataclass(frozen=True)
class BandChoice:
    """One way a dataset ships its imagery (e.g. Potsdam's RGB, IRRG or RGBIR tiles)."""

    name: str  # the value of ``--bands``
    tag: str  # how it appears in file names ("" when names carry no tag)
    count: int  # bands in the file
    band_names: tuple[str, ...]
    download_folders: tuple[str, ...] = ()  # folder names of the official download
    indexes: tuple[int, ...] = ()  # 1-based source bands read, in order (empty: every band of the file)


@dataclass(frozen=True)
class VectorLabels:
    """Polygon labels: a layer whose ``field`` names each polygon's class through ``values``."""

    path: str
    layer: str | None
    field: str
    values: dict[str, int]  # field value (as text) -> class index
    priority: tuple[int, ...]  # class indices, highest priority first (wins where polygons overlap)
    outside: Literal["background", "ignore"]  # pixels outside every polygon


@dataclass(frozen=True)
class SplitPlan:
    """How a user's images become splits: whole images by name or fraction, or spatial blocks."""

    val: tuple[str, ...] | float = 0.0
    test: tuple[str, ...] | float = 0.0
    seed: int = 0
    blocks: int = 0  # > 0: cut every image into blocks this many pixels wide, split the blocks
    stripes: bool = False  # blocks span the whole width


@dataclass(frozen=True)
class DatasetSpec:
    """Everything cmdbnet knows about one dataset; travels into manifests and checkpoints."""

    name: str
    title: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    label_kind: Literal["color", "index"]
    bands: tuple[BandChoice, ...]
    default_bands: str
    image_exts: tuple[str, ...]
    # Regular expression over image file names; group ``id`` is the tile id, group ``tag``
    # (optional) the band tag. Labels are found from the id by the templates below.
    # Folder-name tuples (here and in BandChoice) list the official download's name first
    # (synthetic scenes write that one), then the names of the pre-split layout.
    image_pattern: str
    image_template: str  # how an image is named: "{id}" the tile id, "{tag}" the band tag
    label_templates: tuple[str, ...]  # full labels, "{id}" replaced by the tile id
    eroded_label_templates: tuple[str, ...] = ()
    label_folders: tuple[str, ...] = ()  # download folders holding full labels
    eroded_label_folders: tuple[str, ...] = ()
    image_folders: tuple[str, ...] = ()  # download folders holding images (beside band folders)
    # index labels: the raw value of each class, in class order; raw values listed in
    # ``nodata_values`` become the ignore index.
    label_values: tuple[int, ...] = ()
    nodata_values: tuple[int, ...] = ()
    # colour labels: the colour that marks eroded boundary pixels (ignored).
    boundary_color: tuple[int, int, int] | None = None
    official_train: tuple[str, ...] = ()
    official_test: tuple[str, ...] = ()
    val_tiles: tuple[str, ...] = ()  # held out from official_train for checkpoint selection
    # download layouts that come already split: split name -> folder names
    split_folders: dict[str, tuple[str, ...]] = field(default_factory=dict)
    scene_folders: tuple[str, ...] = ()  # sub-folders inside a split (LoveDA Urban/Rural)
    pixel_size_m: float = 0.05
    tile_size: tuple[int, int] = (6000, 6000)  # (height, width) of a typical raw tile
    crs_epsg: int | None = None  # projected CRS the data comes in (synthetic scenes use it)
    excluded_in_means: tuple[str, ...] = ()  # what ``--ignore-clutter`` leaves out of means
    ignore_index: int = IGNORE_INDEX
    # A user's dataset (``cmdbnet.data.custom``): where its files are and how they become labels.
    source: str = ""  # the YAML file it came from ("" for the built-in datasets)
    images_dir: str = ""  # absolute folders/files; their presence selects the custom pairing
    labels_path: str = ""
    ignore_colors: tuple[tuple[int, int, int], ...] = ()  # colour labels: colours that become ignore
    vector: VectorLabels | None = None
    split_plan: SplitPlan | None = None
    band_stats: bool = False  # per-band mean/std at prepare for every dtype (not only non-8-bit)
    background: str | None = None  # the background class (binary scores report the other one)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def band(self, name: str | None) -> BandChoice:
        """The band choice called ``name`` (the default when None), or ``"4,3,2"``: those bands of
        the default choice's files, in that order (1-based)."""
        wanted = (name or self.default_bands).lower().replace(" ", "")
        for choice in self.bands:
            if choice.name == wanted:
                return choice
        if re.fullmatch(r"\d+(,\d+)*", wanted):
            base = self.band(None)
            idx = tuple(int(i) for i in wanted.split(","))
            if min(idx) < 1 or len(set(idx)) != len(idx):
                raise CmdbError(f"--bands {name}: band numbers start at 1 and appear once each")
            names = tuple(base.band_names[i - 1] if i <= len(base.band_names) else f"band{i}" for i in idx)
            return BandChoice(wanted, base.tag, len(idx), names, base.download_folders, idx)
        names = ", ".join(b.name for b in self.bands)
        raise CmdbError(f"{self.title} has no band choice {name!r}; choose one of: {names}")

    def excluded_indices(self) -> tuple[int, ...]:
        return tuple(self.classes.index(c) for c in self.excluded_in_means)

    def to_dict(self) -> dict:
        """Plain JSON-able form, stored in manifests and checkpoints."""
        return asdict(self)


def _tile_ids(rows: dict[int, range | tuple[int, ...]]) -> tuple[str, ...]:
    """Potsdam tile ids ``a_b`` from ``{a: (b, ...)}``."""
    return tuple(f"{a}_{b}" for a, bs in rows.items() for b in bs)


POTSDAM = DatasetSpec(
    name="potsdam",
    title="ISPRS Potsdam",
    classes=ISPRS_CLASSES,
    palette=ISPRS_PALETTE,
    label_kind="color",
    bands=(
        BandChoice("rgb", "RGB", 3, ("red", "green", "blue"), ("2_Ortho_RGB", "RGB")),
        BandChoice("irrg", "IRRG", 3, ("nir", "red", "green"), ("3_Ortho_IRRG", "IRRG")),
        BandChoice("rgbir", "RGBIR", 4, ("red", "green", "blue", "nir"), ("4_Ortho_RGBIR", "RGBIR")),
    ),
    default_bands="rgb",
    image_exts=(".tif", ".tiff"),
    image_pattern=r"^top_potsdam_(?P<id>\d+_\d+)_(?P<tag>RGBIR|RGB|IRRG)\.tiff?$",
    image_template="top_potsdam_{id}_{tag}.tif",
    label_templates=("top_potsdam_{id}_label.tif",),
    eroded_label_templates=("top_potsdam_{id}_label_noBoundary.tif",),
    label_folders=("5_Labels_all", "Label", "labels"),
    eroded_label_folders=("5_Labels_all_noBoundary", "Label_noBoundary", "labels_noBoundary"),
    boundary_color=(0, 0, 0),
    official_train=_tile_ids({2: (10, 11, 12), 3: (10, 11, 12), 4: (10, 11, 12), 5: (10, 11, 12),
                              6: range(7, 13), 7: range(7, 13)}),
    official_test=_tile_ids({2: (13, 14), 3: (13, 14), 4: (13, 14, 15), 5: (13, 14, 15),
                             6: (13, 14, 15), 7: (13,)}),
    val_tiles=("2_12", "4_11", "6_9"),
    pixel_size_m=0.05,
    tile_size=(6000, 6000),
    crs_epsg=32633,
    excluded_in_means=("clutter",),
)

VAIHINGEN = DatasetSpec(
    name="vaihingen",
    title="ISPRS Vaihingen",
    classes=ISPRS_CLASSES,
    palette=ISPRS_PALETTE,
    label_kind="color",
    bands=(BandChoice("irrg", "", 3, ("nir", "red", "green"), ("top", "RGB", "IRRG")),),
    default_bands="irrg",
    image_exts=(".tif", ".tiff"),
    image_pattern=r"^top_mosaic_09cm_area(?P<id>\d+)\.tiff?$",
    image_template="top_mosaic_09cm_area{id}.tif",
    label_templates=("top_mosaic_09cm_area{id}.tif",),
    eroded_label_templates=("top_mosaic_09cm_area{id}_noBoundary.tif",),
    label_folders=("gts_for_participants", "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE",
                   "Label", "labels"),
    eroded_label_folders=("gts_eroded_for_participants",
                          "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE",
                          "Label_noBoundary", "labels_noBoundary"),
    image_folders=("top",),
    boundary_color=(0, 0, 0),
    official_train=tuple(str(i) for i in (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)),
    official_test=tuple(str(i) for i in (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)),
    val_tiles=("7", "30"),
    pixel_size_m=0.09,
    tile_size=(2500, 2000),
    crs_epsg=32632,
    excluded_in_means=("clutter",),
)

LOVEDA = DatasetSpec(
    name="loveda",
    title="LoveDA",
    classes=("background", "building", "road", "water", "barren", "forest", "agriculture"),
    palette=((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183),
             (0, 255, 0), (255, 195, 128)),
    label_kind="index",
    bands=(BandChoice("rgb", "", 3, ("red", "green", "blue"), ("images_png", "images")),),
    default_bands="rgb",
    image_exts=(".png",),
    image_pattern=r"^(?P<id>\d+)\.png$",
    image_template="{id}.png",
    label_templates=("{id}.png",),
    label_folders=("masks_png", "labels"),
    label_values=(1, 2, 3, 4, 5, 6, 7),
    nodata_values=(0,),
    split_folders={"train": ("Train", "train"), "val": ("Val", "val"), "test": ("Test", "test")},
    scene_folders=("Urban", "Rural"),
    pixel_size_m=0.3,
    tile_size=(1024, 1024),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (POTSDAM, VAIHINGEN, LOVEDA)}
DatasetName = Literal["potsdam", "vaihingen", "loveda"]


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name`` (case-insensitive), or a one-line error listing the known ones."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise CmdbError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
