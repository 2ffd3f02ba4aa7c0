"""``confkd segment --devices``: one worker process per device, tested with CPU workers (``cpu,cpu``).

Outputs are compared with a single-process run of the same batch, byte for byte; interruption, a dying worker and
a model that does not load run the real pool in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.data.phantoms import make_phantom
from confkd.errors import ConfigError
from confkd.inference.multidevice import parse_devices

runner = CliRunner()
RUN_COLUMNS = ("seconds", "run_id")
RUN_KEYS = ("timings_s", "run_id", "created")


def write_scans(folder: Path, n: int, *, corrupt: bool = True) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        ph = make_phantom(800 + i, size=(48, 48), slices=4)
        nib.save(nib.Nifti1Image(ph.image, ph.affine), folder / f"c{i:02d}_0000.nii.gz")
    if corrupt:
        (folder / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not gzip")
    return folder


def summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k not in RUN_COLUMNS} for row in csv.DictReader(f)]


def failures(folder: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (folder / "failures.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if k not in ("run_id", "time")} for r in records), key=str)


def report(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in RUN_KEYS}


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_two_cpu_workers_give_the_single_process_outputs(tmp_path: Path, checkpoint: Path) -> None:
    scans = write_scans(tmp_path / "scans", 8)
    common = ["segment", str(scans), "--model", str(checkpoint), "--backend", "torch"]
    single = runner.invoke(app, [*common, "--out", str(tmp_path / "one"), "--device", "cpu"])
    multi = runner.invoke(app, [*common, "--out", str(tmp_path / "two"), "--devices", "cpu,cpu"])
    assert single.exit_code == 1 and multi.exit_code == 1, multi.output  # the corrupt file fails, nothing else
    assert "FAILED corrupt (read)" in multi.output and "ok\t8" in multi.output and "Traceback" not in multi.output
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for image in sorted(one.glob("*.nii.gz")):
        assert image.read_bytes() == (two / image.name).read_bytes(), image.name  # voxels and headers
    for path in sorted(one.glob("c*.json")):
        assert report(path) == report(two / path.name), path.name
    assert summary(one) == summary(two)
    assert failures(one) == failures(two)
    assert hidden(two) == []


def test_device_lists_and_usage_errors(tmp_path: Path, checkpoint: Path) -> None:
    assert parse_devices("cpu") == ("cpu",)
    assert parse_devices(" cpu , CPU ") == ("cpu", "cpu")
    for bad in ("", "cpu,,cpu", "auto,cpu", "tpu"):
        with pytest.raises(ConfigError):
            parse_devices(bad)
    scans = write_scans(tmp_path / "scans", 1, corrupt=False)
    common = ["segment", str(scans), "--model", str(checkpoint), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*common, "--device", "cpu", "--devices", "cpu,cpu"])
    assert result.exit_code == 2 and "--device and --devices exclude each other" in result.output
    result = runner.invoke(app, [*common, "--devices", "cpu,,cpu"])
    assert result.exit_code == 2 and "--devices 'cpu,,cpu'" in result.output
    if not _cuda():
        result = runner.invoke(app, [*common, "--devices", "0,1"])
        assert result.exit_code == 2 and "torch sees no GPU" in result.output, result.output
    assert not (tmp_path / "out").exists()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ subprocesses
# the real pool under a script: its loader (which runs in each worker) slows inference down, logs which process
# took which case, and can make a worker die on one case
SCRIPT = """
import os, sys, time
from functools import partial
from pathlib import Path


def loader(checkpoint, device):
    from confkd.inference import workers
    from confkd.inference.model import load_model

    real = workers.Batch.infer

    def infer(self, item):
        if item.case.case == os.environ.get("DIE_ON"):
            os._exit(3)
        with open(os.environ["TAKEN_LOG"], "a") as f:
            f.write(f"{os.getpid()} {item.case.case}\\n")
        time.sleep(float(os.environ.get("SLOW", "0")))
        return real(self, item)

    workers.Batch.infer = infer
    return load_model(checkpoint, device=device, backend="torch")


if __name__ == "__main__":
    from confkd.inference.inputs import resolve_inputs
    from confkd.inference.multidevice import DevicePool
    from confkd.inference.pipeline import BatchInterrupted, run_batch

    checkpoint, scans, out = sys.argv[1:4]
    with DevicePool(partial(loader, checkpoint), ["cpu", "cpu"]) as pool:
        print("ready", flush=True)
        try:
            result = run_batch(resolve_inputs([scans]), out, pool)
        except BatchInterrupted as e:
            print("interrupted", e.signal_name, len(e.result.ok), flush=True)
            sys.exit(130)
    print("done", len(result.ok), len(result.failed), len(result.skipped), flush=True)
