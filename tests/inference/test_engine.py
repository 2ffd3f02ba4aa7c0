"""The shared inference path, against stub runners with exactly known output (torchio's inference tests).

Every stub computes its probabilities from the voxel intensities it is given, so the expected labels and
confidence follow by hand; the engine has to get geometry, tiling, TTA and the inverse right to match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from torch import Tensor, nn

from confkd.config import Config, ModelConfig, PreprocessConfig, TrainConfig
from confkd.data.phantoms import make_phantom
from confkd.data.preprocessing import invert, invert_chunks, preprocess
from confkd.data.volume import Volume
from confkd.errors import GeometryError
from confkd.inference import engine
from confkd.inference.engine import (
    InferenceError,
    PreparedVolume,
    SegmentationResult,
    argmax_lowest,
    infer,
    labels_and_confidence,
    network_probabilities,
    prepare,
    segment_volume,
)
from confkd.inference.model import LoadedModel
from confkd.inference.predict import predict_volume, preprocess_image
from confkd.inference.runners import Runner, TorchRunner, check_runner_input
from confkd.inference.tiling import gaussian_importance, plan_tiles, run_windows
from confkd.training.network import DualBranchUNet

K = 4
Logits = Callable[[Tensor], Tensor]


class StubRunner:
    """A :class:`Runner` whose probabilities are ``softmax(logits(x))``; it enforces the runner contract."""

    name = "stub"

    def __init__(
        self,
        logits: Logits,
        *,
        spatial_dims: int = 2,
        divisor: int = 8,
        max_tile: tuple[int, ...] | None = None,
        max_batch: int = 32,
    ) -> None:
        self.logits = logits
        self.device = torch.device("cpu")
        self.spatial_dims = spatial_dims
        self.in_channels = 1
        self.num_classes = K
        self.divisor = divisor
        self.max_tile = max_tile
        self.max_batch = max_batch
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: Tensor) -> Tensor:
        check_runner_input(self, x)
        assert x.shape[0] <= self.max_batch
        self.calls.append(tuple(x.shape))
        return torch.softmax(self.logits(x), dim=1)

    @property
    def tiles(self) -> int:
        return sum(c[0] for c in self.calls)


def nearest_class(x: Tensor) -> Tensor:
    """Per voxel: the class whose value is nearest the intensity (translation- and flip-equivariant)."""
    centres = torch.arange(K, dtype=torch.float32).view(1, K, *([1] * (x.dim() - 2)))
    return -4.0 * (x - centres) ** 2


def with_position(x: Tensor) -> Tensor:
    """Depends on where a voxel is in the slice (not flip-equivariant)."""
    h = torch.linspace(-1.0, 1.0, x.shape[2]).view(1, 1, -1, 1)
    w = torch.linspace(0.0, 2.0, x.shape[3]).view(1, 1, 1, -1)
    ks = torch.arange(K, dtype=torch.float32).view(1, K, 1, 1)
    return ks * (x + h) - ks**2 * w


def fake_model(
    runner: Runner, preprocess_cfg: PreprocessConfig, patch_size: tuple[int, ...] | None = None
) -> LoadedModel:
    config = Config(
        preprocess=preprocess_cfg,
        model=ModelConfig(num_classes=K),
        train=TrainConfig(patch_size=patch_size),
    )
    names = {i: f"class{i}" for i in range(K)}
    return LoadedModel(runner, config, names, "0" * 64, "stub", Path("stub.pt"))


def oblique_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    angle = np.radians(20.0)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    return affine


def blocks(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth K-class label map (argmax of smoothed noise), so that boundaries are a small fraction."""
    rng = np.random.default_rng(seed)
    sigma = tuple(max(1.0, n / 6) for n in shape)
    fields = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), sigma) for _ in range(K)])
    return fields.argmax(0).astype(np.uint8)


# known answer: intensities = class + noise, no intensity normalisation, so the network sees the classes
RAW = PreprocessConfig(normalization="none", clip_percentiles=(0.0, 100.0), pad_multiple=16)
SPACING = (4.5, 0.9, 1.3)  # slice axis 0: the network sees the volume transposed


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return blocks((7, 37, 29))


@pytest.fixture(scope="module")
def volume(truth: np.ndarray) -> Volume:
    noise = np.random.default_rng(1).uniform(-0.3, 0.3, truth.shape)
    return Volume((truth + noise).astype(np.float32), oblique_affine(SPACING), "nifti1")


