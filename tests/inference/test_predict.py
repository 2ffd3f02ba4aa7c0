"""Whole-volume prediction: probabilities on the input grid, and a known-answer test with a stub network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from confkd.config import PreprocessConfig
from confkd.data.phantoms import make_phantom
from confkd.data.preprocessing import preprocess, preprocess_label
from confkd.data.volume import Volume
from confkd.errors import GeometryError
from confkd.inference.predict import forward_probabilities, predict_volume, preprocess_image
from confkd.training.network import BranchOutputs, DualBranchUNet, UNet

NUM_CLASSES = 4


_PHANTOM = make_phantom(3, size=(40, 44), slices=5)


@pytest.fixture(scope="module")
def phantom() -> Volume:
    return Volume(_PHANTOM.image, _PHANTOM.affine, "nifti1")


@pytest.fixture(scope="module")
def label() -> np.ndarray:
    return _PHANTOM.label.astype(np.int64)


class _Replay(nn.Module):
    """Ignores its input and returns the next ``len(x)`` slices of fixed logits (a counter keeps the place)."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.offset = 0
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> BranchOutputs:
        n = x.shape[0]
        out = self.logits[self.offset : self.offset + n]
        assert out.shape[2:] == x.shape[2:], "the stub was replayed against another geometry"
        self.offset += n
        self.calls.append(n)
        return BranchOutputs(student=out, teacher=-out)


@pytest.mark.parametrize("cls", [DualBranchUNet, UNet])
def test_untrained_network_gives_probabilities_on_the_input_grid(phantom: Volume, cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls(1, NUM_CLASSES, spatial_dims=2, width=4, depth=2).eval()
    cfg = PreprocessConfig(pad_multiple=8, target_spacing=(1.1, 1.3))  # resampling both ways
    pred = predict_volume(model, phantom, cfg, batch_size=2)
    assert pred.student.shape == (NUM_CLASSES, *phantom.shape)
    assert pred.student.dtype == torch.float32
    torch.testing.assert_close(pred.student.sum(0), torch.ones(phantom.shape), atol=1e-5, rtol=0)
    assert (pred.student >= 0).all()
    assert pred.teacher is not None and pred.teacher.shape == pred.student.shape
    if cls is UNet:
        assert pred.teacher is pred.student  # one decoder: computed once
    else:
        assert not torch.equal(pred.teacher, pred.student)


def test_plain_network_has_no_teacher(phantom: Volume) -> None:
    student = DualBranchUNet(1, NUM_CLASSES, width=4, depth=2).student_network().eval()
    pred = predict_volume(student, phantom.array, PreprocessConfig(pad_multiple=8), spacing=phantom.spacing)
    assert pred.teacher is None
    assert pred.student.shape == (NUM_CLASSES, *phantom.shape)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_stub_one_hot_of_the_label_inverts_to_the_label_exactly(
    phantom: Volume, label: np.ndarray, batch_size: int
) -> None:
    cfg = PreprocessConfig(pad_multiple=16, slice_axis=0)  # native spacing (no resampling), padding, a transpose
    _, state = preprocess(phantom.array, phantom.spacing, cfg)
    assert any(p for pair in state.padding for p in pair)
    net_label = preprocess_label(label, state)  # [S, H', W']
    logits = 20.0 * F.one_hot(net_label, NUM_CLASSES).permute(0, 3, 1, 2).float()
    stub = _Replay(logits)
    pred = predict_volume(stub, phantom, cfg, batch_size=batch_size)
    assert stub.offset == net_label.shape[0] and max(stub.calls) <= batch_size
    assert np.array_equal(pred.student.argmax(0).numpy(), label)
    assert pred.teacher is not None
    assert not np.array_equal(pred.teacher.argmax(0).numpy(), label)  # the negated logits pick another class


def test_stub_with_resampling_agrees_with_the_label_except_at_edges(phantom: Volume, label: np.ndarray) -> None:
    cfg = PreprocessConfig(pad_multiple=16, target_spacing=(1.0, 1.0))
    _, state = preprocess(phantom.array, phantom.spacing, cfg)
    assert state.resampled_shape != state.native_shape
    logits = 20.0 * F.one_hot(preprocess_label(label, state), NUM_CLASSES).permute(0, 3, 1, 2).float()
    pred = predict_volume(_Replay(logits), phantom, cfg, batch_size=4)
    agreement = (pred.student.argmax(0).numpy() == label).mean()
    assert agreement > 0.97


def test_channels_are_normalised_separately_and_stacked(phantom: Volume) -> None:
    cfg = PreprocessConfig(pad_multiple=8)
    x, state = preprocess_image([phantom.array, phantom.array * 100.0 + 5.0], phantom.spacing, cfg)
    assert x.shape == (state.network_shape[0], 2, *state.network_shape[1:])
    torch.testing.assert_close(x[:, 0], x[:, 1], atol=1e-4, rtol=1e-4)  # z-scoring removes the affine change
    with pytest.raises(GeometryError, match="same shape"):
        preprocess_image([phantom.array, phantom.array[:-1]], phantom.spacing, cfg)


def test_three_dimensional_volume(phantom: Volume) -> None:
    model = DualBranchUNet(1, NUM_CLASSES, spatial_dims=3, width=2, depth=2).eval()
    cfg = PreprocessConfig(spatial_dims=3, pad_multiple=4)
    pred = predict_volume(model, phantom, cfg)
    assert pred.student.shape == (NUM_CLASSES, *phantom.shape)
    torch.testing.assert_close(pred.student.sum(0), torch.ones(phantom.shape), atol=1e-5, rtol=0)


def test_forward_probabilities_batches_slices() -> None:
    model = DualBranchUNet(1, 3, width=4, depth=2).eval()
    x = torch.randn(5, 1, 16, 16)
    whole = forward_probabilities(model, x, batch_size=5)
    parts = forward_probabilities(model, x, batch_size=2)
    for key in ("student", "teacher"):
        torch.testing.assert_close(whole[key], parts[key])
    with pytest.raises(ValueError, match="batch_size"):
        forward_probabilities(model, x, batch_size=0)


def test_array_input_needs_a_spacing(phantom: Volume) -> None:
    model = DualBranchUNet(1, NUM_CLASSES, width=4, depth=2).eval()
    with pytest.raises(GeometryError, match="spacing"):
        predict_volume(model, phantom.array, PreprocessConfig())
