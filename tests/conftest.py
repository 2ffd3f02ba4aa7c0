"""Shared fixtures: where the real datasets are, and skipping cleanly when they are absent."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    """The real datasets: ``$CONFKD_DATA_DIR`` or ``<repo>/../shared/data``."""
    env = os.environ.get("CONFKD_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    path = data_root() / "acdc"
    if not (path / "dataset.json").is_file():
        pytest.skip(f"ACDC data not found at {path} (set CONFKD_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    path = data_root() / "hippocampus"
    if not (path / "dataset.json").is_file():
        pytest.skip(f"hippocampus data not found at {path} (set CONFKD_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint with fixed random weights (width 4, depth 2, 4 classes, 1.5 mm): for tests of the CLI and the
    batch machinery, whose behaviour does not depend on the model's quality. Modules that need trained weights
    define their own ``checkpoint``."""
    from confkd.config import config_from_dict
    from confkd.training.checkpoint import save_untrained_checkpoint

    cfg = config_from_dict(
        {
            "model": {"width": 4, "depth": 2, "num_classes": 4},
            "preprocess": {"target_spacing": [1.5, 1.5], "pad_multiple": 8},
        }
    )
    path = tmp_path_factory.mktemp("model") / "random.pt"
    return save_untrained_checkpoint(cfg, path, label_names=("background", "RV", "MYO", "LV"), ignore_index=4)


def pytest_configure(config: pytest.Config) -> None:
    # A test run started in the background by a non-interactive shell (`pytest &`, some CI runners) inherits SIGINT
    # *ignored*, and confkd deliberately keeps an ignored SIGINT ignored (nohup). The interruption tests are about a
    # terminal's Ctrl-C, so give this process (and, through exec, its subprocesses) the default disposition;
    # tests of the ignored case set it themselves.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None and _cuda_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {
        "slow": None if config.getoption("--runslow") else pytest.mark.skip(reason="slow test: run with --runslow"),
        "gpu": None if _cuda_available() else pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)"),
        "trt": None
        if _tensorrt_available()
        else pytest.mark.skip(reason="needs TensorRT and an NVIDIA GPU (pip install 'confkd[trt]')"),
    }
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
                item.add_marker(skip)