def margin_mask(probs: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Voxels whose top two probabilities differ by more than ``eps`` (the argmax is not a near-tie)."""
    top = np.sort(probs, axis=0)
    return (top[-1] - top[-2]) > eps


def numpy_confidence(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probs > 0, probs * np.log(probs), 0.0)
    return 1.0 + plogp.sum(0) / math.log(probs.shape[0])


# ------------------------------------------------------------------------------------------- known answers
def test_labels_equal_the_truth_without_resampling(volume: Volume, truth: np.ndarray) -> None:
    runner = StubRunner(nearest_class, max_batch=3)
    result = segment_volume(volume, fake_model(runner, RAW))
    assert isinstance(result, SegmentationResult)
    assert result.labels.shape == volume.shape == (7, 37, 29)
    assert result.labels.dtype == np.uint8 and result.confidence.dtype == np.float32
    assert np.array_equal(result.labels, truth)
    # slices along axis 0 (largest spacing), padded to 48 x 32, at most max_batch per call
    assert runner.calls == [(3, 1, 48, 32), (3, 1, 48, 32), (1, 1, 48, 32)]
    assert set(result.timings) == {"preprocess", "infer", "postprocess"}
    assert all(v >= 0 for v in result.timings.values())


def test_labels_agree_with_the_truth_with_resampling() -> None:
    # bigger than the fixture: the image is interpolated before the stub sees it, so boundaries between
    # classes 0 and 2 pass through 1 (a one-voxel ghost); 99 % needs the boundaries to be a small fraction
    truth = blocks((5, 96, 80), seed=2)
    noise = np.random.default_rng(3).uniform(-0.3, 0.3, truth.shape)
    volume = Volume((truth + noise).astype(np.float32), oblique_affine(SPACING), "nifti1")
    cfg = PreprocessConfig(
        normalization="none", clip_percentiles=(0.0, 100.0), pad_multiple=16, target_spacing=(0.7, 1.6)
    )
    model = fake_model(StubRunner(nearest_class), cfg)
    state = prepare(volume, model).states[0]
    assert state.resampled_shape == (123, 65) != state.native_shape
    result = segment_volume(volume, model)
    assert result.labels.shape == truth.shape
    assert (result.labels == truth).mean() >= 0.99


@pytest.mark.parametrize("max_tile", [None, (32, 24)])
@pytest.mark.parametrize("tta", [False, True])
def test_streaming_in_groups_of_slices_changes_nothing(
    volume: Volume, max_tile: tuple[int, int] | None, tta: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = PreprocessConfig(pad_multiple=16, target_spacing=(0.7, 1.6))
    whole = StubRunner(with_position, max_tile=max_tile, max_batch=3)
    expected = segment_volume(volume, fake_model(whole, cfg), tta=tta)
    monkeypatch.setattr(engine, "GROUP_BYTES", 1)  # one batch-aligned run of slices per group
    monkeypatch.setattr(engine, "STREAM_BYTES", 0)  # and preprocessed group by group inside infer
    streamed = StubRunner(with_position, max_tile=max_tile, max_batch=3)
    model = fake_model(streamed, cfg)
    prepared = prepare(volume, model)
    assert prepared.images == [None] and engine.group_slices(prepared.states[0], model, 7) < 7
    result = infer(prepared, model, tta=tta)
    assert streamed.calls == whole.calls  # the same batches, so the same values
    assert np.array_equal(result.labels, expected.labels)
    assert np.array_equal(result.confidence, expected.confidence)


# ------------------------------------------------------------------------------------------ sliding window
def test_tiled_equals_untiled_and_tiles_are_counted(volume: Volume) -> None:
    whole, tiled = StubRunner(nearest_class), StubRunner(nearest_class, max_tile=(32, 24), max_batch=5)
    image, state = preprocess_image([volume.array], volume.spacing, RAW)
    assert tuple(image.shape) == (7, 1, 48, 32)
    a = network_probabilities(image, fake_model(whole, RAW), pad_value=state.pad_value)
    b = network_probabilities(image, fake_model(tiled, RAW), pad_value=state.pad_value)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    # 48 -> tiles of 32 at (0, 16); 32 -> tiles of 24 at (0, 8): 4 tiles per slice, batches of 5
    assert tiled.tiles == 7 * 4 and max(c[0] for c in tiled.calls) == 5
    assert {c[2:] for c in tiled.calls} == {(32, 24)}
    same = segment_volume(volume, fake_model(StubRunner(nearest_class, max_tile=(32, 24)), RAW))
    assert np.array_equal(same.labels, segment_volume(volume, fake_model(whole, RAW)).labels)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 300),
    tile_blocks=st.integers(1, 12),
    divisor=st.sampled_from([1, 8, 16]),
    overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
)
def test_tiles_cover_every_voxel_with_the_overlap(size: int, tile_blocks: int, divisor: int, overlap: float) -> None:
    plan = plan_tiles((size,), divisor=divisor, max_tile=(tile_blocks * divisor,), overlap=overlap)
    (tile,) = plan.tile
    (padded,) = plan.padded
    assert tile % divisor == 0 and tile <= tile_blocks * divisor and padded >= size
    covered = np.zeros(padded, dtype=int)
    for (w,) in plan.windows:
        assert w.start >= 0 and w.stop <= padded
        covered[w] += 1
    assert covered.min() >= 1
    starts = plan.starts[0]
    assert starts[0] == 0 and starts[-1] == padded - tile
    steps = np.diff(starts)
    assert (steps <= tile * (1 - overlap) + 1).all()  # +1: starts are rounded to whole voxels


def test_gaussian_importance_is_the_nnunet_gaussian() -> None:
    w = gaussian_importance((16, 24))
    assert w.shape == (16, 24) and float(w.max()) == pytest.approx(1.0)
    # separable, centred at (7.5, 11.5), sigma = tile / 8
    g = lambda i, n: math.exp(-0.5 * ((i - (n - 1) / 2) / (n / 8)) ** 2)  # noqa: E731
    expected = g(3, 16) * g(20, 24) / (g(7, 16) * g(11, 24))
    assert float(w[3, 20]) == pytest.approx(expected, rel=1e-5)
    assert float(w.min()) > 0


def test_blending_is_the_gaussian_weighted_average_of_overlapping_tiles() -> None:
    calls = iter(range(100))

    def per_call(x: Tensor) -> Tensor:  # every tile of a call sees one constant distribution: 1-hot of call % K
        logits = torch.full((x.shape[0], K, *x.shape[2:]), -1e4)
        logits[:, next(calls) % K] = 0.0
        return logits

    runner = StubRunner(per_call, divisor=4, max_tile=(8, 8), max_batch=1)
    plan = plan_tiles((8, 12), divisor=4, max_tile=(8, 8), overlap=0.5)
    assert plan.windows == [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(4, 12))]
    out = torch.empty(1, K, 8, 12)
    assert run_windows(torch.zeros(1, 1, 8, 12), runner, plan, out=out, batch_size=1) == 2
    g = gaussian_importance((8, 8))
    # columns 4..7 are covered by tile 0 (class 0) at its columns 4..7 and tile 1 (class 1) at its columns 0..3
    w0, w1 = g[:, 4:], g[:, :4]
    torch.testing.assert_close(out[0, 0, :, 4:8], w0 / (w0 + w1))
    torch.testing.assert_close(out[0, 1, :, 4:8], w1 / (w0 + w1))
    assert torch.equal(out[0, 0, :, :4], torch.ones(8, 4)) and torch.equal(out[0, 1, :, 8:], torch.ones(8, 4))


def test_three_dimensional_model_is_tiled_with_the_patch_size(volume: Volume) -> None:
    cfg = PreprocessConfig(
        spatial_dims=3, normalization="none", clip_percentiles=(0.0, 100.0), pad_multiple=8, slice_axis=2
    )
    whole = StubRunner(nearest_class, spatial_dims=3, divisor=4)
    tiled = StubRunner(nearest_class, spatial_dims=3, divisor=4, max_batch=4)
    model = fake_model(tiled, cfg, patch_size=(8, 16, 16))
    a = segment_volume(volume, fake_model(whole, cfg))
    b = segment_volume(volume, model)
    assert whole.calls == [(1, 1, 32, 8, 40)]  # slice axis k first: (29, 7, 37) padded to multiples of 8
    assert {c[2:] for c in tiled.calls} == {(8, 8, 16)}  # the patch, capped by the volume's 8
    assert tiled.tiles == 7 * 1 * 4  # starts (0, 4, .., 24) x (0,) x (0, 8, 16, 24)
    assert np.array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-5)


# --------------------------------------------------------------------------------------------------- TTA
def test_tta_with_a_flip_equivariant_stub_changes_nothing(volume: Volume) -> None:
    runner = StubRunner(nearest_class)
    plain = segment_volume(volume, fake_model(runner, RAW))
    n_plain = len(runner.calls)
    tta = segment_volume(volume, fake_model(runner, RAW), tta=True)
    assert len(runner.calls) - n_plain == 4 * n_plain
    assert np.array_equal(plain.labels, tta.labels)
    np.testing.assert_allclose(tta.confidence, plain.confidence, atol=1e-6)


def test_tta_averages_the_four_flipped_passes(volume: Volume) -> None:
    cfg = PreprocessConfig(pad_multiple=16, target_spacing=(0.8, 1.2))  # z-scored, resampled
    model = fake_model(StubRunner(with_position), cfg)
    plain = segment_volume(volume, model)
    tta = segment_volume(volume, model, tta=True)
    assert np.abs(tta.confidence - plain.confidence).max() > 1e-2  # the stub is not flip-equivariant

    x, state = preprocess_image([volume.array], volume.spacing, cfg)
    passes = [torch.softmax(with_position(x.flip(d)), 1).flip(d) for d in [(), (2,), (3,), (2, 3)]]
    probs = invert(sum(passes) / 4, state).double().numpy()  # type: ignore[arg-type]
    ok = margin_mask(probs)
    assert ok.mean() > 0.99
    assert np.array_equal(tta.labels[ok], probs.argmax(0)[ok])
    np.testing.assert_allclose(tta.confidence, numpy_confidence(probs), atol=1e-5)


# -------------------------------------------------------------------------------------------- confidence
def test_uniform_stub_gives_zero_confidence_and_the_lowest_class(volume: Volume) -> None:
    result = segment_volume(volume, fake_model(StubRunner(lambda x: torch.zeros(x.shape[0], K, *x.shape[2:])), RAW))
    np.testing.assert_allclose(result.confidence, 0.0, atol=1e-6)
    assert not result.labels.any()  # a four-way tie goes to class 0


def test_one_hot_stub_gives_full_confidence(volume: Volume, truth: np.ndarray) -> None:
    result = segment_volume(volume, fake_model(StubRunner(lambda x: 1e3 * nearest_class(x)), RAW))
    np.testing.assert_allclose(result.confidence, 1.0, atol=1e-6)
    assert np.array_equal(result.labels, truth)


class _Logits(nn.Module):
    """The stub's logits as a network, for predict_volume."""

    def __init__(self, logits: Logits) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)


