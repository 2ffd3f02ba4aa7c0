"""Interrupting ``confkd train`` (SIGINT / SIGTERM): a checkpoint at the step it stopped, exit 130, exact resume.

In-process runs are interrupted from the progress callbacks (a real signal, at a known step); subprocess runs of
the command get a real signal from outside while they train; a torchrun pair is signalled on one rank only.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from confkd.config import Config, load_config
from confkd.data.phantoms import write_phantom_dataset
from confkd.training.checkpoint import load_checkpoint
from confkd.training.trainer import TrainingInterrupted, train

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "confkd.yaml"
# tests/training/test_trainer.py's tiny setting, with every random stream in use (dropout, elastic, noise): a
# resume that missed one of them would not reproduce the trajectory
TINY = [
    "model.width=4",
    "model.depth=2",
    "model.dropout=0.3",
    "preprocess.pad_multiple=8",
    "train.patch_size=[32, 32]",
    "train.strong_per_batch=2",
    "train.weak_per_batch=4",
    "train.lr=0.001",
    "train.num_workers=1",
    "data.n_strong=2",
    "augment.p_elastic=0.5",
    "augment.p_noise=0.5",
]


def tiny(*overrides: str) -> Config:
    return load_config(PRESET, [*TINY, *overrides])


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def trajectory(run_dir: Path) -> tuple[list, list]:
    """What must not depend on an interruption: the logged losses per step, and the validations (no timings)."""
    train_records = [(r["step"], r["epoch"], r["lr"], r["losses"]) for r in records(run_dir, "train")]
    val_records = [{k: v for k, v in r.items() if k != "epoch"} for r in records(run_dir, "val")]
    return train_records, val_records


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_train=6, n_val=2, n_test=0, size=(48, 48))


class SignalAt:
    """Progress callbacks that send this process a real signal at a given logged step or validation."""

    def __init__(self, *, step: int | None = None, validation: int | None = None, sig: int = signal.SIGINT) -> None:
        self.step, self.validation, self.sig = step, validation, sig

    def on_step(self, step: int, total_steps: int, terms: dict[str, float], images_per_s: float) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.sig)

    def on_validation(self, step: int, metrics: dict[str, Any]) -> None:
        if step == self.validation:
            os.kill(os.getpid(), self.sig)


# ------------------------------------------------------------------------------------------------ in process


def test_a_stop_between_log_lines_resumes_the_logged_trajectory_exactly(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny("train.iterations=7", "train.log_every=3", "train.val_every=4")
    full = train(dataset, cfg, tmp_path / "full", device="cpu")
    # SIGTERM during the validation at step 4: the loop stops after step 5, two steps into a log interval
    with pytest.raises(TrainingInterrupted) as info:
        train(dataset, cfg, tmp_path / "split", device="cpu", callback=SignalAt(validation=4, sig=signal.SIGTERM))
    assert (info.value.step, info.value.signal_name) == (5, "SIGTERM")
    assert info.value.checkpoint == tmp_path / "split" / "checkpoint_last.pt"
    ckpt = load_checkpoint(info.value.checkpoint)
    assert ckpt["step"] == ckpt["train"]["step"] == 5 and not ckpt["train"]["validation_due"]
    assert ckpt["train"]["ranks"][0]["log"]["count"] == 2  # steps 4 and 5 wait for the log line at step 6
    assert [r["step"] for r in records(tmp_path / "split", "train")] == [3]
    resumed = train(dataset, cfg, tmp_path / "split", device="cpu", resume=True)
    assert resumed.steps == 7
    assert trajectory(tmp_path / "split") == trajectory(tmp_path / "full")  # bitwise: floats survive JSON exactly
    assert same_weights(full.last_checkpoint, resumed.last_checkpoint)
    assert same_weights(full.best_checkpoint, resumed.best_checkpoint)


def test_a_stop_where_a_validation_is_due_validates_first_on_resume(dataset: Path, tmp_path: Path) -> None:
    cfg = tiny("train.iterations=6", "train.log_every=2", "train.val_every=4")
    full = train(dataset, cfg, tmp_path / "full", device="cpu")
    with pytest.raises(TrainingInterrupted) as info:  # at step 4, just before its validation: skipped, not lost
        train(dataset, cfg, tmp_path / "split", device="cpu", callback=SignalAt(step=4))
    assert (info.value.step, info.value.signal_name) == (4, "SIGINT")
    assert load_checkpoint(info.value.checkpoint)["train"]["validation_due"]
    assert records(tmp_path / "split", "val") == [] and not (tmp_path / "split" / "checkpoint_best.pt").exists()
    train(dataset, cfg, tmp_path / "split", device="cpu", resume=True)
    assert [r["step"] for r in records(tmp_path / "split", "val")] == [4, 6]
    assert trajectory(tmp_path / "split") == trajectory(tmp_path / "full")
    assert same_weights(full.best_checkpoint, tmp_path / "split" / "checkpoint_best.pt")


def test_handlers_are_restored_and_an_ignored_signal_stays_ignored(dataset: Path, tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    train(dataset, tiny("train.iterations=2", "train.val_every=100"), tmp_path / "a", device="cpu")
    assert signal.getsignal(signal.SIGTERM) is before
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup
    try:
        result = train(
            dataset,
            tiny("train.iterations=4", "train.log_every=1", "train.val_every=100"),
            tmp_path / "b",
            device="cpu",
            callback=SignalAt(step=2, sig=signal.SIGTERM),
        )
        assert result.steps == 4
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------- the command

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process: the same float results
CLI_STEPS = ["train.iterations=240", "train.log_every=1", "train.val_every=100"]


def confkd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "confkd.cli.main", *map(str, args)]


def train_command(dataset: Path, run: Path, overrides: list[str]) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return confkd("train", dataset, "--config", PRESET, "--out", run, "--device", "cpu", *sets)


def wait_for_first_record(proc: subprocess.Popen, run: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no train record before exit / timeout (rc {proc.returncode}): {out[-2000:]}{err[-2000:]}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.run(train_command(dataset, run, [*TINY, *CLI_STEPS]), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.slow  # three training processes, ~25 s on 2 cores
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_command_stops_on_a_signal_exits_130_and_resumes_exactly(
    dataset: Path, uninterrupted: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(dataset, run, [*TINY, *CLI_STEPS]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    wait_for_first_record(proc, run)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    ckpt = load_checkpoint(run / "checkpoint_last.pt")
    step = ckpt["step"]
    assert 0 < step < 240 and ckpt["train"]["step"] == step
    assert line.startswith(f"interrupted by {sig.name} at step {step}: {run / 'checkpoint_last.pt'} written; ")
    assert records(run, "train")[-1]["step"] == step  # log_every 1: the last logged step boundary
    # the printed command resumes the run (the saved config.yaml is the config --resume must be given)
    hint = shlex.split(line.split("resume with  ", 1)[1])
    assert hint[:2] == ["confkd", "train"] and "--resume" in hint
    resumed = subprocess.run(confkd(*hint[1:]), capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trajectory(run) == trajectory(uninterrupted)
    assert [r["step"] for r in records(run, "train")] == list(range(1, 241))
    assert same_weights(run / "checkpoint_last.pt", uninterrupted / "checkpoint_last.pt")


# ------------------------------------------------------------------------------------------------ torchrun

DDP_SCRIPT = """
import json, os, sys
from pathlib import Path
from confkd.config import load_config
from confkd.training.trainer import TrainingInterrupted, train