"""


def start(tmp_path: Path, checkpoint: Path, scans: Path, out: Path, **env: str) -> subprocess.Popen[str]:
    script = tmp_path / "pool_script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    environ = {**os.environ, "TAKEN_LOG": str(tmp_path / "taken.log"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, str(script), str(checkpoint), str(scans), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        start_new_session=True,  # its own process group: a "terminal" Ctrl-C reaches the workers too
    )


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def group_gone(pgid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def complete_cases(out: Path, *, killed: bool = False) -> list[str]:
    done = sorted(p.stem for p in out.glob("c*.json"))
    # every output present is complete: images exactly for the cases with a report, no temporary file (a killed
    # process may leave hidden part files, which the next run removes once they are an hour old)
    assert sorted(p.name.removesuffix("_seg.nii.gz") for p in out.glob("*_seg.nii.gz")) == done
    assert sorted(p.name.removesuffix("_conf.nii.gz") for p in out.glob("*_conf.nii.gz")) == done
    assert killed or hidden(out) == []
    return done


@pytest.mark.slow
def test_interrupt_stops_the_workers_and_leaves_only_complete_cases(tmp_path: Path, checkpoint: Path) -> None:
    scans = write_scans(tmp_path / "scans", 10, corrupt=False)
    out = tmp_path / "out"
    # Ctrl-C in a terminal: SIGINT to the whole process group, parent and workers alike
    proc = start(tmp_path, checkpoint, scans, out, SLOW="0.5")
    wait_for(out / "c00.json", proc)
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted SIGINT" in output, output
    assert "Traceback" not in output, output
    assert group_gone(proc.pid), "worker processes outlived the interrupted run"
    first = complete_cases(out)
    assert 1 <= len(first) < 10, output
    assert (out / "summary.csv").is_file() and len(summary(out)) == len(first)
    assert len({line.split()[0] for line in (tmp_path / "taken.log").read_text().splitlines()}) == 2  # both worked

    # SIGTERM to the parent only (a scheduler's kill): the parent stops the workers
    proc = start(tmp_path, checkpoint, scans, out, SLOW="0.5")
    wait_for(out / "summary.csv", proc)  # exists already; wait for one more case instead
    deadline = time.monotonic() + 120
    while len(list(out.glob("c*.json"))) <= len(first):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted SIGTERM" in output, output
    assert group_gone(proc.pid)
    second = complete_cases(out)
    assert set(first) < set(second) and len(second) < 10, output
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith(tuple(second))}

    proc = start(tmp_path, checkpoint, scans, out)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and f"done {10 - len(second)} 0 {len(second)}" in output, output
    assert complete_cases(out) == [f"c{i:02d}" for i in range(10)]
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps  # finished cases were not redone


@pytest.mark.slow
def test_a_second_signal_abandons_the_inferences_in_progress(tmp_path: Path, checkpoint: Path) -> None:
    scans = write_scans(tmp_path / "scans", 8, corrupt=False)
    out = tmp_path / "out"
    proc = start(tmp_path, checkpoint, scans, out, SLOW="4")
    wait_for(out / "c00.json", proc, timeout=180)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)  # both workers are still in their 4 s inferences
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "interrupted SIGINT" in output and "Traceback" not in output, output
    assert group_gone(proc.pid)
    started = {line.split()[1] for line in (tmp_path / "taken.log").read_text().splitlines()}
    done = complete_cases(out)  # nothing partial
    assert set(done) < started, (done, started)  # the inferences in progress were abandoned, not written


@pytest.mark.slow
def test_a_dying_worker_fails_its_cases_and_the_other_finishes_the_batch(tmp_path: Path, checkpoint: Path) -> None:
    scans = write_scans(tmp_path / "scans", 6, corrupt=False)
    out = tmp_path / "out"
    proc = start(tmp_path, checkpoint, scans, out, DIE_ON="c02")
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and "Traceback" not in output, output
    records = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    lost = sorted(r["case"] for r in records)
    # the cases the dead worker held fail: the one it was inferring, those read ahead (prefetch 2 + 1 reader) and
    # the one being written (1 writer); the other worker completes every other case
    assert "c02" in lost and len(lost) <= 5, output
    assert all(r["error_type"] == "WorkerDied" and "exit code 3" in r["message"] for r in records)
    assert complete_cases(out, killed=True) == sorted(set(f"c{i:02d}" for i in range(6)) - set(lost))
    assert f"done {6 - len(lost)} {len(lost)} 0" in output, output
    rows = {row["case"]: row for row in summary(out)}
    assert all(rows[case]["status"] == "failed" and rows[case]["stage"] == "infer" for case in lost)

    proc = start(tmp_path, checkpoint, scans, out)  # a re-run redoes them
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and f"done {len(lost)} 0 {6 - len(lost)}" in output, output
    assert complete_cases(out, killed=True) == [f"c{i:02d}" for i in range(6)]
    assert [row["status"] for row in summary(out)] == ["ok"] * 6


def test_a_model_that_does_not_load_is_a_usage_error(tmp_path: Path) -> None:
    scans = write_scans(tmp_path / "scans", 1, corrupt=False)
    bad = tmp_path / "model.pt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(scans), "--model", str(bad), "--devices", "cpu,cpu", "--out", str(out)])
    assert result.exit_code == 2 and "device cpu:" in result.output and "model.pt" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()