@pytest.mark.parametrize("target", [None, (0.8, 1.2)])
def test_confidence_is_the_normalised_entropy_of_the_final_probabilities(volume: Volume, target: object) -> None:
    cfg = PreprocessConfig(pad_multiple=16, target_spacing=target)  # type: ignore[arg-type]
    result = segment_volume(volume, fake_model(StubRunner(with_position), cfg))
    probs = predict_volume(_Logits(with_position), volume, cfg).student.double().numpy()
    assert result.confidence.min() >= 0.0 and result.confidence.max() <= 1.0
    assert result.confidence.min() < 0.5 < result.confidence.max()  # not a trivial map
    np.testing.assert_allclose(result.confidence, numpy_confidence(probs), atol=1e-5)
    ok = margin_mask(probs)
    assert np.array_equal(result.labels[ok], probs.argmax(0)[ok])


def test_non_finite_probabilities_are_an_error(volume: Volume) -> None:
    model = fake_model(StubRunner(lambda x: torch.full((x.shape[0], K, *x.shape[2:]), float("nan"))), RAW)
    with pytest.raises(InferenceError, match="non-finite"):
        segment_volume(volume, model)


# -------------------------------------------------------------------------------------------------- 4D, I/O
def test_four_dimensional_input_is_segmented_frame_by_frame(volume: Volume) -> None:
    frames = np.stack([volume.array, volume.array[::-1].copy() * 0.5 + 1.0], axis=-1)
    cine = Volume(frames, volume.affine, "nifti1")
    model = fake_model(StubRunner(with_position), PreprocessConfig(pad_multiple=16, target_spacing=(1.0, 1.0)))
    prepared = prepare(cine, model)
    assert isinstance(prepared, PreparedVolume) and prepared.is_4d and len(prepared.images) == 2
    result = infer(prepared, model)
    assert result.labels.shape == result.confidence.shape == cine.shape
    for t, frame in enumerate(cine.frames()):
        alone = segment_volume(frame, model)
        assert np.array_equal(result.labels[..., t], alone.labels)
        assert np.array_equal(result.confidence[..., t], alone.confidence)


