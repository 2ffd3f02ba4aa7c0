"""A run's config checked before anything is written (against the dataset, the machine and the run it resumes),
then resolved against the loaded training set.

A resumed run must ask for the config it was started with, except for :data:`RESUMABLE_CHANGES` (the budget,
and the logging and validation cadence, which change no result); a null ``preprocess.target_spacing`` or
``train.patch_size`` means "as resolved by the saved run". Every error names the key and the value that would fix it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from confkd.config import Config, config_from_dict
from confkd.data.dataset import NnUNetDataset
from confkd.data.manifest import Manifest
from confkd.errors import ConfigError, DatasetError
from confkd.training.checkpoint import checkpoint_config
from confkd.training.data import TrainingSet, default_patch_size

__all__ = ["RESUMABLE_CHANGES", "check_config", "config_differences", "resolve_config", "resumed_config"]

#: the keys a resumed run may change
RESUMABLE_CHANGES = ("train.iterations", "train.epochs", "train.log_every", "train.val_every")


def config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: saved -> requested`` for every leaf that differs, except :data:`RESUMABLE_CHANGES`."""
    out = []
    for key in sorted(set(saved) | set(requested)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), requested.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(config_differences(a, b, f"{path}."))
        elif a != b and path not in RESUMABLE_CHANGES:
            out.append(f"{path}: {a!r} (saved) != {b!r} (requested)")
    return out


def resumed_config(config: Config, ckpt: Mapping[str, Any], manifest: Manifest, path: Path) -> Config:
    """``config`` with its nulls resolved as the saved run did, after checking it may continue ``ckpt``.

    ``path``: the checkpoint's file, for the messages. Raises ConfigError (another config, no training state),
    DatasetError (another dataset) or CheckpointError (a saved config that no longer validates).
    """
    # through Config and back: keys added to confkd after the run was saved take their defaults, not "differ"
    saved, requested = checkpoint_config(ckpt).to_dict(), config.to_dict()
    for section, key in (("preprocess", "target_spacing"), ("train", "patch_size")):
        if requested[section][key] is None:  # null means "resolve it": the saved run did
            requested[section][key] = saved[section][key]
    diffs = config_differences(saved, requested)
    if diffs:
        raise ConfigError(
            f"{path}: cannot resume with a different config ({len(diffs)} key(s) differ: "
            f"{'; '.join(diffs)}); only {', '.join(RESUMABLE_CHANGES)} may change"
        )
    if ckpt["dataset"].get("fingerprint") != manifest.fingerprint:
        raise DatasetError(f"{path}: was trained on another dataset (fingerprint differs from {manifest.dataset_root})")
    if "train" not in ckpt:
        raise ConfigError(f"{path}: holds no training state to resume from")
    return config_from_dict(requested)


def check_config(
    config: Config, dataset: NnUNetDataset, manifest: Manifest, device: torch.device, world_size: int
) -> None:
    """Raise ConfigError where ``config`` cannot train on ``dataset`` with ``world_size`` processes on ``device``."""
    model, name = config.model, dataset.root
    if model.num_classes != manifest.num_classes:
        raise ConfigError(
            f"model.num_classes={model.num_classes} but {name} has {manifest.num_classes} classes "
            f"({', '.join(dataset.label_names)}); set model.num_classes={manifest.num_classes}"
        )
    if model.in_channels != dataset.num_channels:
        raise ConfigError(
            f"model.in_channels={model.in_channels} but {name} has {dataset.num_channels} image channel(s); "
            f"set model.in_channels={dataset.num_channels}"
        )
    divisor = 2**model.depth
    if config.preprocess.pad_multiple % divisor:
        raise ConfigError(
            f"preprocess.pad_multiple={config.preprocess.pad_multiple} is not a multiple of 2**model.depth="
            f"{divisor}: whole volumes would not fit the network; set preprocess.pad_multiple={divisor}"
        )
    patch = config.train.patch_size
    if patch is not None and (len(patch) != config.preprocess.spatial_dims or any(p % divisor for p in patch)):
        raise ConfigError(
            f"train.patch_size={list(patch)} needs {config.preprocess.spatial_dims} sizes divisible by "
            f"2**model.depth={divisor}, e.g. {[max(divisor, p // divisor * divisor) for p in patch]}"
        )
    if config.train.sync_batchnorm and world_size > 1 and device.type != "cuda":
        # torch's SyncBatchNorm has no CPU kernel: the first training step would fail on every rank
        raise ConfigError(
            f"train.sync_batchnorm=true needs CUDA devices, but this run uses {device.type} on {world_size} "
            "processes; set train.sync_batchnorm=false"
        )


def resolve_config(config: Config, data: TrainingSet) -> Config:
    """``config`` with what the loaded training set fixes: its target spacing and, when null, the patch size.

    The default patch is the median item shape rounded up to a size the network and the padding both accept
    (:func:`~confkd.training.data.default_patch_size`). The result is the config saved with the run.
    """
    patch = config.train.patch_size
    if patch is None:
        multiple = math.lcm(config.preprocess.pad_multiple, 2**config.model.depth)
        patch = default_patch_size(data.item_shapes(), multiple, config.preprocess.spatial_dims)
    return dataclasses.replace(
        config,
        preprocess=dataclasses.replace(config.preprocess, target_spacing=data.target_spacing),
        train=dataclasses.replace(config.train, patch_size=tuple(patch)),
    )
