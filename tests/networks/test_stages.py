"""Stage features by forward hooks: named or found without tables, shapes from a dry run at the real input size."""

import pytest
import torch

from pand.errors import ConfigError
from pand.networks.stages import StageTap, default_stages, stage_shapes
from pand.students import build_student


def test_torchvision_resnet_stages_at_32_px():
    student = build_student("resnet18", 10, source="torchvision", pretrained=False)
    names = default_stages(student)
    assert names == ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4"]
    assert stage_shapes(student, names, (3, 32, 32)) == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]


def test_timm_feature_info_gives_the_stages_of_cnns_and_vits():
    cnn = build_student("test_resnet", 10, source="timm", pretrained=False)
    names = default_stages(cnn)
    assert len(names) >= 3 and all(n.startswith("backbone.") for n in names)
    shapes = stage_shapes(cnn, names, (3, 64, 64))
    assert all(len(s) == 3 for s in shapes) and shapes[-1][1] < shapes[0][1]  # deeper stages are smaller


def test_the_tap_returns_the_features_of_the_forward_pass_it_saw():
    student = build_student("resnet18", 10, source="torchvision", pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    with StageTap(student, ["backbone.layer4"]) as tap:
        logits = student(x)
        (feat,) = tap.take()
    assert logits.shape == (2, 10) and feat.shape == (2, 512, 1, 1)
    pooled = student.features(x)
    assert torch.allclose(feat.mean((2, 3)), pooled, atol=1e-6)  # the same pass that produced the pooled feature
    assert not student.backbone.layer4._forward_hooks  # closed with the block


def test_unknown_stage_names_are_refused():
    student = build_student("resnet18", 10, source="torchvision", pretrained=False)
    with pytest.raises(ConfigError, match="no submodule 'backbone.layer9'"):
        StageTap(student, ["backbone.layer9"])
    with pytest.raises(ConfigError, match="name them"):
        default_stages(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


def test_open_clip_visual_tower_stages_are_its_resblocks(tiny_teacher):
    visual = tiny_teacher.model.visual  # pand-tiny-vit: 32 px, 8 px patches, 2 blocks of width 64
    names = default_stages(visual)
    assert names == ["transformer.resblocks.0", "transformer.resblocks.1"]
    grid = 32 // 8
    assert stage_shapes(visual, names, (3, 32, 32)) == [(1 + grid**2, 64)] * 2


def test_block_lists_give_four_evenly_spaced_stages_ending_with_the_last():
    blocks = torch.nn.Sequential()
    blocks.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(12))
    assert default_stages(blocks) == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]
    blocks.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(3))
    assert default_stages(blocks) == ["blocks.0", "blocks.1", "blocks.2"]


def test_sequence_first_transformer_blocks_come_out_batch_first():
    from open_clip.transformer import Transformer

    torch.manual_seed(0)
    seq_first = Transformer(16, 6, 2, batch_first=False).eval()
    batch_first = Transformer(16, 6, 2, batch_first=True).eval()
    batch_first.load_state_dict(seq_first.state_dict())
    names = default_stages(seq_first)
    assert names == ["resblocks.0", "resblocks.2", "resblocks.3", "resblocks.5"]
    x = torch.randn(3, 7, 16)  # B != N, so a wrong layout cannot pass
    with StageTap(seq_first, names) as a, StageTap(batch_first, names) as b, torch.no_grad():
        torch.testing.assert_close(seq_first(x), batch_first(x))
        for got, want in zip(a.take(), b.take()):
            assert got.shape == (3, 7, 16)
            torch.testing.assert_close(got, want)


