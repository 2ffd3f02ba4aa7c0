"""Self-describing checkpoints: weights_only round trip, validation of foreign files, model rebuild, RNG states."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from confkd import errors
from confkd.config import Config, config_from_dict
from confkd.errors import ConfigError
from confkd.training.checkpoint import (
    FORMAT,
    CheckpointError,
    build_model_from_checkpoint,
    capture_rng_state,
    load_checkpoint,
    make_checkpoint,
    restore_rng_state,
    save_checkpoint,
    student_state_dict,
    unwrap_model,
)
from confkd.training.network import create_model


def _config(name: str = "dual_unet") -> Config:
    return config_from_dict(
        {
            "model": {"name": name, "width": 4, "depth": 2, "num_classes": 3},
            "preprocess": {"target_spacing": [1.25, 1.5], "pad_multiple": 8},
        }
    )


def _trained(config: Config) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = create_model(config.model, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # non-trivial optimizer state and BatchNorm statistics
        out = model(torch.randn(2, 1, 16, 16))
        (out.student.square().mean() + out.teacher.mean()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), opt


def _checkpoint(model: torch.nn.Module, config: Config, **train: object) -> dict[str, object]:
    return make_checkpoint(
        model,
        config,
        label_names=("background", "a", "b"),
        ignore_index=3,
        dataset_name="phantoms",
        dataset_fingerprint="f" * 64,
        strong_patients=("p1",),
        step=2,
        train_state=train or None,
    )


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    config = _config()
    model, opt = _trained(config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {
        "step": 2,
        "best_metric": None,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
        "ranks": [{"rng": capture_rng_state(), "sampler": {"generator": torch.Generator().get_state()}}],
    }
    path = save_checkpoint(_checkpoint(model, config, **state), tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)  # the contract: plain containers and tensors only
    assert raw["format"] == FORMAT
    ckpt = load_checkpoint(path)
    assert ckpt["config"] == config.to_dict()
    assert ckpt["preprocessing"]["target_spacing"] == [1.25, 1.5]
    assert ckpt["labels"] == {"names": ["background", "a", "b"], "ignore_index": 3}
    assert ckpt["dataset"]["fingerprint"] == "f" * 64 and ckpt["step"] == 2
    assert set(ckpt["versions"]) == {"confkd", "torch", "python"}
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    opt2 = torch.optim.Adam(create_model(config.model, 2).parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["train"]["optimizer"])
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("name", ["dual_unet", "unet"])
def test_rebuilt_model_gives_identical_outputs(tmp_path: Path, name: str) -> None:
    config = _config(name)
    model, _ = _trained(config)
    save_checkpoint(_checkpoint(model, config), tmp_path / "c.pt")
    rebuilt, cfg = build_model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert cfg == config and not rebuilt.training
    x = torch.randn(3, 1, 16, 24)
    with torch.no_grad():
        a, b = model(x), rebuilt(x)
    assert torch.equal(a.student, b.student) and torch.equal(a.teacher, b.teacher)


@pytest.mark.parametrize("name", ["dual_unet", "unet"])
def test_student_state_dict_is_the_deployable_student(tmp_path: Path, name: str) -> None:
    config = _config(name)
    model, _ = _trained(config)
    save_checkpoint(_checkpoint(model, config), tmp_path / "c.pt")
    fresh = create_model(config.model, 2)
    student = fresh.student_network()
    student.load_state_dict(student_state_dict(load_checkpoint(tmp_path / "c.pt")))  # strict: same keys
    student.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(student(x), model(x).student)


def test_wrappers_are_unwrapped(tmp_path: Path) -> None:
    config = _config()
    model, _ = _trained(config)
    wrapped = torch.nn.DataParallel(model)
    ckpt = _checkpoint(wrapped, config)
    assert unwrap_model(wrapped) is model
    assert set(ckpt["model"]) == set(model.state_dict())  # type: ignore[arg-type]


def test_unresolved_config_is_refused() -> None:
    config = config_from_dict({"model": {"width": 4, "depth": 2}})
    with pytest.raises(ConfigError, match="target_spacing"):
        _checkpoint(create_model(config.model, 2), config)


def test_corrupt_truncated_and_foreign_files_are_named(tmp_path: Path) -> None:
    config = _config()
    model, _ = _trained(config)
    good = save_checkpoint(_checkpoint(model, config), tmp_path / "good.pt")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    text = tmp_path / "text.pt"
    text.write_text("hello world\n")  # torch.load raises a bare KeyError on this
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "thing": np.arange(3)}, pickled)  # needs unpickling numpy: refused
    newer = tmp_path / "newer.pt"
    torch.save({**torch.load(good, weights_only=True), "format_version": 99}, newer)

    for path, message in [
        (truncated, "not a readable confkd checkpoint"),
        (garbage, "not a readable confkd checkpoint"),
        (text, "not a readable confkd checkpoint"),
        (foreign, "not a confkd checkpoint"),
        (pickled, "not a readable confkd checkpoint"),
        (newer, "format_version 99"),
        (tmp_path / "missing.pt", "no such checkpoint"),
    ]:
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


def test_checkpoint_error_is_the_general_model_file_error(tmp_path: Path) -> None:
    # moved to confkd.errors; the old import path still names the same class
    assert CheckpointError is errors.CheckpointError
    assert issubclass(CheckpointError, errors.ModelFileError)
    assert issubclass(errors.ModelFileError, errors.ConfKDError) and issubclass(errors.ModelFileError, ValueError)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(errors.ModelFileError, match=r"garbage\.pt"):
        load_checkpoint(garbage)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002 (the legacy global state is what the checkpoint captures)
    random.seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2]


def test_untrained_checkpoint_is_seeded_and_warms_batchnorm(tmp_path: Path) -> None:
    from confkd.training.checkpoint import save_untrained_checkpoint

    config = _config()
    names = ("background", "RV", "MYO", "LV")
    a = save_untrained_checkpoint(config, tmp_path / "a.pt", label_names=names, ignore_index=4, seed=3)
    b = save_untrained_checkpoint(config, tmp_path / "b.pt", label_names=names, ignore_index=4, seed=3)
    c = save_untrained_checkpoint(
        config, tmp_path / "c.pt", label_names=names, ignore_index=4, seed=3, warmup_shape=(2, 1, 32, 32)
    )
    sa, sb, sc = (load_checkpoint(p)["model"] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    means = [k for k in sa if k.endswith("running_mean")]
    assert means and all(torch.count_nonzero(sa[k]) == 0 for k in means)
    assert any(torch.count_nonzero(sc[k]) > 0 for k in means)
    model, _ = build_model_from_checkpoint(load_checkpoint(c))
    assert not model.training
