"""OFA exit branches: logits of the right shape from CNN maps and ViT/MLP tokens at 32 px and 224 px, built from the
feature shape alone; gradients reach every parameter; outputs do not depend on the batch; bad shapes say why."""

import pytest
import torch

from pand.distillers.ofa_branches import (
    ConvExitBranch,
    PatchMerge,
    TokenExitBranch,
    build_exit_branch,
)

C = 10


def _n_blocks(branch) -> int:
    return len(branch.blocks) if isinstance(branch, ConvExitBranch) else len(branch.merges)


@pytest.mark.parametrize(
    "shape, target, blocks, width",
    [
        ((2, 64, 32, 32), 8, 2, 256),  # CIFAR ResNet stage 1 -> the 8 x 8 of stage 3
        ((2, 128, 16, 16), 8, 1, 256),
        ((2, 256, 8, 8), 8, 0, 256),  # already at the target: pool + linear only
        ((2, 64, 56, 56), 7, 3, 512),  # ImageNet ResNet-18 layer1 at 224 px
        ((2, 96, 28, 28), 7, 2, 384),
        ((2, 24, 15, 15), 4, 2, 96),  # odd sides: 15 -> 8 -> 4
        ((2, 32, 16, 8), (4, 4), 2, 128),  # non-square map, (H, W) target
    ],
)
def test_cnn_branch_shapes(shape, target, blocks, width):
    branch = build_exit_branch(shape, C, target_hw=target)
    assert isinstance(branch, ConvExitBranch)
    assert _n_blocks(branch) == blocks
    assert branch.head.in_features == width
    out = branch(torch.randn(shape))
    assert out.shape == (shape[0], C)
    th, tw = (target, target) if isinstance(target, int) else target
    assert branch.out_hw[0] <= th and branch.out_hw[1] <= tw
    with torch.no_grad():  # the blocks really bring the map down to the target
        assert branch.blocks(torch.randn(shape)).shape[2:] == branch.out_hw


@pytest.mark.parametrize(
    "shape, target, merges, width, prefix",
    [
        ((2, 65, 192), 8, 0, 192, 1),  # ViT-T at 32 px, patch 4 (8 x 8 + class token); final stage also 8 x 8
        ((2, 65, 192), 7, 1, 384, 1),  # the same merged to <= 7: 8 -> 4
        ((2, 64, 128), 4, 1, 256, 0),  # MLP-Mixer tokens, no class token
        ((2, 197, 384), 7, 1, 768, 1),  # ViT-S at 224 px: 14 -> 7
        ((2, 3136, 96), 7, 3, 768, 0),  # a 56 x 56 token stage at 224 px: 56 -> 28 -> 14 -> 7
        ((2, 50, 64), 4, 1, 128, 1),  # odd grid 7 -> 4 (zero-padded)
    ],
)
def test_token_branch_shapes(shape, target, merges, width, prefix):
    branch = build_exit_branch(shape, C, target_hw=target)
    assert isinstance(branch, TokenExitBranch)
    assert (_n_blocks(branch), branch.head.in_features, branch.prefix) == (merges, width, prefix)
    assert branch.out_side <= target
    assert branch(torch.randn(shape)).shape == (shape[0], C)


def test_token_branch_default_target_is_7_and_depth_and_width_are_configurable():
    branch = TokenExitBranch(197, 384, C)  # 14 x 14 -> 7 x 7
    assert branch.out_side == 7 and len(branch.blocks) == 1
    deep = build_exit_branch((1, 65, 192), C, target_hw=8, embed_dim=256, depth=2)
    assert len(deep.blocks) == 2 and deep.head.in_features == 256  # no merge: a projection sets the width
    assert deep(torch.randn(3, 65, 192)).shape == (3, C)
    conv = build_exit_branch((1, 64, 32, 32), C, target_hw=8, embed_dim=100)
    assert conv.head.in_features == 100
    distilled = build_exit_branch((1, 198, 192), C, target_hw=7, prefix_tokens=2)  # class + distillation token
    assert distilled.prefix == 2 and distilled(torch.randn(2, 198, 192)).shape == (2, C)


