"""``confkd train`` through CliRunner on tiny phantoms: outputs, resume, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.data.phantoms import write_phantom_dataset

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--set", "data.n_strong=2",
    "--set", "model.width=4",
    "--set", "model.depth=2",
    "--set", "train.strong_per_batch=2",
    "--set", "train.weak_per_batch=4",
    "--set", "train.val_every=10",
    "--set", "train.log_every=5",
    "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("train") / "ph", n_train=4, n_val=1, n_test=0, size=(48, 48))


def test_train_then_resume_then_refuse(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = str(REPO / "configs" / "confkd.yaml")
    result = runner.invoke(
        app, ["train", str(dataset), "--config", config, "--out", str(run), *TINY, "--set", "train.iterations=10"]
    )
    assert result.exit_code == 0, result.output
    assert "done: 10 steps" in result.stdout
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoint_last.pt", weights_only=True)  # self-describing, safe to load
    assert ckpt["config"]["loss"]["lambda_ent"] == pytest.approx(0.1)

    # resume with a longer budget continues from step 10
    result = runner.invoke(
        app,
        [
            "train",
            str(dataset),
            "--config",
            config,
            "--out",
            str(run),
            *TINY,
            "--set",
            "train.iterations=20",
            "--resume",
        ],
    )
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 20 and steps == sorted(steps)

    # a non-empty run dir without --resume is a usage error, in one line
    result = runner.invoke(app, ["train", str(dataset), "--config", config, "--out", str(run), *TINY])
    assert result.exit_code == 2
    assert "--resume" in result.output and "Traceback" not in result.output


def test_train_errors_are_one_line(dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(dataset), "--out", str(tmp_path / "r"), "--set", "loss.lambda_kll=1"])
    assert result.exit_code == 2
    assert "unknown config key 'loss.lambda_kll'" in result.output
    result = runner.invoke(app, ["train", str(tmp_path / "missing"), "--out", str(tmp_path / "r2"), *TINY])
    assert result.exit_code == 2
    assert "dataset.json" in result.output
    result = runner.invoke(
        app, ["train", str(dataset), "--out", str(tmp_path / "r3"), *TINY[:-2], "--device", "cuda:7"]
    )
    if not torch.cuda.is_available():
        assert result.exit_code == 2
        assert "cuda" in result.output.lower()