dataset, run_dir, out, preset, *overrides = sys.argv[1:]
rank = os.environ["RANK"]
(Path(out) / f"pid{rank}").write_text(str(os.getpid()))
try:
    status = {"finished": train(dataset, load_config(preset, overrides), run_dir, device="cpu").steps}
except TrainingInterrupted as e:
    status = {"interrupted": e.step, "signal": e.signal_name}
(Path(out) / f"rank{rank}.json").write_text(json.dumps(status))
"""


@pytest.mark.slow  # two processes over Gloo, ~15 s
def test_torchrun_ranks_agree_to_stop_when_one_rank_is_signalled(dataset: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    out, run = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    overrides = [*TINY, "train.iterations=5000", "train.log_every=5", "train.val_every=10000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, str(script), str(dataset), str(run), str(out), str(PRESET), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    wait_for_first_record(proc, run)
    os.kill(int((out / "pid1").read_text()), signal.SIGTERM)  # rank 1 only: rank 0 never sees a signal
    stdout, stderr = proc.communicate(timeout=180)  # a rank left waiting in a collective would hang here
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    step = ranks[1]["interrupted"]
    assert ranks[0]["interrupted"] == step and ranks[1]["signal"] == "SIGTERM"
    assert 0 < step < 5000 and step % 5 == 0  # at a log_every boundary, where the ranks meet
    ckpt = load_checkpoint(run / "checkpoint_last.pt")
    assert ckpt["step"] == step and len(ckpt["train"]["ranks"]) == 2
    assert records(run, "train")[-1]["step"] == step
