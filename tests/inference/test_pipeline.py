"""The batch pipeline with the real engine and a small trained checkpoint: geometry, confidence, skip / overwrite,
failures, interruption, bounded read-ahead, summary."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from confkd.config import config_from_dict
from confkd.data.phantoms import make_phantom
from confkd.data.preprocessing import preprocess, preprocess_label
from confkd.data.volume import read_volume
from confkd.inference import engine
from confkd.inference.inputs import resolve_inputs
from confkd.inference.model import LoadedModel, load_model
from confkd.inference.outputs import FAILURES_FILE, SUMMARY_FILE
from confkd.inference.pipeline import BatchInterrupted, BatchResult, run_batch
from confkd.inference.predict import predict_volume
from confkd.training.checkpoint import build_model_from_checkpoint, load_checkpoint, make_checkpoint, save_checkpoint
from confkd.training.network import create_model

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def train_tiny_checkpoint(path: Path, steps: int = 100) -> Path:
    """A width-4 depth-2 dual U-Net trained for ``steps`` full-batch steps on 40x40 crops of 8 phantoms.

    Enough to segment phantoms recognisably (confidence well above chance), in a few seconds on 2 cores.
    """
    cfg = config_from_dict(
        {
            "model": {"width": 4, "depth": 2, "num_classes": 4},
            "preprocess": {"target_spacing": [1.5, 1.5], "pad_multiple": 8},
        }
    )
    torch.manual_seed(0)

    def crop(t: torch.Tensor, n: int = 40) -> torch.Tensor:
        t = F.pad(t, (0, max(0, n - t.shape[-1]), 0, max(0, n - t.shape[-2])))
        return t[..., :n, :n]

    xs, ys = [], []
    for seed in range(8):
        ph = make_phantom(1000 + seed, size=(48, 48), slices=4)
        x, state = preprocess(ph.image, ph.spacing, cfg.preprocess)
        xs.append(crop(x))
        ys.append(crop(preprocess_label(ph.label, state)))
    x, y = torch.cat(xs), torch.cat(ys)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and robust to a busy machine
    model = create_model(cfg.model, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    weight = torch.tensor([0.3, 1.0, 1.0, 1.0])
    for _ in range(steps):
        out = model(x)
        loss = F.cross_entropy(out.student, y, weight=weight) + F.cross_entropy(out.teacher, y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    ckpt = make_checkpoint(
        model.eval(),
        cfg,
        label_names=("background", "RV", "MYO", "LV"),
        ignore_index=4,
        dataset_name="phantoms",
        dataset_fingerprint="0" * 64,
        step=steps,
    )
    return save_checkpoint(ckpt, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> LoadedModel:
    return load_model(checkpoint, device="cpu")


def save_phantom(path: Path, seed: int, size: tuple[int, int] = (48, 48), slices: int = 4) -> Path:
    ph = make_phantom(seed, size=size, slices=slices)
    img = nib.Nifti1Image(ph.image, ph.affine)
    img.header.set_qform(ph.affine, code=1)
    img.header.set_sform(ph.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


@pytest.fixture
def phantoms(tmp_path: Path) -> list[Path]:
    return [save_phantom(tmp_path / "in" / f"ph{i}_0000.nii.gz", 2000 + i) for i in range(4)]


def run(paths: list[Path] | list[str], out: Path, model: LoadedModel, **kwargs: Any) -> BatchResult:
    return run_batch(resolve_inputs(paths), out, model, **kwargs)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def assert_no_temporary_files(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------- geometry


def _affine(euler: tuple[float, float, float], spacing: tuple[float, float, float], origin: tuple[float, ...]):
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", euler, degrees=True).as_matrix() @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _nifti_inputs(folder: Path) -> list[Path]:
    """Real headers from nibabel's sample files (cropped, geometry kept) plus synthetic oblique / LPS ones."""
    rng = np.random.default_rng(0)
    paths = []
    for name, crop in (
        ("anatomical.nii", (slice(4, 28), slice(6, 34), slice(8, 14))),  # big-endian, qform = sform code 2
        ("example_nifti2.nii.gz", (slice(0, 24), slice(0, 20), slice(2, 8), slice(None))),  # NIfTI-2, 4D
        ("standard.nii.gz", None),  # qform code 0, sform code 2, anisotropic (1, 3, 2)
    ):
        img = nib.load(NIBABEL_DATA / name)
        codes = int(img.header["qform_code"]), int(img.header["sform_code"])
        if crop is not None:
            img = img.slicer[crop]  # keeps the geometry: the affine moves with the crop
            if codes[0]:
                img.header.set_qform(img.affine, code=codes[0])
        out = folder / name
        nib.save(img, out)
        paths.append(out)
    data = rng.normal(100, 20, size=(20, 24, 5)).astype(np.float32)
    for name, q, s, qcode, scode in (
        ("oblique_q_ne_s.nii.gz", _affine((15, -25, 40), (0.9, 1.1, 6), (-80, 12, 40)),
         _affine((-5, 30, 10), (0.9, 1.1, 6), (50, -60, 70)), 1, 2),
        ("lps_aniso.nii", _affine((0, 0, 180), (1.25, 1.25, 8.0), (10, 20, 5)), None, 1, 0),
    ):  # fmt: skip
        hdr = nib.Nifti1Header()
        hdr.set_data_shape(data.shape)
        hdr.set_data_dtype(np.float32)
        hdr.set_qform(q, code=qcode)
        hdr.set_sform(s if s is not None else q, code=scode)
        nib.save(nib.Nifti1Image(data, None, header=hdr), folder / name)
        paths.append(folder / name)
    return paths


