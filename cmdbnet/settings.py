"""One settings model for every command.

Why: a run must be reproducible from one file. Every command (prepare, train, evaluate,
predict, profile-vram, count-params) reads the same :class:`Settings`, the trainer saves it
beside the run and inside each checkpoint, and ``cmdb config show`` prints what is in force.

Precedence, lowest first: defaults < YAML file (``--config``) < environment
(``CMDB_<SECTION>__<FIELD>``, e.g. ``CMDB_TRAIN__BATCH=2``) < command-line flags.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cmdbnet.errors import ConfigError

# ImageNet statistics on the 0..255 scale, the scale of 8-bit aerial tiles.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def default_workers() -> int:
    """4 workers, but no more than the CPU cores this process may run on (its affinity)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


class DataSettings(_Section):
    """Where the data is and how crops are cut and augmented."""

    dataset: str = Field("potsdam", pattern=r"^(potsdam|vaihingen|loveda|.+\.ya?ml)$",
                         description="potsdam, vaihingen, loveda, or a dataset YAML file (your own data)")
    root: Path | None = Field(None, description="raw dataset folder (prepare)")
    prepared: Path | None = Field(None, description="prepared folder with manifest.json (train, evaluate)")
    crop: int = Field(256, ge=32, le=8192, description="crop size in pixels")
    stride: int | None = Field(None, ge=1, description="step between crops; default: the crop size")
    bands: str | None = Field(None, pattern=r"^(rgb|irrg|rgbir|all|\d+(,\d+)*)$",
                              description="band choice (rgb, irrg, rgbir) or band numbers, e.g. 4,3,2")
    eroded: bool = Field(False, description="use eroded (noBoundary) ISPRS labels")
    workers: int = Field(default_factory=lambda: default_workers(), ge=0, le=256,
                         description="data-loader / prepare worker processes (default: 4, at most the cores)")
    pin_memory: bool = True
    augment: float = Field(1.0, ge=0.0, le=2.0, description="augmentation strength (0 = none)")
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD))

    @model_validator(mode="after")
    def _stats_match(self) -> DataSettings:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same number of bands")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


Variant = Literal["full", "cnn_only", "mamba_only", "no_fusion", "no_boundary"]
VARIANTS: tuple[str, ...] = get_args(Variant)  # the ablation variants, for help texts and checks
Arch = Literal["cmdbnet", "unet", "deeplabv3plus", "segformer"]
BASELINES: tuple[str, ...] = get_args(Arch)[1:]  # comparison networks from segmentation_models_pytorch


class ModelSettings(_Section):
    """What network is built; stored in every checkpoint so predict can rebuild it."""

    arch: Arch = Field("cmdbnet", description="the network: cmdbnet, or a baseline (cmdbnet[baselines])")
    variant: Variant = "full"
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet34"
    pretrained: Literal["auto", "required", "off"] = Field(
        "auto", description="ImageNet weights: auto = use if cached, else warn; required = error if missing")
    backbone_weights: Path | None = Field(None, description="local state-dict file for the CNN backbone")
    in_channels: int = Field(3, ge=1, le=16)
    num_classes: int = Field(6, ge=2, le=255)
    mamba_dims: list[int] = Field(default_factory=lambda: [64, 128, 256, 512])
    mamba_depths: list[int] = Field(default_factory=lambda: [2, 2, 4, 2])
    d_state: int = Field(1, ge=1, le=256, description="SSM state size (VMamba v2: 1; v0: 16)")
    ssm_expand: float = Field(0.5, gt=0, le=8, description="SS2D inner width / block width (CM-UNet: 0.5; VMamba v2: 1; v0: 2)")
    ssm_gate: bool = Field(False, description="gate the scan output by silu(z) as VMamba v0 (v2: off)")
    dt_rank: int | Literal["auto"] = "auto"
    d_conv: int = Field(3, ge=1, le=9)
    mlp_ratio: float = Field(2.5, ge=0, description="MLP width / block width in VSS blocks (0 = no MLP)")
    fusion_channels: int = Field(256, ge=16)
    drop_path: float = Field(0.1, ge=0, lt=1)
    checkpointing: bool = Field(False, description="gradient checkpointing of stages (~30% less memory)")

    @field_validator("mamba_dims", "mamba_depths")
    @classmethod
    def _four_stages(cls, v: list[int]) -> list[int]:
        if len(v) != 4 or any(x < 0 for x in v):
            raise ValueError("needs four non-negative values, one per stage")
        return v

    @field_validator("mamba_dims")
    @classmethod
    def _dims_usable(cls, v: list[int]) -> list[int]:
        if any(x < 8 or x % 2 for x in v):
            raise ValueError("Mamba stage widths must be even and at least 8")
        return v


class TrainSettings(_Section):
    """How a run trains; every memory lever (micro-batch, accumulation, AMP, checkpointing) is here."""

    out: Path = Field(Path("runs/cmdbnet"), description="run folder")
    batch: int = Field(4, ge=1, description="micro-batch per device")
    accum: int = Field(4, ge=1, description="gradient accumulation steps")
    amp: bool = True
    amp_dtype: Literal["fp16", "bf16"] = "fp16"
    epochs: int = Field(300, ge=1)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    time_limit_min: float | None = Field(None, gt=0, description="stop (validate, save) after this many minutes")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["poly", "cosine"] = "poly"
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    aux_weight: float = Field(0.4, ge=0)
    boundary_weight: float = Field(0.3, ge=0)
    boundary_width: int = Field(3, ge=1)
    dice_weight: float = Field(1.0, ge=0)
    class_weights: list[float] | None = None
    val_interval: int = Field(1, ge=1, description="validate every K epochs")
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sync_bn: bool = False
    log_images: int = Field(4, ge=0)
    max_nonfinite: int = Field(20, ge=1, description="consecutive non-finite losses before stopping")
    tf32: bool = Field(True, description="on Ampere and later CUDA cards, fp32 matmuls and convolutions in TF32")
    fit_vram: str | None = Field(None, description="memory budget, e.g. 6GB: pick the fastest fitting recipe")
    resume: Path | None = None
    overwrite: bool = Field(False, description="start over in a run folder that already holds a run")


