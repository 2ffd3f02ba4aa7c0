"""Models and inputs are untrusted: nothing in them runs code, nothing modified after export is used, and nothing
read from them places a file outside the folder the user named.

* checkpoints load with ``weights_only=True``: a pickle that would run a command is refused before anything runs;
* an exported directory is checked before use: the ONNX file against the manifest's ``onnx_sha256``, the manifest
  against the ONNX file's metadata (which that hash covers), its schema strictly; cached TensorRT engines against
  their sidecar's sha256;
* names from a model (config name, label names) and from inputs (file names with ``..``, separators, control
  characters, undecodable bytes, 255 bytes) never leave OUT_DIR / MODEL_DIR: real ``confkd segment`` and
  ``confkd export`` runs on tiny models, every file of the surrounding trees compared before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from typer.testing import CliRunner

from confkd.cli.main import app
from confkd.config import config_from_dict
from confkd.data.phantoms import make_phantom, write_phantom_dataset
from confkd.errors import CheckpointError, ManifestError
from confkd.export import engine_cache as ec
from confkd.export.onnx_export import export_model
from confkd.inference.manifest import load_manifest
from confkd.inference.model import load_model
from confkd.training.checkpoint import FORMAT, load_checkpoint, save_untrained_checkpoint

runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def save_scan(path: Path, seed: int = 0) -> Path:
    ph = make_phantom(seed, size=(48, 48), slices=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(ph.image, ph.affine), path)
    return path


# ------------------------------------------------------------------------------------------ pickled code

# run in another process: this test process never unpickles the payload unsafely
PAYLOAD = """
import os, sys, torch

class RunsACommand:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))

