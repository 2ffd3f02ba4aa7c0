"""The ConfKD network: a U-Net encoder shared by a teacher and a student decoder.

The teacher decoder learns from dense masks, the student decoder from weak labels plus the teacher's
distilled predictions (see :mod:`confkd.training.losses`). Only the student (encoder + student decoder) is
deployed: :meth:`DualBranchUNet.student_network` returns it as a plain module with one tensor in and one
tensor out, which is what ONNX/TensorRT export consumes.

Design choices that matter downstream:

* Convolutions are padded and every downsampling is by exactly 2, so logits come out at the input
  resolution whenever each spatial size is divisible by ``2**depth``. The network does no internal padding
  (the preprocessing pads to a multiple); a wrong size raises :class:`~confkd.errors.GeometryError` that
  names the padded shape to use.
* No data-dependent Python control flow in ``forward``; only shape checks, which are skipped while tracing
  for export (an exported graph cannot raise anyway).
* Both :class:`DualBranchUNet` and the single-branch :class:`UNet` return :class:`BranchOutputs`, so the
  training loop and the objective treat every model the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from confkd.config import ModelConfig
from confkd.errors import ConfigError, GeometryError

__all__ = [
    "MODELS",
    "BranchOutputs",
    "Decoder",
    "DualBranchUNet",
    "Encoder",
    "SegmentationNetwork",
    "UNet",
    "check_input_shape",
    "count_parameters",
    "create_model",
    "unet_channels",
]

Activation = Literal["leakyrelu", "relu"]

_NORMS = ("batch", "instance")
_ACTIVATIONS = ("leakyrelu", "relu")
_LEAKY_SLOPE = 0.01
# nnU-Net's caps: wider bottlenecks cost memory without measurable gains
_DEFAULT_MAX_CHANNELS = {2: 512, 3: 320}
_AXIS_NAMES = {2: ("height", "width"), 3: ("depth", "height", "width")}


class BranchOutputs(NamedTuple):
    """Logits of both branches, each ``[N, num_classes, *spatial]``.

    For a single-branch :class:`UNet`, ``student`` and ``teacher`` are the same tensor.
    """

    student: Tensor
    teacher: Tensor


def _conv(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _conv_transpose(spatial_dims: int) -> type[nn.ConvTranspose2d] | type[nn.ConvTranspose3d]:
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def _norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels) if spatial_dims == 2 else nn.BatchNorm3d(channels)
    # affine=True so both norms carry learnable scale/shift; running stats off: inference normalises
    # every image by its own statistics, exactly as in training, and the ONNX graph stays stateless
    if spatial_dims == 2:
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)
    return nn.InstanceNorm3d(channels, affine=True, track_running_stats=False)


def _act(kind: str) -> nn.Module:
    return nn.LeakyReLU(_LEAKY_SLOPE, inplace=True) if kind == "leakyrelu" else nn.ReLU(inplace=True)


class ConvNormAct(nn.Sequential):
    """``conv(k=3, padding=1) -> norm -> activation``; the conv has no bias (the norm's shift replaces it)."""

    def __init__(self, in_ch: int, out_ch: int, spatial_dims: int, norm: str, act: str, stride: int = 1) -> None:
        super().__init__(
            _conv(spatial_dims)(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
            _norm(norm, spatial_dims, out_ch),
            _act(act),
        )


def unet_channels(width: int, depth: int, max_channels: int) -> list[int]:
    """Channels per level ``0..depth``: ``width * 2**level``, capped at ``max_channels``."""
    return [min(width * 2**level, max_channels) for level in range(depth + 1)]


class Encoder(nn.Module):
    """``depth + 1`` levels of ``[conv-norm-act] x 2``; levels ``1..depth`` start with a stride-2 conv.

    Shape:
        - Input: ``[N, in_channels, *spatial]``, every spatial size divisible by ``2**depth``.
        - Output: a list of ``depth + 1`` feature maps, level ``l`` of shape
          ``[N, channels[l], *(s // 2**l for s in spatial)]``; the last one (the bottleneck) after dropout.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        spatial_dims: int,
        norm: str = "batch",
        act: str = "leakyrelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        stages = []
        prev = in_channels
        for level, ch in enumerate(self.channels):
            stride = 1 if level == 0 else 2
            stages.append(
                nn.Sequential(
                    ConvNormAct(prev, ch, spatial_dims, norm, act, stride=stride),
                    ConvNormAct(ch, ch, spatial_dims, norm, act),
                )
            )
            prev = ch
        self.stages = nn.ModuleList(stages)
        # dropout on the shared bottleneck, so teacher and student see the same dropped features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        features[-1] = self.dropout(features[-1])
        return features


class Decoder(nn.Module):
    """Transposed-conv upsampling, skip concatenation, ``[conv-norm-act] x 2`` per level, 1x1 head.

    Shape:
        - Input: the :class:`Encoder`'s list of ``depth + 1`` feature maps.
        - Output: logits ``[N, num_classes, *spatial]`` at the encoder's input resolution.
    """

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        spatial_dims: int,
        norm: str = "batch",
        act: str = "leakyrelu",
    ) -> None:
        super().__init__()
        channels = list(channels)
        ups, blocks = [], []
        # deepest level first; ups[i] and blocks[i] produce level depth-1-i
        for level in reversed(range(len(channels) - 1)):
            ch, below = channels[level], channels[level + 1]
            # no bias: a conv + norm follows, which would cancel it
            ups.append(_conv_transpose(spatial_dims)(below, ch, kernel_size=2, stride=2, bias=False))
            blocks.append(
                nn.Sequential(
                    ConvNormAct(2 * ch, ch, spatial_dims, norm, act),
                    ConvNormAct(ch, ch, spatial_dims, norm, act),
                )
            )
        self.ups = nn.ModuleList(ups)
        self.blocks = nn.ModuleList(blocks)
        self.head = _conv(spatial_dims)(channels[0], num_classes, kernel_size=1)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        skips = features[-2::-1]
        for up, block, skip in zip(self.ups, self.blocks, skips, strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def check_input_shape(x: Tensor, spatial_dims: int, in_channels: int, divisor: int) -> None:
    """Raise :class:`GeometryError` unless ``x`` is ``[N, in_channels, *spatial]``, sizes divisible by ``divisor``."""
    if x.dim() != spatial_dims + 2:
        layout = "N, C, H, W" if spatial_dims == 2 else "N, C, D, H, W"
        raise GeometryError(
            f"Wrong input rank {x.dim()} (shape {tuple(x.shape)}): this {spatial_dims}D network expects [{layout}]."
        )
    if x.shape[1] != in_channels:
        raise GeometryError(
            f"Wrong number of input channels {x.shape[1]} (shape {tuple(x.shape)}): expected {in_channels}."
        )
    # no int(): under torch.compile with dynamic shapes that would specialise (and recompile) per size
    spatial = tuple(x.shape[2:])
    if any(s % divisor != 0 for s in spatial):
        sizes = ", ".join(f"{name}={s}" for name, s in zip(_AXIS_NAMES[spatial_dims], spatial, strict=True))
        padded = tuple(math.ceil(s / divisor) * divisor for s in spatial)
        raise GeometryError(
            f"Wrong input shape {sizes}. Expected every spatial size divisible by {divisor}. "
            f"Consider pad your images to shape {padded}."
        )


def _check_args(
    in_channels: int, num_classes: int, spatial_dims: int, width: int, depth: int, norm: str, act: str, dropout: float
) -> None:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if norm not in _NORMS:
        raise ConfigError(f"Unknown norm {norm!r}. Available options are: {', '.join(_NORMS)}")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"Unknown activation {act!r}. Available options are: {', '.join(_ACTIVATIONS)}")
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width), ("depth", depth)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {dropout!r}")


def _init_weights(module: nn.Module, act: str) -> None:
    """Kaiming (He) normal init matched to the activation's slope; zero biases; unit norm scales."""
    slope = _LEAKY_SLOPE if act == "leakyrelu" else 0.0
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            nn.init.kaiming_normal_(m.weight, a=slope, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d | nn.InstanceNorm2d | nn.InstanceNorm3d):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SegmentationNetwork(nn.Module):
    """An encoder and one decoder: one tensor in, logits out. What gets exported.

    Built by :meth:`DualBranchUNet.student_network` / :meth:`UNet.student_network` from the *same* module
    objects as the full model (parameters are shared, not copied). Its ``state_dict`` keys are
    ``encoder.*`` and ``decoder.*``.

    Shape:
        - Input: ``[N, in_channels, *spatial]``, every spatial size divisible by ``divisor`` (``2**depth``).
        - Output: logits ``[N, num_classes, *spatial]``.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, spatial_dims: int, in_channels: int, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.divisor = 2 ** (len(encoder.channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_tracing():
            check_input_shape(x, self.spatial_dims, self.in_channels, self.divisor)
        return self.decoder(self.encoder(x))


class _UNetBase(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int,
        width: int,
        depth: int,
        norm: str,
        dropout: float,
        act: Activation,
        max_channels: int | None,
    ) -> None:
        super().__init__()
        _check_args(in_channels, num_classes, spatial_dims, width, depth, norm, act, dropout)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.divisor = 2**depth
        self.channels = unet_channels(width, depth, max_channels or _DEFAULT_MAX_CHANNELS[spatial_dims])
        self._norm_kind = norm
        self._act_kind = act
        self.encoder = Encoder(in_channels, self.channels, spatial_dims, norm, act, dropout)

    def _decoder(self) -> Decoder:
        return Decoder(self.channels, self.num_classes, self.spatial_dims, self._norm_kind, self._act_kind)

    def _check(self, x: Tensor) -> None:
        # skipped under tracing: the check would bake the example's shape into the graph as constants
        if not torch.jit.is_tracing():
            check_input_shape(x, self.spatial_dims, self.in_channels, self.divisor)


class DualBranchUNet(_UNetBase):
    """ConfKD's network: a shared U-Net :class:`Encoder`, a ``teacher`` and a ``student`` :class:`Decoder`.

    The two decoders have identical architecture and separate weights.

    Args:
        in_channels: image channels.
        num_classes: output classes, background included.
        spatial_dims: 2 (slices) or 3 (volumes).
        width: channels of the first level; level ``l`` has ``width * 2**l`` (capped at ``max_channels``).
        depth: number of stride-2 downsamplings; inputs must be divisible by ``2**depth``.
        norm: ``"batch"`` or ``"instance"`` (affine, no running statistics).
        dropout: dropout probability on the shared bottleneck.
        act: ``"leakyrelu"`` (slope 0.01) or ``"relu"``.
        max_channels: channel cap; ``None`` means 512 in 2D, 320 in 3D.

    Shape:
        - Input: ``[N, in_channels, *spatial]``, every spatial size divisible by ``2**depth``.
        - Output: :class:`BranchOutputs` of two ``[N, num_classes, *spatial]`` logit tensors.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 2,
        width: int = 16,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
        act: Activation = "leakyrelu",
        max_channels: int | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, spatial_dims, width, depth, norm, dropout, act, max_channels)
        self.teacher = self._decoder()
        self.student = self._decoder()
        _init_weights(self, act)

    def forward(self, x: Tensor) -> BranchOutputs:
        self._check(x)
        features = self.encoder(x)
        return BranchOutputs(student=self.student(features), teacher=self.teacher(features))

    def student_network(self) -> SegmentationNetwork:
        """Encoder + student decoder as one module (shared parameters: it follows training updates).

        Its train/eval mode is that of the shared submodules, so ``.eval()`` on it also affects this model's
        encoder and student decoder. Use ``copy.deepcopy(model.student_network())`` for an independent copy.
        """
        return SegmentationNetwork(self.encoder, self.student, self.spatial_dims, self.in_channels, self.num_classes)


class UNet(_UNetBase):
    """A single-branch U-Net (baselines: lower bound, upper bound, single-branch mixed supervision).

    Same encoder and decoder as :class:`DualBranchUNet`, one decoder. Its forward returns
    ``BranchOutputs(student=logits, teacher=logits)`` (the *same* tensor) so the training loop and objective
    need no special case: dense CE "on the teacher" and partial CE "on the student" both train this one
    decoder. A distillation term is then identically zero (value and gradient), so configure
    ``loss.lambda_kl = 0`` for it to skip the wasted computation. Arguments as in :class:`DualBranchUNet`.

    Shape:
        - Input: ``[N, in_channels, *spatial]``, every spatial size divisible by ``2**depth``.
        - Output: :class:`BranchOutputs` whose two fields are the same ``[N, num_classes, *spatial]`` tensor.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 2,
        width: int = 16,
        depth: int = 4,
        norm: str = "batch",
        dropout: float = 0.0,
        act: Activation = "leakyrelu",
        max_channels: int | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, spatial_dims, width, depth, norm, dropout, act, max_channels)
        self.decoder = self._decoder()
        _init_weights(self, act)

    def forward(self, x: Tensor) -> BranchOutputs:
        self._check(x)
        logits = self.decoder(self.encoder(x))
        return BranchOutputs(student=logits, teacher=logits)

    def student_network(self) -> SegmentationNetwork:
        """Encoder + decoder as one module returning a tensor (shared parameters, as for the dual model)."""
        return SegmentationNetwork(self.encoder, self.decoder, self.spatial_dims, self.in_channels, self.num_classes)


MODELS: dict[str, type[DualBranchUNet] | type[UNet]] = {"dual_unet": DualBranchUNet, "unet": UNet}


def create_model(cfg: ModelConfig, spatial_dims: int) -> DualBranchUNet | UNet:
    """Build the model named by ``cfg.name`` (see :data:`MODELS`) for 2D or 3D inputs."""
    try:
        cls = MODELS[cfg.name]
    except KeyError as e:
        raise ConfigError(f"Unknown model {cfg.name!r}. Available options are: {', '.join(sorted(MODELS))}") from e
    return cls(
        in_channels=cfg.in_channels,
        num_classes=cfg.num_classes,
        spatial_dims=spatial_dims,
        width=cfg.width,
        depth=cfg.depth,
        norm=cfg.norm,
        dropout=cfg.dropout,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (each shared Parameter counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
