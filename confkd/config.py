"""Typed, frozen configuration that travels with every run directory and checkpoint.

A :class:`Config` is a tree of frozen dataclasses. It is loaded from YAML (:func:`load_config`), overridden
from the command line with ``key.path=value`` strings (:func:`apply_overrides`), and serialised back to a
plain dict (:meth:`Config.to_dict`) that is stored next to the weights, so that export and inference need
nothing but the artefact.

Unknown keys are an error that lists the valid keys, at every level of the tree.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from confkd.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "Config",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "save_config",
]

WeakSource = Literal["scribbles", "erosion", "discs", "bbox"]
NormKind = Literal["batch", "instance"]
Normalization = Literal["zscore", "minmax", "none"]
Coverage = Literal["strong", "weak", "all"]


@dataclass(frozen=True)
class DataConfig:
    """Which cases are used and how each one is supervised.

    ``n_strong`` patients of ``train_split`` are drawn with ``strong_seed`` and get their dense labels;
    every other patient of that split is weakly supervised with labels from ``weak_source``.
    """

    train_split: str = "train"
    val_split: str = "val"
    n_strong: int | None = 7  # null: every patient of the train split is strong (the upper bound)
    strong_seed: int = 0
    weak_source: WeakSource = "scribbles"
    # erosion seeds: number of binary-erosion iterations per class (falls back when a structure vanishes)
    erosion_iterations: int = 10
    # random discs: discs per structure and slice, and their radius in voxels
    disc_count: int = 2
    disc_radius: int = 3
    # bounding-box interiors: fraction of the box kept around its centre
    bbox_shrink: float = 0.5
    weak_seed: int = 0

    def __post_init__(self) -> None:
        _check(self.n_strong is None or self.n_strong >= 0, "data.n_strong", self.n_strong, "must be >= 0 or null")
        _check(self.erosion_iterations >= 0, "data.erosion_iterations", self.erosion_iterations, "must be >= 0")
        _check(self.disc_count >= 1, "data.disc_count", self.disc_count, "must be >= 1")
        _check(self.disc_radius >= 0, "data.disc_radius", self.disc_radius, "must be >= 0")
        _check(0.0 < self.bbox_shrink <= 1.0, "data.bbox_shrink", self.bbox_shrink, "must be in (0, 1]")


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing applied identically at training and inference time (stored with the model).

    ``target_spacing`` is in millimetres along the in-plane axes (2D) or all three axes (3D); ``None`` means
    "the dataset median", resolved once at training time and then frozen into the checkpoint.
    ``slice_axis`` ``None`` picks the lowest-resolution (largest spacing) axis of each volume.
    """

    spatial_dims: Literal[2, 3] = 2
    target_spacing: tuple[float, ...] | None = None
    slice_axis: int | None = None
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    normalization: Normalization = "zscore"
    pad_multiple: int = 16

    def __post_init__(self) -> None:
        if self.target_spacing is not None:
            _check(
                len(self.target_spacing) == self.spatial_dims,
                "preprocess.target_spacing",
                self.target_spacing,
                f"needs {self.spatial_dims} values for spatial_dims={self.spatial_dims} "
                "(or null for the dataset median)",
            )
            positive = all(s > 0 for s in self.target_spacing)
            _check(positive, "preprocess.target_spacing", self.target_spacing, "must be > 0")
        _check(self.slice_axis in (None, 0, 1, 2), "preprocess.slice_axis", self.slice_axis, "must be 0, 1, 2 or null")
        lo, hi = self.clip_percentiles
        ok = 0.0 <= lo < hi <= 100.0
        _check(ok, "preprocess.clip_percentiles", self.clip_percentiles, "needs 0 <= low < high <= 100")
        _check(self.pad_multiple >= 1, "preprocess.pad_multiple", self.pad_multiple, "must be >= 1")


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation, applied on the training device to the image, dense and sparse labels alike.

    Spatial transforms (rotation, scaling, flips, elastic deformation) move the labels with the image
    (nearest-neighbour); intensity transforms touch the image only. Probabilities are per image.
    """

    enabled: bool = True
    p_rotate: float = 0.5
    rotate_degrees: float = 180.0
    p_scale: float = 0.5
    scale_range: tuple[float, float] = (0.85, 1.25)
    p_flip: float = 0.5
    p_elastic: float = 0.2
    elastic_alpha: float = 0.05  # largest displacement as a fraction of the patch size (0.1 can fold the grid)
    elastic_sigma: float = 0.1  # smoothness of the displacement field as a fraction of the patch size
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_contrast: float = 0.3
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_brightness: float = 0.3
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_noise: float = 0.15
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("p_rotate", "p_scale", "p_flip", "p_elastic", "p_gamma", "p_contrast", "p_brightness", "p_noise"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"augment.{name}", value, "must be a probability in [0, 1]")
        for name in ("scale_range", "gamma_range", "contrast_range", "brightness_range"):
            lo, hi = getattr(self, name)
            _check(0.0 < lo <= hi, f"augment.{name}", (lo, hi), "needs 0 < low <= high")
        _check(self.elastic_alpha >= 0.0, "augment.elastic_alpha", self.elastic_alpha, "must be >= 0")
        _check(self.elastic_sigma > 0.0, "augment.elastic_sigma", self.elastic_sigma, "must be > 0")
        _check(self.noise_std >= 0.0, "augment.noise_std", self.noise_std, "must be >= 0")


@dataclass(frozen=True)
class ModelConfig:
    """The network: a U-Net encoder shared by a teacher and a student decoder (``dual_unet``) or one decoder."""

    name: str = "dual_unet"
    in_channels: int = 1
    num_classes: int = 4
    width: int = 16
    depth: int = 4
    norm: NormKind = "batch"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check(self.in_channels >= 1, "model.in_channels", self.in_channels, "must be >= 1")
        _check(self.num_classes >= 2, "model.num_classes", self.num_classes, "must be >= 2 (background included)")
        _check(self.width >= 1, "model.width", self.width, "must be >= 1")
        _check(1 <= self.depth <= 7, "model.depth", self.depth, "must be between 1 and 7")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class LossConfig:
    """Weights of the ConfKD objective.

    total = lambda_strong * CE(teacher, dense)            on strong images
          + lambda_weak   * pCE(student, sparse)          on weak images
          + lambda_kl     * T^2 KL(teacher_T || student_T) on ``kl_on`` images (teacher detached)
          + lambda_ent    * H(student)                    on ``entropy_on`` images
          + lambda_pseudo * CE(student, argmax student)    on ``entropy_on`` images (pseudo-mask baseline)
    """

    lambda_strong: float = 1.0
    lambda_weak: float = 1.0
    lambda_kl: float = 1.0
    lambda_ent: float = 0.1
    lambda_pseudo: float = 0.0
    temperature: float = 1.0
    kl_on: Coverage = "all"
    entropy_on: Coverage = "weak"
    entropy_normalize: bool = False
    pseudo_threshold: float = 0.0
    # the student also learns from dense labels on strong images (single-branch baselines use this)
    student_strong: bool = False

    def __post_init__(self) -> None:
        for name in ("lambda_strong", "lambda_weak", "lambda_kl", "lambda_ent", "lambda_pseudo"):
            _check(getattr(self, name) >= 0.0, f"loss.{name}", getattr(self, name), "must be >= 0")
        _check(self.temperature > 0.0, "loss.temperature", self.temperature, "must be > 0")
        _check(0.0 <= self.pseudo_threshold < 1.0, "loss.pseudo_threshold", self.pseudo_threshold, "must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation budget and hardware settings."""

    strong_per_batch: int = 8
    weak_per_batch: int = 40
    iterations: int = 10000
    epochs: int | None = None
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "poly"] = "constant"
    patch_size: tuple[int, ...] | None = None
    # share of crops centred on an annotated foreground voxel (nnU-Net's oversample_foreground_percent, 1/3)
    foreground_fraction: float = 0.33
    val_every: int = 1000
    # steps between log lines, progress callbacks and metrics.jsonl train records (each one is a host-device sync)
    log_every: int = 10
    seed: int = 0
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    # under torchrun: BatchNorm statistics over the global batch rather than each rank's (CUDA only)
    sync_batchnorm: bool = False
    num_workers: int = 2
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check(self.strong_per_batch >= 0, "train.strong_per_batch", self.strong_per_batch, "must be >= 0")
        _check(self.weak_per_batch >= 0, "train.weak_per_batch", self.weak_per_batch, "must be >= 0")
        _check(
            self.strong_per_batch + self.weak_per_batch > 0,
            "train.strong_per_batch",
            self.strong_per_batch,
            "and train.weak_per_batch cannot both be 0",
        )
        _check(self.iterations >= 1, "train.iterations", self.iterations, "must be >= 1")
        _check(self.epochs is None or self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1 or null")
        _check(self.lr > 0.0, "train.lr", self.lr, "must be > 0")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "train.betas", self.betas, "must be in [0, 1)")
        fraction = self.foreground_fraction
        _check(0.0 <= fraction <= 1.0, "train.foreground_fraction", fraction, "must be a fraction in [0, 1]")
        _check(self.val_every >= 1, "train.val_every", self.val_every, "must be >= 1")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        _check(self.num_workers >= 0, "train.num_workers", self.num_workers, "must be >= 0")