def test_patch_merge_concatenates_each_2x2_window():
    merge = PatchMerge(1, 4)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0), merge.norm.bias.zero_()
        merge.reduction.weight.copy_(torch.eye(4))
    grid = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
    out = merge(grid)
    assert out.shape == (1, 1, 1, 4)
    # window in Swin's order (0,0), (1,0), (0,1), (1,1) = 0, 2, 1, 3, then layer-normalised
    expected = torch.nn.functional.layer_norm(torch.tensor([0.0, 2.0, 1.0, 3.0]), (4,))
    assert torch.allclose(out.flatten(), expected, atol=1e-5)


@pytest.mark.parametrize("shape, target", [((4, 32, 16, 16), 4), ((4, 65, 64), 4), ((4, 16, 32), 2)])
def test_gradients_reach_every_parameter(shape, target):
    torch.manual_seed(0)
    branch = build_exit_branch(shape, C, target_hw=target, depth=2).train()
    x = torch.randn(shape, requires_grad=True)
    branch(x).logsumexp(-1).sum().backward()
    for name, p in branch.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shape, target", [((1, 32, 16, 16), 4), ((1, 65, 64), 4), ((1, 17, 32), 4)])
def test_branch_is_independent_of_batch_size(shape, target):
    torch.manual_seed(0)
    branch = build_exit_branch(shape, C, target_hw=target)  # built from a batch-1 dry-run shape
    x = torch.randn(5, *shape[1:])
    if isinstance(branch, ConvExitBranch):
        branch.train()
        branch(x)  # give BatchNorm non-trivial running statistics first
    branch.eval()  # BatchNorm mixes samples only in training; token branches never do
    with torch.no_grad():
        whole = branch(x)
        single = torch.cat([branch(x[i : i + 1]) for i in range(5)])
    assert whole.shape == (5, C)
    assert torch.allclose(whole, single, atol=1e-5)
    if isinstance(branch, TokenExitBranch):
        branch.train()  # no BatchNorm, no dropout: the same in training mode
        with torch.no_grad():
            assert torch.allclose(branch(x), single, atol=1e-5)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 64), "neither a CNN map"),
        ((2, 3, 64, 32, 32), "neither a CNN map"),
        ((2, 0, 8, 8), "empty dimension"),
        ((2, 70, 64), "prefix_tokens"),  # 70 tokens: no square grid, with or without a class token
    ],
)
def test_invalid_feature_shapes_raise(shape, match):
    with pytest.raises(ValueError, match=match):
        build_exit_branch(shape, C, target_hw=7)


def test_invalid_arguments_and_inputs_raise():
    with pytest.raises(ValueError, match="target_hw"):
        build_exit_branch((2, 64, 32, 32), C, target_hw=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_exit_branch((2, 64, 32, 32), 0, target_hw=8)
    with pytest.raises(ValueError, match="depth"):
        build_exit_branch((2, 65, 64), C, target_hw=8, depth=-1)
    conv = build_exit_branch((2, 64, 32, 32), C, target_hw=8)
    with pytest.raises(ValueError, match=r"\[B, 64, H, W\].*\(2, 32, 32, 32\)"):
        conv(torch.randn(2, 32, 32, 32))
    tokens = build_exit_branch((2, 65, 64), C, target_hw=8)
    with pytest.raises(ValueError, match=r"\[B, 65, 64\].*\(2, 64, 64\)"):
        tokens(torch.randn(2, 64, 64))


def test_ofa_step_with_a_channels_last_swin_student():
    from pand.distillers import Progress, TeacherContext, build_distiller
    from pand.students import build_student
    from pand.teachers import LOGITS

    torch.manual_seed(0)
    # timm's Swin keeps its stage maps [B, H, W, C]; the stage tap hands them to the branches as [B, C, H, W]
    student = build_student("swin_tiny_patch4_window7_224", C, source="timm", pretrained=False, image_size=64,
                            kwargs={"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1),
                                    "window_size": 4})
    distiller = build_distiller({"name": "ofa"}, student, C, TeacherContext(num_classes=C, identity={"kind": "test"}))
    assert [(b.in_channels, b.out_hw) for b in distiller.branches] == [(24, (2, 2)), (48, (2, 2)), (96, (2, 2))]
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 4])}
    out = distiller.training_losses(batch, {LOGITS: torch.randn(4, C)}, Progress(1, 10))
    assert out.logits.shape == (4, C) and set(out.losses) == {"ce", "ofa", "ofa_stages"}
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    sum(out.losses.values()).backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in distiller.branches.parameters())