torch.save({"format": "confkd-checkpoint", "format_version": 1, "model": {}, "payload": RunsACommand()}, sys.argv[1])
"""


def write_payload(path: Path, marker: Path) -> Path:
    """A checkpoint whose unpickling runs ``touch marker``."""
    subprocess.run([sys.executable, "-c", PAYLOAD, str(path), str(marker)], check=True)
    return path


def test_the_payload_is_real(tmp_path: Path) -> None:
    """Unpickled the unsafe way, the file runs its command: the refusals below are what stands in between."""
    evil = write_payload(tmp_path / "evil.pt", tmp_path / "MARKER")
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"], check=True)
    assert (tmp_path / "MARKER").exists()


def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    evil = write_payload(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(evil)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(evil) in message
    assert "posix.system" in message and "refused" in message
    assert "weights_only" not in message and "safe_globals" not in message  # none of torch's unsafe advice
    with pytest.raises(CheckpointError):
        load_model(evil, device="cpu")
    scan = save_scan(tmp_path / "scan_0000.nii.gz")
    for args in (
        ("segment", scan, "--model", evil, "--out", tmp_path / "out", "--device", "cpu"),
        ("export", evil, "--out", tmp_path / "model"),
    ):
        code, output = cli(*args)
        assert code == 2, output
        (line,) = error_lines(output)
        assert "evil.pt" in line and "posix.system" in line and "Traceback" not in output
    assert not marker.exists()
    assert not (tmp_path / "model").exists()
    assert not list(tmp_path.glob("out/scan*"))


def test_resuming_from_a_pickled_payload_is_refused(tmp_path: Path) -> None:
    dataset = write_phantom_dataset(tmp_path / "data", n_train=2, n_val=0, n_test=0, size=(32, 32))
    run = tmp_path / "run"
    run.mkdir()
    write_payload(run / "checkpoint_last.pt", tmp_path / "MARKER")
    code, output = cli("train", dataset, "--out", run, "--device", "cpu", "--resume", "--set", "data.n_strong=1")
    assert code == 2, output
    (line,) = error_lines(output)
    assert "checkpoint_last.pt" in line and "posix.system" in line
    assert not (tmp_path / "MARKER").exists()


def test_a_checkpoint_that_is_not_ours_is_named(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": FORMAT + "-but-not", "model": {}}, foreign)
    code, output = cli("segment", save_scan(tmp_path / "s.nii.gz"), "--model", foreign, "--out", tmp_path / "o")
    assert code == 2, output
    (line,) = error_lines(output)
    assert "foreign.pt" in line and "not a confkd checkpoint" in line


# ------------------------------------------------------------------------------ tampered exported models


@pytest.fixture
def model_copy(exported: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(exported[1], copy)
    return copy


def _edit_manifest(model_dir: Path, **changes: object) -> None:
    path = model_dir / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def _segment_refuses(model_dir: Path, tmp_path: Path, *expected: str) -> None:
    scan = save_scan(tmp_path / "scans" / "scan_0000.nii.gz")
    out = tmp_path / "out"
    code, output = cli("segment", scan, "--model", model_dir, "--out", out, "--device", "cpu")
    assert code == 2, output
    (line,) = error_lines(output)
    for text in expected:
        assert text in line, line
    assert "Traceback" not in output
    assert not list(out.glob("scan*")), "nothing is segmented with a refused model"


def test_one_flipped_byte_in_the_onnx_file_is_refused(model_copy: Path, tmp_path: Path) -> None:
    raw = bytearray((model_copy / "model.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (model_copy / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="modified after export"):
        load_manifest(model_copy)
    _segment_refuses(model_copy, tmp_path, str(model_copy / "model.onnx"), "modified after export")


TAMPERED = {
    "labels": {"names": ["background", "RV", "MYO", "tumour"], "values": [0, 1, 2, 3], "ignore_index": 4},
    "preprocessing": {"target_spacing": [1.0, 1.0]},  # merged into the real section below
    "bounds": {"batch": [1, 8, 64], "spatial": {"min": [4, 4], "opt": [64, 64], "max": [256, 256]}},
    "model_version": "confkd 9.9.9 / better.yaml",
}


@pytest.mark.parametrize("field", list(TAMPERED))
def test_an_edited_manifest_is_refused(model_copy: Path, tmp_path: Path, field: str) -> None:
    value = TAMPERED[field]
    if field == "preprocessing":
        value = {**json.loads((model_copy / "manifest.json").read_text())["preprocessing"], **TAMPERED[field]}
    _edit_manifest(model_copy, **{field: value})
    load_manifest(model_copy, verify_hash=False)  # still a valid manifest: only the cross-check can tell
    with pytest.raises(ManifestError, match=f"{field} differ"):
        load_manifest(model_copy)
    _segment_refuses(model_copy, tmp_path, str(model_copy / "manifest.json"), field, "modified after export")


def test_manifest_hash_unknown_fields_and_escaping_model_file_are_refused(model_copy: Path, tmp_path: Path) -> None:
    good = (model_copy / "manifest.json").read_text()
    _edit_manifest(model_copy, onnx_sha256="0" * 64)  # pointing the manifest at another file
    with pytest.raises(ManifestError, match="does not match the manifest's 000000000000"):
        load_manifest(model_copy)
    (model_copy / "manifest.json").write_text(good)
    _edit_manifest(model_copy, postprocess="rm -rf /")
    with pytest.raises(ManifestError, match=r"unknown field\(s\) postprocess; valid fields are: format"):
        load_manifest(model_copy)
    _segment_refuses(model_copy, tmp_path, "unknown field(s) postprocess")
    shutil.copy(model_copy / "model.onnx", tmp_path / "model.onnx")  # a real ONNX file beside the directory
    for model_file in ("../model.onnx", str(tmp_path / "model.onnx"), ".."):
        (model_copy / "manifest.json").write_text(good)
        _edit_manifest(model_copy, model_file=model_file)
        with pytest.raises(ManifestError, match="is not a file in"):
            load_manifest(model_copy)


def test_a_tampered_cached_engine_is_rebuilt_never_loaded(exported: tuple[Path, Path], tmp_path: Path) -> None:
    built: list[bytes] = []

    def builder(onnx_path: Path, profile: ec.EngineProfile, precision: str, timing: Path) -> bytes:
        built.append(b"engine of " + onnx_path.read_bytes()[-16:])
        return built[-1]

    def get(model_dir: Path) -> ec.CachedEngine:
        gpu = ("NVIDIA Test GPU", "sm_90")
        return ec.get_or_build_engine(
            model_dir, engine_dir=tmp_path / "e", gpu=gpu, trt_version="10.0", builder=builder
        )

    first = get(exported[1])
    assert first.built and not get(exported[1]).built  # the cache works
    raw = bytearray(first.path.read_bytes())
    raw[3] ^= 0x01
    first.path.write_bytes(bytes(raw))
    again = get(exported[1])
    assert again.built and again.engine == built[0] and len(built) == 2
    # an edited manifest stops the TensorRT path before any engine is looked up or built
    copy = tmp_path / "model"
    shutil.copytree(exported[1], copy)
    _edit_manifest(copy, model_version="confkd 9.9.9 / better.yaml")
    with pytest.raises(ManifestError, match="model_version differ"):
        get(copy)
    assert len(built) == 2


# ------------------------------------------------------------------------- nothing written outside the target


def _tree(root: Path) -> dict[bytes, tuple[int, int] | None]:
    """Every path under ``root`` (bytes: names need not be UTF-8): files with (size, mtime), folders with None."""
    out: dict[bytes, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(os.fsencode(root)):
        for name in dirs:
            out[os.path.join(folder, name)] = None
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


def _written_outside(before: dict, after: dict, target: Path) -> list[str]:
    """Paths created or modified between two :func:`_tree` snapshots other than ``target``, what is inside it and
    the folders leading to it (created like ``mkdir -p``)."""
    inside = os.fsencode(target.resolve())
    allowed = {inside, *(os.fsencode(p) for p in target.resolve().parents)}
    changed = [p for p, v in after.items() if p not in before or (v is not None and before[p] != v)]
    return [os.fsdecode(p) for p in changed if p not in allowed and not p.startswith(inside + b"/")]


HOSTILE_FILE_NAMES = {  # input file name -> its case name
    "..%2f..%2fescape_0000.nii.gz": "__%2f..%2fescape",  # URL-encoded traversal: a literal name, made visible
    "..\\..\\windows_0000.nii.gz": "___.._windows",  # backslashes are separators on Windows
    "line\nbreak\ttab\x01ctl\x7f_0000.nii.gz": "line_break_tab_ctl_",  # control characters
    "..hidden.nii.gz": "__hidden",  # leading dots would hide the outputs
    "CON.nii.gz": "CON_",  # a Windows device name
    "scan with spaces .nii.gz": "scan with spaces",  # Windows drops a trailing space
    "L" * 243 + "_0000.nii.gz": None,  # 255 bytes, the longest name a file system takes: cut, with a hash
}


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A checkpoint and its export whose config name and label names are paths (the absolute one inside a
    watched tree, so that a write through it would be seen)."""
    root = tmp_path_factory.mktemp("hostile")
    cfg = config_from_dict(
        {
            "name": "../../../evil_config",
            "model": {"width": 4, "depth": 2, "num_classes": 4},
            "preprocess": {"target_spacing": [1.5, 1.5], "pad_multiple": 8},
            "train": {"patch_size": [32, 32]},
        }
    )
    names = ("background", "../../escape", str(root / "abs_escape"), "sub/dir\\x\n")
    ckpt = save_untrained_checkpoint(cfg, root / "hostile.pt", label_names=names, ignore_index=4)
    export_model(ckpt, root / "model")
    return root, ckpt, root / "model"