def _sitk_inputs(folder: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    direction = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix()
    paths = []
    for name in ("oblique_n.nrrd", "oblique_m.mha", "detached_n.nhdr", "detached_m.mhd"):
        image = sitk.GetImageFromArray(rng.normal(100, 20, size=(5, 22, 20)).astype(np.float32))
        image.SetSpacing((0.8, 1.2, 7.5))
        image.SetOrigin((-101.3, 22.7, 35.1))
        image.SetDirection(tuple(direction.ravel()))
        sitk.WriteImage(image, str(folder / name))
        paths.append(folder / name)
    return paths


def test_outputs_have_the_input_geometry(tmp_path: Path, model: LoadedModel) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    nifti, itk = _nifti_inputs(inputs), _sitk_inputs(inputs)
    out = tmp_path / "out"
    result = run([inputs], out, model)
    assert result.failed == [] and len(result.ok) == len(nifti) + len(itk)

    for path in nifti:
        ref = nib.load(path)
        case = path.name.split(".")[0]
        suffix = ".nii" if path.name.endswith(".nii") else ".nii.gz"
        for kind in ("seg", "conf"):
            got = nib.load(out / f"{case}_{kind}{suffix}")
            assert type(got) is type(ref) and got.shape == ref.shape, path.name
            np.testing.assert_array_equal(got.affine, ref.affine)
            for getter in ("get_qform", "get_sform"):
                m_got, c_got = getattr(got.header, getter)(coded=True)
                m_ref, c_ref = getattr(ref.header, getter)(coded=True)
                assert int(c_got) == int(c_ref), (path.name, getter)
                if m_ref is not None:
                    np.testing.assert_array_equal(m_got, m_ref)
            np.testing.assert_array_equal(got.header["pixdim"], ref.header["pixdim"])
        report = json.loads((out / f"{case}.json").read_text())
        assert report["shape"] == list(ref.shape)
        np.testing.assert_array_equal(np.array(report["affine"]), ref.affine)

    for path in itk:
        ref = sitk.ReadImage(str(path))
        stem, suffix = path.stem, {".nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha", ".mhd": ".mha"}[path.suffix]
        for kind in ("seg", "conf"):
            got = sitk.ReadImage(str(out / f"{stem}_{kind}{suffix}"))
            assert got.GetSize() == ref.GetSize()
            assert got.GetSpacing() == ref.GetSpacing()  # bit for bit
            assert got.GetOrigin() == ref.GetOrigin()
            assert got.GetDirection() == ref.GetDirection()
    assert_no_temporary_files(out)


def test_dicom_series_gives_nifti_in_its_geometry(tmp_path: Path, model: LoadedModel) -> None:
    folder = tmp_path / "SER7"
    folder.mkdir()
    direction = Rotation.from_euler("xyz", [10, 0, 25], degrees=True).as_matrix()
    volume = sitk.GetImageFromArray(np.random.default_rng(2).integers(0, 800, (4, 24, 20)).astype(np.int16))
    volume.SetSpacing((1.3, 1.3, 6.0))
    volume.SetOrigin((-50.0, 20.0, 10.0))
    volume.SetDirection(tuple(direction.ravel()))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = volume.GetDirection()
    for k in range(4):
        s = volume[:, :, k]
        s.SetMetaData("0020|000d", "1.2.3.4")
        s.SetMetaData("0020|000e", "1.2.3.4.5")
        s.SetMetaData("0008|0018", f"1.2.3.4.5.{k}")
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])))
        s.SetMetaData("0020|0032", "\\".join(str(v) for v in volume.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(s)
    out = tmp_path / "out"
    result = run([folder], out, model)
    assert [o.case for o in result.ok] == ["SER7"]
    ref = read_volume(folder)
    seg = nib.load(out / "SER7_seg.nii.gz")
    assert seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-4)  # NIfTI-1 stores the sform in float32
    assert int(seg.header["qform_code"]) == 1 and int(seg.header["sform_code"]) == 1


# ---------------------------------------------------------------------------------------------- confidence


def test_confidence_is_normalised_entropy_stored_as_uint8(
    tmp_path: Path, phantoms: list[Path], model: LoadedModel, checkpoint: Path
) -> None:
    out = tmp_path / "out"
    run(phantoms[:1], out, model)
    conf_img = nib.load(out / "ph0_conf.nii.gz")
    assert conf_img.get_data_dtype() == np.uint8  # compact on disk
    conf = read_volume(out / "ph0_conf.nii.gz").array
    assert conf.dtype.kind == "f" and conf.min() >= 0.0 and conf.max() <= 1.0

    # the definition, from the reference predictor's probabilities on the input grid: 1 - H(p) / log K
    net, cfg = build_model_from_checkpoint(load_checkpoint(checkpoint))
    probs = predict_volume(net, read_volume(phantoms[0]), cfg.preprocess).student.numpy().astype(np.float64)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=0)
    expected = 1.0 - entropy / np.log(probs.shape[0])
    np.testing.assert_allclose(conf, expected, atol=1 / 510 + 1e-4)
    labels = read_volume(out / "ph0_seg.nii.gz").array
    assert np.mean(labels == probs.argmax(axis=0)) > 0.999

    report = json.loads((out / "ph0.json").read_text())
    mask = labels > 0
    assert report["foreground"]["voxels"] == int(mask.sum()) > 0
    assert report["foreground"]["mean_confidence"] == pytest.approx(float(conf[mask].mean()), abs=1 / 510)
    assert report["low_confidence"]["fraction"] == pytest.approx(float(np.mean(conf < 0.5)), abs=0.02)
    assert report["foreground"]["mean_confidence"] > 0.2, "the trained model is confident on the foreground"


