"""The dual-branch U-Net: shapes, gradients, weight separation, student extraction, errors, export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from confkd.config import LossConfig, ModelConfig
from confkd.errors import ConfigError, GeometryError
from confkd.training.losses import confkd_objective
from confkd.training.network import (
    MODELS,
    BranchOutputs,
    DualBranchUNet,
    SegmentationNetwork,
    UNet,
    count_parameters,
    create_model,
)

IGNORE = 255


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# 16*k and 8*k sizes with odd k, non-square, batch 1 and 2
SHAPE_CASES = [
    pytest.param(2, 4, (2, 1, 48, 80), id="2d-48x80-depth4"),
    pytest.param(2, 3, (1, 2, 24, 40), id="2d-24x40-depth3-batch1"),
    pytest.param(3, 3, (1, 1, 16, 32, 48), id="3d-16x32x48-depth3"),
]


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize(("spatial_dims", "depth", "shape"), SHAPE_CASES)
@pytest.mark.parametrize("cls", [DualBranchUNet, UNet])
def test_output_shapes(cls: type[nn.Module], spatial_dims: int, depth: int, shape: tuple[int, ...], norm: str) -> None:
    model = cls(in_channels=shape[1], num_classes=3, spatial_dims=spatial_dims, width=4, depth=depth, norm=norm)
    x = torch.randn(shape)
    expected = (shape[0], 3, *shape[2:])
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        assert isinstance(out, BranchOutputs)
        assert tuple(out.student.shape) == expected
        assert tuple(out.teacher.shape) == expected
        assert torch.isfinite(out.student).all()
        student = model.student_network()
        assert tuple(student(x).shape) == expected


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_every_parameter_gets_a_gradient_from_the_full_objective(norm: str) -> None:
    model = DualBranchUNet(1, 3, spatial_dims=2, width=4, depth=3, norm=norm, dropout=0.1)
    x = torch.randn(2, 1, 16, 24)
    is_strong = torch.tensor([True, False])
    dense = torch.randint(0, 3, (2, 16, 24))
    sparse = torch.full((2, 16, 24), IGNORE)
    sparse[1, 4:8, 4:8] = 1
    sparse[1, 10:12, 10:20] = 0
    out = model(x)
    cfg = LossConfig(lambda_pseudo=0.5, pseudo_threshold=0.0)
    loss = confkd_objective(out, is_strong, dense, sparse, cfg, IGNORE)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_teacher_and_student_have_same_architecture_and_separate_weights() -> None:
    model = DualBranchUNet(1, 4, width=4, depth=2)
    teacher = dict(model.teacher.named_parameters())
    student = dict(model.student.named_parameters())
    assert teacher.keys() == student.keys()
    assert len(teacher) > 0
    for name, t in teacher.items():
        s = student[name]
        assert t.shape == s.shape
        assert t is not s
        assert t.data_ptr() != s.data_ptr()
    # independently initialised: at least the conv kernels differ
    assert not torch.equal(model.teacher.head.weight, model.student.head.weight)
    out = model.eval()(torch.randn(1, 1, 8, 8))
    assert not torch.equal(out.student, out.teacher)


def test_student_network_has_no_teacher_parameters_and_matches_the_student_branch() -> None:
    model = DualBranchUNet(1, 4, width=4, depth=3).eval()
    student = model.student_network()
    assert isinstance(student, SegmentationNetwork)
    names = [n for n, _ in student.named_parameters()]
    assert not any("teacher" in n for n in names)
    assert count_parameters(student) == count_parameters(model.encoder) + count_parameters(model.student)
    assert count_parameters(student) == count_parameters(model) - count_parameters(model.teacher)
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}
    # shares, not copies, the trained parameters
    assert student.encoder.stages[0][0][0].weight is model.encoder.stages[0][0][0].weight
    x = torch.randn(2, 1, 24, 40)
    with torch.no_grad():
        assert torch.equal(student(x), model(x).student)


def test_unet_returns_one_tensor_for_both_branches() -> None:
    model = UNet(1, 2, width=4, depth=2).eval()
    x = torch.randn(1, 1, 12, 20)
    out = model(x)
    assert out.student is out.teacher
    student = model.student_network()
    assert count_parameters(student) == count_parameters(model)
    with torch.no_grad():
        assert torch.equal(student(x), model(x).student)


def test_unet_matches_one_branch_of_the_dual_model() -> None:
    dual, single = DualBranchUNet(1, 4, width=4, depth=2), UNet(1, 4, width=4, depth=2)
    assert count_parameters(single) == count_parameters(dual.student_network())


def test_default_parameter_counts() -> None:
    # pinned: width 16, depth 4, 2D, 4 classes; a change here is an architecture change
    model = create_model(ModelConfig(), spatial_dims=2)
    assert count_parameters(model) == 2_704_728
    assert count_parameters(model.student_network()) == 1_942_100


def test_channels_are_capped() -> None:
    model = DualBranchUNet(1, 2, spatial_dims=3, width=64, depth=4)
    assert model.channels == [64, 128, 256, 320, 320]
    assert DualBranchUNet(1, 2, width=8, depth=3, max_channels=16).channels == [8, 16, 16, 16]


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 1, 48, 72), r"height=48, width=72.*divisible by 16.*pad your images to shape \(48, 80\)"),
        ((1, 1, 50, 80), r"pad your images to shape \(64, 80\)"),
        ((1, 1, 48, 80, 16), r"rank 5"),
        ((1, 3, 48, 80), r"input channels 3"),
    ],
)
def test_wrong_input_raises_a_helpful_error(shape: tuple[int, ...], match: str) -> None:
    model = DualBranchUNet(1, 2, width=4, depth=4)
    with pytest.raises(GeometryError, match=match):
        model(torch.randn(shape))
    with pytest.raises(GeometryError, match=match):
        model.student_network()(torch.randn(shape))


def test_wrong_3d_input_names_three_axes() -> None:
    model = UNet(1, 2, spatial_dims=3, width=4, depth=2)
    with pytest.raises(GeometryError, match=r"depth=6, height=8, width=12.*\(8, 8, 12\)"):
        model(torch.randn(1, 1, 6, 8, 12))


def test_create_model_builds_the_registered_classes() -> None:
    assert set(MODELS) == {"dual_unet", "unet"}
    cfg = ModelConfig(name="unet", in_channels=2, num_classes=5, width=4, depth=2, norm="instance", dropout=0.2)
    model = create_model(cfg, spatial_dims=3)
    assert isinstance(model, UNet)
    assert (model.in_channels, model.num_classes, model.spatial_dims, model.depth) == (2, 5, 3, 2)
    assert any(isinstance(m, nn.InstanceNorm3d) for m in model.modules())
    assert any(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model.modules())
    assert isinstance(create_model(ModelConfig(width=4, depth=2), spatial_dims=2), DualBranchUNet)


def test_unknown_model_lists_the_options() -> None:
    with pytest.raises(ConfigError, match=r"Unknown model 'resnet'\. Available options are: dual_unet, unet"):
        create_model(ModelConfig(name="resnet"), spatial_dims=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"norm": "group"}, r"Unknown norm 'group'\. Available options are: batch, instance"),
        ({"spatial_dims": 1}, "spatial_dims must be 2 or 3"),
        ({"depth": 0}, "depth must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"act": "gelu"}, "Unknown activation 'gelu'"),
    ],
)
def test_bad_constructor_arguments_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DualBranchUNet(1, 2, **kwargs)  # type: ignore[arg-type]


def test_count_parameters_counts_shared_parameters_once() -> None:
    linear = nn.Linear(3, 2)
    assert count_parameters(linear) == 8
    assert count_parameters(nn.Sequential(linear, linear)) == 8
    linear.bias.requires_grad_(False)
    assert count_parameters(linear, trainable_only=True) == 6


def test_channels_last_gives_the_same_logits() -> None:
    model = DualBranchUNet(1, 3, width=4, depth=2).eval()
    x = torch.randn(2, 1, 16, 20)
    with torch.no_grad():
        ref = model(x).student
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = cl_model(x.to(memory_format=torch.channels_last)).student
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy (TorchScript) exporter
def test_student_exports_to_onnx(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    model = DualBranchUNet(1, 3, width=4, depth=2).eval()
    student = copy.deepcopy(model.student_network()).eval()
    path = tmp_path / "student.onnx"
    x = torch.randn(1, 1, 64, 64)
    torch.onnx.export(
        student,
        (x,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}},
        dynamo=False,
    )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    assert [i.name for i in graph.graph.input] == ["image"]

    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # another size than the traced one: the graph holds no shape-dependent Python branches
    other = torch.randn(2, 1, 32, 48)
    (got,) = session.run(None, {"image": other.numpy()})
    with torch.no_grad():
        want = student(other).numpy()
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-3, atol=1e-4)