@pytest.mark.parametrize("model_kind", ["checkpoint", "exported"])
def test_segment_writes_only_inside_out_dir(
    hostile_model: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_kind: str
) -> None:
    root, ckpt, model_dir = hostile_model
    scans = tmp_path / "in"
    for i, name in enumerate(HOSTILE_FILE_NAMES):
        save_scan(scans / name, seed=i)
    undecodable = os.path.join(os.fsencode(scans), b"bad\xff\xfename_0000.nii.gz")
    shutil.copy(scans / "CON.nii.gz", os.fsdecode(undecodable))
    inputs = sorted(scans.iterdir())
    out = tmp_path / "a" / "b" / "c" / "out"  # three levels of ".." still land in the watched tree
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    watched = [tmp_path, root]
    before = [_tree(w) for w in watched]
    model = ckpt if model_kind == "checkpoint" else model_dir
    code, output = cli("segment", *inputs, "--model", model, "--out", out, "--device", "cpu", "--preview")
    assert code == 0, output
    for w, b in zip(watched, before, strict=True):
        assert _written_outside(b, _tree(w), out) == []
    assert not list(root.glob("abs_escape*"))

    written = os.listdir(os.fsencode(out))
    assert all(os.path.isfile(os.path.join(os.fsencode(out), n)) for n in written)  # no sub-folders
    for name in written:
        text = name.decode("utf-8")  # every output name is valid UTF-8, fits a file system, is not hidden
        assert len(name) <= 255 and not text.startswith(".")
        assert not any(ch in text for ch in '/\\<>:"|?*') and all(ch.isprintable() for ch in text)
    reports = {r["case"]: r for r in (json.loads(p.read_text()) for p in out.glob("*.json"))}
    assert len(reports) == len(inputs)
    expected = {c for c in HOSTILE_FILE_NAMES.values() if c is not None} | {"bad__name"}
    assert expected < set(reports)
    (long_case,) = set(reports) - expected
    assert len(long_case.encode()) == 200 and long_case.startswith("LLL")  # cut, with a hash of the full name
    for report in reports.values():
        assert set(report["outputs"]) == {"seg", "conf", "preview"}
        assert all((out / f).is_file() for f in report["outputs"].values())
        assert report["model"]["version"].endswith("/ ../../../evil_config.yaml")  # model strings stay in reports
        assert report["labels"][1]["name"] == "../../escape"
    assert "volume_ml_../../escape" in (out / "summary.csv").read_text()


def test_export_writes_only_inside_model_dir(
    hostile_model: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, ckpt, _ = hostile_model
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "a" / "b" / "model"
    before = [_tree(tmp_path), _tree(root)]
    code, output = cli("export", ckpt, "--out", out)
    assert code == 0, output
    assert _written_outside(before[0], _tree(tmp_path), out) == []
    assert _written_outside(before[1], _tree(root), out) == []
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = load_manifest(out)
    assert manifest.label_names[1] == "../../escape" and manifest.model_version.endswith("../../../evil_config.yaml")


def test_segment_subprocess_writes_only_inside_out_dir(hostile_model: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The console script in its own process (real argv, locale and signal handlers): the same guarantee."""
    root, _, model_dir = hostile_model
    scan = save_scan(tmp_path / "in" / "..%2f..%2fescape_0000.nii.gz")
    out = tmp_path / "x" / "y" / "out"
    before = [_tree(tmp_path), _tree(root)]
    script = "import sys; from confkd.cli.main import main; sys.argv[0] = 'confkd'; main()"
    cmd = [sys.executable, "-c", script, "segment", str(scan), "--model", str(model_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _written_outside(before[0], _tree(tmp_path), out) == []
    assert _written_outside(before[1], _tree(root), out) == []
    assert (out / "__%2f..%2fescape.json").is_file()
