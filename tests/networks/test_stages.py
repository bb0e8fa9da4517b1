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


# (name, source, stages at 32 px): the last block of each resolution, the deepest one the map the network pools.
NETWORKS = [
    ("mobilenet_v2", "torchvision", [f"features.{i}" for i in (1, 3, 6, 13, 18)]),  # 18: the 1x1 conv to 1280
    ("mobilenet_v3_small", "torchvision", [f"features.{i}" for i in (0, 1, 3, 8, 12)]),
    ("efficientnet_b0", "torchvision", [f"features.{i}" for i in (1, 2, 3, 5, 8)]),
    ("convnext_tiny", "torchvision", [f"features.{i}" for i in (1, 3, 5, 7)]),  # not the downsample layers 2, 4, 6
    ("regnet_y_400mf", "torchvision", ["stem", *(f"trunk_output.block{i}" for i in range(1, 5))]),
    ("mnasnet0_5", "torchvision", [f"layers.{i}" for i in (7, 8, 9, 11, 16)]),
    ("densenet121", "torchvision", [f"features.{n}" for n in ("relu0", "denseblock1", "denseblock2", "denseblock3",
                                                             "norm5")]),
    ("regnety_002", "timm", ["stem", "s1", "s2", "s3", "s4"]),
    ("cs3darknet_focus_s", "timm", ["stem.conv1", *(f"stages.{i}" for i in range(4))]),
    # timm's feature_info ends at blocks.6 (320 channels); conv_head and bn2 follow before the pool
    ("mobilenetv2_050", "timm", ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "bn2"]),
]


def _last_map_and_pooled(student, x):
    """The last stage's map from a forward pass, and the reference it must equal: timm's forward_features, the input
    of torchvision's avgpool, or (functional pooling) the pooled feature as the mean of the map."""
    backbone = student.backbone
    last_stage = default_stages(student, tuple(x.shape[1:]))[-1]
    seen = []
    pool = getattr(backbone, "avgpool", None)
    hook = pool.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if pool is not None else None
    with StageTap(student, [last_stage]) as tap, torch.no_grad():
        pooled = backbone(x)
        (last,) = tap.take()
        if hasattr(backbone, "forward_features"):
            return last, backbone.forward_features(x)
    if hook is not None:
        hook.remove()
        return last, seen[0]
    return last.mean((2, 3)), pooled


@pytest.mark.parametrize(("name", "source", "expected"), NETWORKS, ids=[n[0] for n in NETWORKS])
def test_the_dry_run_finds_the_last_block_of_each_resolution_ending_with_the_pooled_map(name, source, expected):
    torch.manual_seed(0)
    student = build_student(name, 5, source=source, pretrained=False, image_size=32).eval()
    names = default_stages(student)
    assert names == [f"backbone.{n}" for n in expected]
    sides = [s[-1] for s in stage_shapes(student, names, (3, 32, 32))]
    assert sides == sorted(set(sides), reverse=True) and sides[-1] == 1  # strictly shrinking, down to 32 / 32
    got, reference = _last_map_and_pooled(student, torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(got, reference)


def test_the_dry_run_reads_plain_modules_and_refuses_a_single_resolution_or_growing_maps():
    from torch import nn

    class Net(nn.Module):
        def __init__(self, features):
            super().__init__()
            self.features, self.pool, self.fc = features, nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.pool(self.features(x)).flatten(1))

    net = Net(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=(2, 2)), nn.ReLU(),
                            nn.Dropout(), nn.MaxPool2d(2)))
    # the stem's stride has no block before it; the last block is a stage even though it downsamples itself
    assert default_stages(net) == ["features.1", "features.3", "features.5"]
    flat = Net(nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()))
    with pytest.raises(ConfigError, match="do not shrink.*name them"):
        default_stages(flat)
    # channels-last maps (torchvision's Swin) read as [B, H, W, C] would "grow" in C: refused, not misread
    from torchvision.models import SwinTransformer

    swin = SwinTransformer([4, 4], 8, [1, 1, 1, 1], [1, 1, 1, 1], [2, 2])
    with pytest.raises(ConfigError, match="do not shrink.*name them"):
        default_stages(swin)


def test_the_dry_run_leaves_modes_random_state_and_hooks_as_they_were():
    student = build_student("mobilenet_v2", 5, source="torchvision", pretrained=False, image_size=32).train()
    student.backbone.features[3].eval()
    modes = {name: m.training for name, m in student.named_modules()}
    rng = torch.get_rng_state()
    default_stages(student)
    assert {name: m.training for name, m in student.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_hooks for m in student.modules())


def test_unknown_stage_names_are_listed_with_the_paths_near_them():
    from pand.networks.stages import check_stage_names

    student = build_student("mobilenet_v2", 5, source="torchvision", pretrained=False, image_size=32)
    with pytest.raises(ConfigError, match=r"method.stages: Student has no submodule 'backbone.features.19', "
                                          r"'features.6' \(near 'backbone.features.19': .*backbone.features.18.*; "
                                          r"near 'features.6': .*backbone.features.6"):
        check_stage_names(student, ["backbone.features.19", "features.6", "backbone.features.3"], "method.stages")
    with pytest.raises(ConfigError, match="must be a list of submodule paths.*got 'backbone.features.6'"):
        check_stage_names(student, "backbone.features.6", "method.stages")
    assert check_stage_names(student, ("backbone.features.6",)) == ["backbone.features.6"]


def test_open_clips_timm_tower_is_looked_into():
    from torch import nn

    tower = nn.Module()
    tower.trunk = build_student("regnety_002", 5, source="timm", pretrained=False).backbone
    assert default_stages(tower, 32) == ["trunk.stem", "trunk.s1", "trunk.s2", "trunk.s3", "trunk.s4"]


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