# ---------------------------------------------------------------------------------------------- skip / overwrite


def test_complete_cases_are_skipped_and_overwrite_redoes_them(
    tmp_path: Path, phantoms: list[Path], model: LoadedModel
) -> None:
    out = tmp_path / "out"
    first = run(phantoms, out, model, preview=True)
    assert len(first.ok) == 4 and (out / "ph0_preview.png").is_file()
    before = mtimes(out)
    seg_bytes = (out / "ph1_seg.nii.gz").read_bytes()

    again = run(phantoms, out, model, preview=True)
    assert len(again.skipped) == 4 and again.ok == []
    assert {k: v for k, v in mtimes(out).items() if k != SUMMARY_FILE} == {
        k: v for k, v in before.items() if k != SUMMARY_FILE
    }

    (out / "ph2_conf.nii.gz").unlink()  # incomplete: redone alone
    (out / "ph3.json").write_text("{ truncated")  # unparsable report: redone
    partial = run(phantoms, out, model, preview=True)
    assert sorted(o.case for o in partial.ok) == ["ph2", "ph3"] and len(partial.skipped) == 2
    assert mtimes(out)["ph0_seg.nii.gz"] == before["ph0_seg.nii.gz"]

    no_preview_yet = tmp_path / "out2"
    run(phantoms[:1], no_preview_yet, model)
    assert len(run(phantoms[:1], no_preview_yet, model, preview=True).ok) == 1  # preview asked: not complete

    forced = run(phantoms, out, model, preview=True, overwrite=True)
    assert len(forced.ok) == 4 and forced.skipped == []
    after = mtimes(out)
    assert all(after[name] > before[name] for name in before if name.startswith("ph"))
    assert (out / "ph1_seg.nii.gz").read_bytes() == seg_bytes  # deterministic: same labels again
    assert_no_temporary_files(out)


# ---------------------------------------------------------------------------------------------- failures