@dataclass(frozen=True)
class Config:
    """Everything a run needs; saved with every run directory and checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "confkd"

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-serialisable dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **overrides: str) -> Config:
        """Return a copy with ``{"loss.lambda_kl": "0.5"}``-style overrides applied."""
        return apply_overrides(self, [f"{k}={v}" for k, v in overrides.items()])


def _check(ok: bool, key: str, value: Any, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} {problem}")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert a YAML value to the annotated type ``tp`` (raises ConfigError)."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")  # pragma: no cover


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + str(k) for k in unknown)}; valid keys here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build a :class:`Config` from a (possibly partial) nested mapping; missing keys keep their defaults."""
    return _build(Config, data or {})


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config file and apply ``key.path=value`` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a config file must hold a mapping at its top level")
    try:
        config = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return apply_overrides(config, overrides)


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``0.5``, ``true``, ``[1, 1]``, ``null``)."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value (for example loss.lambda_kl=0.5)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        node: dict[str, Any] = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                valid = ", ".join(k for k, v in node.items() if isinstance(v, dict))
                where = ".".join(parts[:depth]) or "the top level"
                raise ConfigError(f"override {item!r}: {part!r} is not a config section; sections in {where}: {valid}")
            node = child
        leaf = parts[-1]
        if leaf not in node or isinstance(node[leaf], dict):
            prefix = ".".join(parts[:-1])
            valid = ", ".join(f"{prefix}.{k}" if prefix else k for k in node)
            raise ConfigError(f"override {item!r}: unknown config key {key!r}; valid keys here: {valid}")
        node[leaf] = value
    return config_from_dict(data)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from confkd.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