class PredictSettings(_Section):
    """Sliding-window inference over rasters of any size."""

    tile: int = Field(512, ge=32, le=8192, description="window size; a multiple of 32 (the network's stride)")
    overlap: float = Field(0.25, ge=0.0, le=0.75, description="window overlap fraction, blended smoothly")
    tta: Literal["none", "flip", "d4"] = Field("none", description="flip: 3 views; d4: 8 rotations/reflections")
    batch: int = Field(4, ge=1, description="windows per forward pass (4 ran faster per window than 8 on CPU)")
    format: Literal["index", "color", "both"] = Field("index", description="palette index mask, RGBA, or both")
    probs: bool = Field(False, description="also write per-class probabilities (float16)")
    boundary: bool = Field(False, description="also write the boundary probability (uint8, value/255)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(False, description="mixed precision: fp16 on CUDA, bf16 on CPU")
    cog: bool = Field(False, description="write Cloud-Optimised GeoTIFFs (overviews, for web maps and QGIS)")
    compile: bool = Field(False, description="torch.compile the network when the rasters have enough windows "
                                             "to win back the compile time")

    @field_validator("tile")
    @classmethod
    def _tile_multiple(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32, the network's output stride (e.g. {max(32, v // 32 * 32)})")
        return v


_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("cmdb_yaml_file", default=None)


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the ``--config`` file; sits between the defaults and the environment."""

    def get_field_value(self, field, field_name):  # pragma: no cover - whole-file source
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _yaml_file.get()
        if path is None:
            return {}
        return read_yaml(path)


class Settings(BaseSettings):
    """All settings of cmdbnet, in four sections."""

    model_config = SettingsConfigDict(env_prefix="CMDB_", env_nested_delimiter="__", extra="ignore",
                                      validate_assignment=True)

    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    predict: PredictSettings = Field(default_factory=PredictSettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A settings file as a mapping, with one clear error when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (data, model, train, predict)")
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {', '.join(unknown)}; "
                          f"known: {', '.join(Settings.model_fields)}")
    return data


def format_validation_error(exc: ValidationError, source: str = "settings") -> str:
    """One readable line per bad field, e.g. ``train.batch: must be >= 1 (got 0)``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid").replace("Value error, ", "")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting"
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {msg}{shown}{_env_origin(err.get('loc', ()), got)}")
    return "\n".join(lines)


def _env_origin(loc: tuple, got: Any) -> str:
    """Name the CMDB_* variable a bad value came from, since the user set that and not ``loc``."""
    name = "CMDB_" + "__".join(str(p) for p in loc).upper()
    for key, value in os.environ.items():
        if key.upper() == name and (got is None or str(got) == value):
            return f" (from environment variable {key})"
    return ""


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            sub = _drop_none(v)
            if sub:
                out[k] = sub
        elif v is not None:
            out[k] = v
    return out


# CMDB_* variables that are not settings (read by the C library cache, the scan dispatcher and
# the weights fetcher); every other CMDB_* variable must name a section or a field.
OTHER_VARIABLES = ("CMDB_CACHE_DIR", "CMDB_SCAN_BACKEND", "CMDB_WEIGHTS_URL")


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Refuse a CMDB_* variable that names no setting (``CMDB_TRAINING__BATCH``), naming the nearest
    valid one: the environment source would ignore it silently."""
    import difflib

    sections = {name: field.annotation.model_fields for name, field in Settings.model_fields.items()}
    valid = [*OTHER_VARIABLES, *(f"CMDB_{sec.upper()}" for sec in sections),
             *(f"CMDB_{sec.upper()}__{key.upper()}" for sec, keys in sections.items() for key in keys)]
    for key in sorted(os.environ if environ is None else environ):
        name = key.upper()
        if not name.startswith("CMDB_") or name in valid:
            continue
        parts = name[5:].lower().split("__")
        if len(parts) > 2 and parts[0] in sections and parts[1] in sections[parts[0]]:
            continue  # a nested value inside a field
        near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]}?" if near else "; settings variables look like CMDB_TRAIN__BATCH"
        raise ConfigError(f"environment variable {key} names no setting{hint}")


def load_settings(config: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the effective settings: defaults < ``config`` YAML < CMDB_* env < ``overrides``.

    ``overrides`` is nested by section (``{"train": {"batch": 2}}``); None values mean
    "flag not given" and are dropped, so an unset flag never hides the file or environment.
    """
    check_environment()
    token = _yaml_file.set(Path(config) if config else None)
    try:
        return Settings(**_drop_none(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        _yaml_file.reset(token)


def settings_from_dict(data: dict[str, Any]) -> Settings:
    """Rebuild settings saved in a checkpoint or run folder, ignoring the environment.

    Why: a checkpoint must rebuild the same network wherever it is loaded, whatever
    CMDB_* variables that machine happens to have set.
    """
    try:
        return Settings.model_construct(**{
            "data": DataSettings.model_validate(data.get("data", {})),
            "model": ModelSettings.model_validate(data.get("model", {})),
            "train": TrainSettings.model_validate(data.get("train", {})),
            "predict": PredictSettings.model_validate(data.get("predict", {})),
        })
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "saved settings")) from None