def test_a_corrupt_file_fails_alone_and_is_retried(tmp_path: Path, phantoms: list[Path], model: LoadedModel) -> None:
    bad = tmp_path / "in" / "bad_0000.nii.gz"
    bad.write_bytes(phantoms[0].read_bytes()[:200])  # truncated gzip
    out = tmp_path / "out"
    result = run([*phantoms, bad], out, model)
    assert sorted(o.case for o in result.ok) == ["ph0", "ph1", "ph2", "ph3"]
    (failure,) = result.failed
    assert failure.case == "bad" and failure.stage == "read" and failure.error_type == "VolumeReadError"
    assert "\n" not in (failure.message or "") and str(bad) in (failure.message or "")
    lines = (out / FAILURES_FILE).read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["case"] == "bad" and record["input"] == str(bad) and record["stage"] == "read"
    assert record["run_id"] == result.run_id and record["time"].endswith("Z")
    assert not [p for p in out.iterdir() if p.name.startswith("bad")]  # nothing partial for it
    assert_no_temporary_files(out)
    with open(out / SUMMARY_FILE, newline="") as f:
        status = {r["case"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"bad": "failed", "ph0": "ok", "ph1": "ok", "ph2": "ok", "ph3": "ok"}

    save_phantom(bad, 77)  # fixed: the next run retries it (and only it)
    retry = run([*phantoms, bad], out, model)
    assert [o.case for o in retry.ok] == ["bad"] and len(retry.skipped) == 4
    assert len((out / FAILURES_FILE).read_text().splitlines()) == 1  # history kept, nothing new
    with open(out / SUMMARY_FILE, newline="") as f:
        assert {r["case"]: r["status"] for r in csv.DictReader(f)}["bad"] == "ok"


def test_unexpected_errors_are_caught_per_case(
    tmp_path: Path, phantoms: list[Path], model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_infer = engine.infer

    def flaky(prepared: engine.PreparedVolume, m: LoadedModel, **kw: Any) -> engine.SegmentationResult:
        if prepared.path is not None and prepared.path.name.startswith("ph1"):
            raise ZeroDivisionError("boom")
        return real_infer(prepared, m, **kw)

    monkeypatch.setattr(engine, "infer", flaky)
    result = run(phantoms, tmp_path / "out", model)
    (failure,) = result.failed
    assert (failure.case, failure.stage, failure.message) == ("ph1", "infer", "ZeroDivisionError: boom")
    assert len(result.ok) == 3


def test_a_failed_write_leaves_the_previous_outputs_whole(
    tmp_path: Path, phantoms: list[Path], model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    run(phantoms[:2], out, model)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("ph0")}
    from confkd.data import volume as volume_module

    real_write = volume_module.write_volume

    def disk_full(array: np.ndarray, reference: Any, path: Path, **kw: Any) -> Path:
        if "ph0_conf" in Path(path).name:
            raise volume_module.VolumeWriteError(f"{path}: cannot write ([Errno 28] No space left on device)")
        return real_write(array, reference, path, **kw)

    monkeypatch.setattr(volume_module, "write_volume", disk_full)
    result = run(phantoms[:2], out, model, overwrite=True)
    (failure,) = result.failed
    assert failure.case == "ph0" and failure.stage == "write" and "No space left" in (failure.message or "")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("ph0")} == before
    assert_no_temporary_files(out)


def test_input_problems_are_failed_cases(tmp_path: Path, phantoms: list[Path], model: LoadedModel) -> None:
    twin = save_phantom(tmp_path / "other" / "ph0.nii.gz", 5)  # same case name as ph0_0000.nii.gz
    result = run([*phantoms, twin, tmp_path / "missing.nii.gz"], tmp_path / "out", model)
    assert sorted((o.case, o.stage) for o in result.failed) == [
        ("missing", "input"),
        ("ph0", "input"),
        ("ph0", "input"),
    ]
    assert sorted(o.case for o in result.ok) == ["ph1", "ph2", "ph3"]
    assert not (tmp_path / "out" / "ph0_seg.nii.gz").exists()


# ---------------------------------------------------------------------------------------------- pipeline


def test_read_ahead_is_bounded(tmp_path: Path, model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [save_phantom(tmp_path / "in" / f"c{i}.nii.gz", 3000 + i, slices=3) for i in range(8)]
    prepared: list[str] = []
    ahead: list[int] = []
    real_prepare, real_infer = engine.prepare, engine.infer

    def counting_prepare(volume: Any, m: LoadedModel, **kw: Any) -> engine.PreparedVolume:
        prepared.append(str(volume.path))
        return real_prepare(volume, m, **kw)

    def slow_infer(p: engine.PreparedVolume, m: LoadedModel, **kw: Any) -> engine.SegmentationResult:
        import time

        time.sleep(0.05)  # readers are much faster than this: they must wait for the queue
        ahead.append(len(prepared) - len(ahead))
        return real_infer(p, m, **kw)

    monkeypatch.setattr(engine, "prepare", counting_prepare)
    monkeypatch.setattr(engine, "infer", slow_infer)
    result = run(paths, tmp_path / "out", model, prefetch=2)
    assert len(result.ok) == 8
    # when a case is inferred: itself, at most `prefetch` queued, and one in the reader's hands
    assert max(ahead) <= 1 + 2 + 1, ahead


def test_4d_input_gives_4d_outputs(tmp_path: Path, model: LoadedModel) -> None:
    frames = [make_phantom(40 + t, size=(40, 40), slices=3) for t in range(3)]
    data = np.stack([f.image for f in frames], axis=-1)
    nib.save(nib.Nifti1Image(data, frames[0].affine), tmp_path / "cine.nii.gz")
    out = tmp_path / "out"
    result = run([tmp_path / "cine.nii.gz"], out, model)
    assert len(result.ok) == 1
    assert nib.load(out / "cine_seg.nii.gz").shape == data.shape
    report = json.loads((out / "cine.json").read_text())
    assert len(report["frame_volumes_ml"]) == 3


def test_sigint_stops_after_the_current_case(
    tmp_path: Path, phantoms: list[Path], model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_infer = engine.infer
    calls = []

    def interrupting(p: engine.PreparedVolume, m: LoadedModel, **kw: Any) -> engine.SegmentationResult:
        calls.append(p.path)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while this case is in flight
        return real_infer(p, m, **kw)

    monkeypatch.setattr(engine, "infer", interrupting)
    previous = signal.getsignal(signal.SIGINT)
    out = tmp_path / "out"
    with pytest.raises(BatchInterrupted) as info:
        run(phantoms, out, model)
    assert info.value.signal_name == "SIGINT" and info.value.result.interrupted
    assert len(info.value.result.ok) == 2  # the case in flight was finished, nothing new was started
    assert len(calls) == 2
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert_no_temporary_files(out)
    assert (out / SUMMARY_FILE).is_file()

    monkeypatch.setattr(engine, "infer", real_infer)
    done = mtimes(out)
    rest = run(phantoms, out, model)
    assert len(rest.ok) == 2 and len(rest.skipped) == 2
    assert all(mtimes(out)[n] == t for n, t in done.items() if n.endswith((".nii.gz", ".json")))


def test_summary_covers_earlier_runs_and_shards(tmp_path: Path, phantoms: list[Path], model: LoadedModel) -> None:
    out = tmp_path / "out"
    resolved = resolve_inputs(phantoms)
    for i in range(3):
        run_batch(resolved.shard(i, 3), out, model)
    with open(out / SUMMARY_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["ph0", "ph1", "ph2", "ph3"]
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:
        report = json.loads((out / f"{row['case']}.json").read_text())
        assert float(row["foreground_confidence"]) == pytest.approx(report["foreground"]["mean_confidence"])
        assert float(row["volume_ml_LV"]) == pytest.approx(report["labels"][3]["volume_ml"])
        assert row["flagged"] == ("yes" if report["flagged"] else "no")


def test_bad_arguments(tmp_path: Path, model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="low_confidence"):
        run_batch([], tmp_path, model, low_confidence=0.0)
    with pytest.raises(ValueError, match="prefetch"):
        run_batch([], tmp_path, model, prefetch=0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    from confkd.inference.outputs import OutputDirError

    with pytest.raises(OutputDirError, match="cannot write the output folder"):
        run_batch([], blocker / "out", model)


def test_a_second_sigint_cuts_the_inference_short(
    tmp_path: Path, phantoms: list[Path], model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_infer = engine.infer
    calls = []

    def impatient(p: engine.PreparedVolume, m: LoadedModel, **kw: Any) -> engine.SegmentationResult:
        calls.append(p.path)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the user insists: this inference is abandoned
        return real_infer(p, m, **kw)

    monkeypatch.setattr(engine, "infer", impatient)
    out = tmp_path / "out"
    with pytest.raises(BatchInterrupted) as info:
        run(phantoms, out, model)
    assert [o.case for o in info.value.result.ok] == ["ph0"]
    assert sorted(p.name for p in out.glob("*.json")) == ["ph0.json"]
    assert not list(out.glob("ph1*")) and not list(out.glob(".*"))


def test_an_ignored_sigint_stays_ignored(
    tmp_path: Path, phantoms: list[Path], model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_infer = engine.infer

    def poke(p: engine.PreparedVolume, m: LoadedModel, **kw: Any) -> engine.SegmentationResult:
        os.kill(os.getpid(), signal.SIGINT)
        return real_infer(p, m, **kw)

    monkeypatch.setattr(engine, "infer", poke)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a shell's background job, or nohup
    try:
        result = run(phantoms[:2], tmp_path / "out", model)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(result.ok) == 2 and not result.interrupted