def test_a_flat_vit_gives_four_of_its_blocks_and_pands_32_px_models_build():
    # timm lists every block of a ViT / Mixer in feature_info, all at one resolution: four spread over the depth
    vit = build_student("pand_vit_p4_32", 5, source="timm", pretrained=False, image_size=32)
    assert default_stages(vit) == [f"backbone.blocks.{i}" for i in (0, 2, 3, 5)]
    assert stage_shapes(vit, default_stages(vit)[:1], (3, 32, 32)) == [(65, 192)]  # class token + 8 x 8 patches
    mixer = build_student("pand_mixer_p4_32", 5, source="timm", pretrained=False, image_size=32,
                          kwargs={"num_blocks": 4, "embed_dim": 32})
    assert default_stages(mixer) == [f"backbone.blocks.{i}" for i in range(4)]
    assert mixer(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    # CNNs keep every stage of their feature_info (resolutions differ)
    resnet = build_student("test_resnet", 5, source="timm", pretrained=False, image_size=32)
    assert len(default_stages(resnet)) == 5


def test_pands_32_px_models_have_no_pretrained_weights():
    import timm

    from pand.errors import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="no pretrained weights"):
        timm.create_model("pand_vit_p4_32", pretrained=True)


def _child_sides(sequence, side):
    """The output side of every block of a sequence, from a dry run."""
    sides = []
    hooks = [m.register_forward_hook(lambda m, a, out: sides.append(out.shape[-1])) for m in sequence]
    with torch.no_grad():
        sequence(torch.zeros(1, 3, side, side))
    for h in hooks:
        h.remove()
    return sides


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5",
                                  "densenet121"])
def test_torchvision_block_sequences_give_the_last_block_of_each_resolution(name):
    student = build_student(name, 5, source="torchvision", pretrained=False, image_size=64)
    path = "features" if hasattr(student.backbone, "features") else "layers"
    sequence = getattr(student.backbone, path)
    keys = list(sequence._modules)
    sides = _child_sides(sequence.eval(), 64)
    expected = [keys[i] for i in range(len(keys) - 1) if sides[i + 1] < sides[i]] + [keys[-1]]
    names = default_stages(student)
    assert names == [f"backbone.{path}.{k}" for k in expected]
    assert [s[-1] for s in stage_shapes(student, names, (3, 64, 64))] == [32, 16, 8, 4, 2]


def test_mobilenet_v2_stages_end_with_the_1280_channel_map_it_pools():
    student = build_student("mobilenet_v2", 5, source="torchvision", pretrained=False, image_size=64)
    names = default_stages(student)
    assert names == [f"backbone.features.{i}" for i in (1, 3, 6, 13, 18)]
    assert [s[0] for s in stage_shapes(student, names, (3, 64, 64))] == [16, 24, 32, 96, 1280]


def test_the_sequence_rule_reads_strides_and_refuses_a_single_resolution():
    from torch import nn

    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=(2, 2)), nn.ReLU(),
                                 nn.MaxPool2d(2))
    # the stem's stride has no block before it; the last block is a stage even though it downsamples itself
    assert default_stages(net) == ["features.1", "features.3", "features.4"]
    flat = nn.Module()
    flat.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="name them"):  # e.g. torchvision's Swin: patch merging has no stride
        default_stages(flat)


@pytest.mark.parametrize(("name", "depth"), [("cs3darknet_s", 4), ("cs3darknet_focus_s", 4), ("cspdarknet53", 5)])
def test_timm_csp_darknets_stages_end_with_the_map_forward_features_gives(name, depth):
    student = build_student(name, 5, source="timm", pretrained=False, image_size=64)
    names = default_stages(student)
    assert names[-depth:] == [f"backbone.stages.{i}" for i in range(depth)]
    shapes = stage_shapes(student, names, (3, 64, 64))
    assert [s[-1] for s in shapes[-depth:]] == [64 // 2 ** (6 - depth + i) for i in range(depth)]
    x = torch.randn(2, 3, 64, 64)
    student.eval()
    with StageTap(student, names[-1:]) as tap, torch.no_grad():
        student(x)
        (last,) = tap.take()
        torch.testing.assert_close(last, student.backbone.forward_features(x))