def test_channel_count_is_checked(volume: Volume) -> None:
    with pytest.raises(GeometryError, match="1 image channel"):
        prepare([volume, volume], fake_model(StubRunner(nearest_class), RAW))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_chunked_inverse_equals_the_inverse(spatial_dims: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(23, 9, 17)).astype(np.float32)
    target = (1.3, 0.7) if spatial_dims == 2 else (2.7, 1.3, 0.7)
    cfg = PreprocessConfig(spatial_dims=spatial_dims, pad_multiple=8, target_spacing=target, slice_axis=1)  # type: ignore[arg-type]
    x, state = preprocess(image, (0.9, 2.0, 1.1), cfg)
    probs = torch.softmax(torch.randn(x.shape[0], K, *x.shape[2:]), 1)
    full = invert(probs, state)  # [K, i, j, k]
    for max_slices in (1, 4, 100):
        rebuilt = torch.empty_like(full)
        view = rebuilt.permute(0, *(1 + a for a in state.axis_order))  # [K, slices, h, w]
        starts = []
        for start, chunk in invert_chunks(probs, state, max_slices=max_slices):
            assert chunk.shape[0] <= max_slices and chunk.dtype == torch.float32
            view[:, start : start + chunk.shape[0]] = chunk.transpose(0, 1)
            starts.append(start)
        assert starts == list(range(0, image.shape[1], max_slices))
        if spatial_dims == 2:
            assert torch.equal(rebuilt, full)
        else:
            torch.testing.assert_close(rebuilt, full, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- parity with predict_volume
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_engine_equals_predict_volume_with_a_random_network(spatial_dims: int) -> None:
    torch.manual_seed(0)
    phantom = make_phantom(5, size=(44, 40), slices=6)
    vol = Volume(phantom.image, phantom.affine, "nifti1")
    target = (1.1, 1.3) if spatial_dims == 2 else (4.0, 1.1, 1.3)
    cfg = PreprocessConfig(spatial_dims=spatial_dims, pad_multiple=8, target_spacing=target)  # type: ignore[arg-type]
    net = DualBranchUNet(1, K, spatial_dims=spatial_dims, width=4, depth=2).eval()
    reference = predict_volume(net, vol, cfg).student.double().numpy()
    runner = TorchRunner(net.student_network(), device="cpu", channels_last=False)
    result = segment_volume(vol, fake_model(runner, cfg))
    ok = margin_mask(reference, 1e-5)
    assert ok.mean() > 0.99
    assert np.array_equal(result.labels[ok], reference.argmax(0)[ok])
    np.testing.assert_allclose(result.confidence, numpy_confidence(reference), atol=1e-5)


def test_argmax_ties_go_to_the_lowest_class() -> None:
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25], [0.2, 0.2, 0.5, 0.1], [0.4, 0.1, 0.1, 0.4]])
    probs = probs.T.reshape(1, K, 2, 2)
    assert argmax_lowest(probs).tolist() == [[[1, 0], [2, 0]]]
    assert argmax_lowest(probs, torch.int16).dtype == torch.int16


