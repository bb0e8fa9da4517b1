"""Students built for the run's input size: timm ViTs, MLP-Mixers and Swins at 32 px train, stage features come out
as [B, C, H, W] maps or [B, N, C] tokens whatever the model's own layout, and a size a model cannot take is refused
with what to change."""

import pytest
import torch

from pand.errors import ConfigError
from pand.networks.stages import StageTap, default_stages, stage_shapes
from pand.students import build_student

C = 5
TINY_VIT = ("vit_tiny_patch16_224", {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2})
# timm's mixer entry points fix patch_size, depth and width; the MLP ratios are free and keep it small.
TINY_MIXER = ("mixer_s16_224", {"mlp_ratio": (0.5, 0.5)})
TINY_SWIN = ("swin_tiny_patch4_window7_224",
             {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4})


@pytest.mark.parametrize("name, kwargs", [TINY_VIT, TINY_MIXER, TINY_SWIN], ids=["vit", "mixer", "swin"])
def test_patch_models_train_at_32_px(name, kwargs):
    torch.manual_seed(0)
    student = build_student(name, C, source="timm", pretrained=False, image_size=32, kwargs=kwargs)
    assert student.input_size == (3, 32, 32)
    student.train()
    logits = student(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, C)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


def test_a_vit_is_built_for_the_size_not_cropped_to_it():
    student = build_student(*TINY_VIT[:1], C, pretrained=False, image_size=32, kwargs=TINY_VIT[1])
    assert student.backbone.pos_embed.shape[1] == 1 + (32 // 4) ** 2
    names = default_stages(student)
    assert stage_shapes(student, names, (3, 32, 32)) == [(65, 32), (65, 32)]


def test_without_a_size_timm_vits_are_measured_at_their_own():
    student = build_student("vit_tiny_patch16_224", C, pretrained=False, kwargs={"depth": 1})
    assert student.feature_dim == 192 and not hasattr(student, "input_size")


def test_sizes_a_model_cannot_take_are_refused_with_what_to_change():
    with pytest.raises(ConfigError, match=r"16 x 16 patches.*40 x 40 px.*student.kwargs.patch_size"):
        build_student("vit_tiny_patch16_224", C, pretrained=False, image_size=40, kwargs={"depth": 1})
    # timm can pad to whole patches instead, with position embeddings resampled to the padded grid
    padded = build_student("vit_tiny_patch16_224", C, pretrained=False, image_size=40,
                           kwargs={"depth": 1, "dynamic_img_size": True, "dynamic_img_pad": True})
    assert padded(torch.randn(1, 3, 40, 40)).shape == (1, C)
    with pytest.raises(ConfigError, match=r"'vit_b_16' cannot run at 32 x 32 px.*Wrong image height"):
        build_student("vit_b_16", C, source="torchvision", pretrained=False, image_size=32)
    with pytest.raises(ConfigError, match=r"mixer_s16_224.*does not take student.kwargs.*patch_size"):
        build_student("mixer_s16_224", C, pretrained=False, image_size=32, kwargs={"patch_size": 4})
    with pytest.raises(ConfigError, match="CIFAR networks take no student.kwargs"):
        build_student("resnet8x4", C, pretrained=False, image_size=32, kwargs={"depth": 2})


def test_cnns_ignore_the_size_and_take_kwargs():
    student = build_student("resnet18", C, source="timm", pretrained=False, image_size=32, kwargs={"drop_rate": 0.1})
    assert student.feature_dim == 512 and student.input_size == (3, 32, 32)
    tv = build_student("resnet18", C, source="torchvision", pretrained=False, image_size=(32, 48),
                       kwargs={"zero_init_residual": True})
    assert tv.input_size == (3, 32, 48) and tv(torch.randn(1, 3, 32, 48)).shape == (1, C)
    assert not tv.backbone.layer1[0].bn2.weight.any()


def test_channels_last_swin_stages_come_out_channels_first():
    torch.manual_seed(0)
    student = build_student(*TINY_SWIN[:1], C, pretrained=False, image_size=64, kwargs=TINY_SWIN[1])
    assert student.backbone.output_fmt == "NHWC"
    names = default_stages(student)
    assert stage_shapes(student, names, (3, 64, 64)) == [(24, 16, 16), (48, 8, 8), (96, 4, 4), (192, 2, 2)]
    x = torch.randn(2, 3, 64, 64)
    with StageTap(student, names[-1:]) as tap:
        pooled = student.features(x)
        (last,) = tap.take()
    # Swin's head norms then pools the last stage; the norm is per token, so it commutes with the permute
    normed = student.backbone.norm(last.permute(0, 2, 3, 1))
    torch.testing.assert_close(normed.mean((1, 2)), pooled)
