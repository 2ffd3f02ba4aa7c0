"""Shared by the export tests: a tiny random-weight checkpoint and its export (module-scoped: ~2 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from confkd.config import config_from_dict
from confkd.export.onnx_export import export_model
from confkd.training.checkpoint import save_untrained_checkpoint


def make_tiny_checkpoint(path: Path) -> Path:
    cfg = config_from_dict(
        {
            "name": "tiny",
            "model": {"width": 4, "depth": 2, "num_classes": 4},
            "preprocess": {"target_spacing": [1.5, 1.5], "pad_multiple": 8},
            "train": {"patch_size": [64, 64]},
        }
    )
    return save_untrained_checkpoint(
        cfg, path, label_names=("background", "RV", "MYO", "LV"), ignore_index=4, seed=0, warmup_shape=(4, 1, 32, 32)
    )


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export")
    ckpt = make_tiny_checkpoint(root / "tiny.pt")
    export_model(ckpt, root / "model")
    return ckpt, root / "model"
