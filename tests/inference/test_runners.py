"""The PyTorch runner: the student's softmax, the runner contract, and its settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from confkd.errors import ConfigError, ConfKDError, GeometryError
from confkd.inference.runners import Runner, RunnerError, TorchRunner
from confkd.training.network import DualBranchUNet

K = 3


@pytest.fixture(scope="module")
def network() -> DualBranchUNet:
    torch.manual_seed(0)
    model = DualBranchUNet(1, K, width=4, depth=2)
    model(torch.randn(4, 1, 16, 16))  # non-trivial BatchNorm running statistics
    return model.eval()


def _student(model: DualBranchUNet) -> nn.Module:
    student = DualBranchUNet(1, K, width=4, depth=2).student_network()
    student.load_state_dict(model.student_network().state_dict())
    return student.eval()


def test_output_is_the_students_softmax_exactly(network: DualBranchUNet) -> None:
    runner = TorchRunner(_student(network), device="cpu", channels_last=False)
    assert isinstance(runner, Runner)
    assert (runner.name, runner.spatial_dims, runner.in_channels, runner.num_classes, runner.divisor) == (
        "torch",
        2,
        1,
        K,
        4,
    )
    x = torch.randn(5, 1, 16, 24)
    with torch.no_grad():
        expected = torch.softmax(network(x).student, dim=1)
    out = runner(x)
    assert out.dtype == torch.float32 and out.device == torch.device("cpu") and not out.requires_grad
    assert out.is_contiguous()
    assert torch.equal(out, expected)


def test_channels_last_and_batch_splitting_agree(network: DualBranchUNet) -> None:
    x = torch.randn(7, 1, 16, 16)
    plain = TorchRunner(_student(network), device="cpu", channels_last=False)(x)
    fast = TorchRunner(_student(network), device="cpu", channels_last=True, max_batch=3)
    out = fast(x)
    assert out.is_contiguous()  # back to the standard layout the engine indexes
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_on_request_only(network: DualBranchUNet) -> None:
    assert TorchRunner(_student(network), device="cpu").amp is None  # auto: off on the CPU
    runner = TorchRunner(_student(network), device="cpu", amp="bf16")
    assert runner.amp == torch.bfloat16
    x = torch.randn(2, 1, 16, 16)
    out = runner(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.sum(1), torch.ones(2, 16, 16))
    reference = TorchRunner(_student(network), device="cpu", amp="off")(x)
    assert (out - reference).abs().max() < 0.1
    with pytest.raises(ConfigError, match="available options"):
        TorchRunner(_student(network), device="cpu", amp="fp8")  # type: ignore[arg-type]


def test_inputs_are_checked(network: DualBranchUNet) -> None:
    runner = TorchRunner(_student(network), device="cpu", max_tile=(32, 32))
    for bad, message in [
        (torch.randn(1, 16, 16), "expected"),
        (torch.randn(1, 2, 16, 16), "C=1"),
        (torch.randn(1, 1, 16, 18), "multiple of 4"),
        (torch.randn(1, 1, 16, 36), "exceeds max_tile"),
    ]:
        with pytest.raises(GeometryError, match=message):
            runner(bad)


def test_the_teacher_and_foreign_modules_are_refused(network: DualBranchUNet) -> None:
    with pytest.raises(RunnerError, match="student_network"):
        TorchRunner(network, device="cpu")
    with pytest.raises(RunnerError, match="lacks spatial_dims"):
        TorchRunner(nn.Conv2d(1, K, 3, padding=1), device="cpu")
    with pytest.raises(ConfigError, match="max_batch"):
        TorchRunner(_student(network), device="cpu", max_batch=0)
    with pytest.raises(ConfigError, match="max_tile"):
        TorchRunner(_student(network), device="cpu", max_tile=(2, 16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_cuda_is_a_clear_error(network: DualBranchUNet) -> None:
    with pytest.raises(ConfKDError, match="no GPU"):
        TorchRunner(_student(network), device="cuda")


@pytest.mark.gpu
def test_cuda_runner_matches_the_cpu(network: DualBranchUNet) -> None:
    x = torch.randn(6, 1, 32, 32)
    cpu = TorchRunner(_student(network), device="cpu", channels_last=False)(x)
    for amp in ("off", "auto"):
        runner = TorchRunner(_student(network), device="cuda", amp=amp)
        out = runner(x)  # a CPU input is moved by the runner
        assert out.device.type == "cuda" and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), cpu, atol=1e-4 if amp == "off" else 5e-2, rtol=0)