def test_labels_and_confidence_equal_the_separate_passes() -> None:
    from confkd.training.losses import confidence_from_probabilities

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(3, 4, 17, 9, generator=gen), dim=1)
    probs[0, :, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])[:, None]  # one-hot: confidence 1, 0 log 0 = 0
    probs[1, :, 0] = 0.25  # uniform: confidence 0, every class tied: label 0
    probs[2, :, 0] = torch.tensor([0.1, 0.45, 0.45, 0.0])[:, None]  # tie between 1 and 2: the lower wins
    labels, conf = labels_and_confidence(probs)
    assert torch.equal(labels, argmax_lowest(probs))
    assert torch.allclose(conf, confidence_from_probabilities(probs, class_dim=1), atol=1e-6)
    assert conf[0, 0].eq(1).all() and conf[1, 0].abs().max() < 1e-6 and labels[2, 0].eq(1).all()
    assert labels_and_confidence(probs, torch.int16)[0].dtype == torch.int16


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["off", "auto"])
def test_cuda_engine_matches_the_cpu(amp: str) -> None:
    torch.manual_seed(0)
    phantom = make_phantom(5, size=(72, 64), slices=6)
    vol = Volume(phantom.image, phantom.affine, "nifti1")
    cfg = PreprocessConfig(pad_multiple=8, target_spacing=(1.1, 1.3))
    net = DualBranchUNet(1, K, width=4, depth=2).eval()
    cpu_runner = TorchRunner(net.student_network(), device="cpu", max_tile=(48, 48))
    cpu = segment_volume(vol, fake_model(cpu_runner, cfg), tta=True)
    runner = TorchRunner(net.student_network(), device="cuda", amp=amp, max_tile=(48, 48))  # type: ignore[arg-type]
    gpu = segment_volume(vol, fake_model(runner, cfg), tta=True)  # tiled, float16 storage, pinned copies
    tol = 5e-3 if amp == "off" else 5e-2
    np.testing.assert_allclose(gpu.confidence, cpu.confidence, atol=tol)
    assert (gpu.labels == cpu.labels).mean() > (0.999 if amp == "off" else 0.98)
