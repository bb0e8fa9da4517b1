"""pand's CIFAR networks (32-px KD protocol): sizes against the published ones, shapes, factory integration."""

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from pand.errors import ConfigError, WeightsUnavailableError
from pand.networks.cifar import create_cifar_model, list_cifar_models
from pand.networks.stages import default_stages, stage_shapes
from pand.students import build_student

# Parameter counts (millions, CIFAR-100 head) as published for the CRD benchmark (Tian et al., "Contrastive
# Representation Distillation", ICLR 2020) and the mdistiller tables that reuse its networks; they are an
# independent check of the architectures, which were written from the papers' descriptions.
# wrn_28_10: 36.5 M, Zagoruyko & Komodakis, "Wide Residual Networks" (2016), table of CIFAR results.
PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23,  # CRD / mdistiller
    "resnet32x4": 7.43,  # CRD / mdistiller
    "resnet56": 0.86,  # CRD / mdistiller
    "resnet110": 1.73,  # CRD / mdistiller
    "resnet20": 0.28,  # CRD / mdistiller
    "wrn_40_2": 2.26,  # CRD / mdistiller
    "wrn_16_2": 0.70,  # CRD / mdistiller
    "wrn_40_1": 0.57,  # CRD / mdistiller
    "wrn_28_10": 36.5,  # WRN paper
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_the_published_one(name):
    model = create_cifar_model(name, 100)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.01)


def test_registry_lists_the_kd_networks():
    names = list_cifar_models()
    for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                 "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"):
        assert name in names
    with pytest.raises(ConfigError, match="resnet8x4"):
        create_cifar_model("resnet9", 10)


# Stage outputs at 32 px (per sample): stage1 keeps 32x32, stage2 and stage3 halve it.
STAGE_SHAPES = {
    "resnet8x4": {"stem": (32, 32, 32), "stage1": (64, 32, 32), "stage2": (128, 16, 16), "stage3": (256, 8, 8),
                  "pool": (256,)},
    "resnet20": {"stem": (16, 32, 32), "stage1": (16, 32, 32), "stage2": (32, 16, 16), "stage3": (64, 8, 8),
                 "pool": (64,)},
    "wrn_16_2": {"stem": (16, 32, 32), "stage1": (32, 32, 32), "stage2": (64, 16, 16), "stage3": (128, 8, 8),
                 "pool": (128,)},
}


@pytest.mark.parametrize("name", sorted(STAGE_SHAPES))
def test_logits_and_stage_features_at_32_px(name):
    model = create_cifar_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = STAGE_SHAPES[name]
    extractor = create_feature_extractor(model, return_nodes=[*expected, "fc"])
    with torch.no_grad():
        out = extractor(x)
        logits = model(x)
    assert logits.shape == (2, 10)
    assert {k: tuple(v.shape[1:]) for k, v in out.items() if k != "fc"} == expected
    torch.testing.assert_close(out["fc"], logits)


@pytest.mark.parametrize("source", ["cifar", "auto"])
def test_build_student_from_the_cifar_source(source):
    student = build_student("resnet8x4", 10, source=source, pretrained=False)
    assert student.feature_dim == 256
    x = torch.randn(2, 3, 32, 32)
    assert student.features(x).shape == (2, 256)
    assert student(x).shape == (2, 10)
    names = default_stages(student)
    assert names == ["backbone.stage1", "backbone.stage2", "backbone.stage3"]
    assert stage_shapes(student, names, (3, 32, 32)) == [(64, 32, 32), (128, 16, 16), (256, 8, 8)]


def test_pretrained_cifar_student_says_how_to_go_on():
    with pytest.raises(WeightsUnavailableError, match="student.pretrained=false.*student.weights="):
        build_student("resnet8x4", 10, source="cifar", pretrained=True)
    with pytest.raises(ConfigError, match="CIFAR"):
        build_student("resnet18", 10, source="cifar", pretrained=False)


def test_local_state_dict_is_loaded_and_a_foreign_one_refused(tmp_path):
    reference = create_cifar_model("wrn_16_1", 100)
    path = tmp_path / "wrn_16_1.pth"
    torch.save(reference.state_dict(), path)
    student = build_student("wrn_16_1", 10, source="cifar", weights=str(path))  # pretrained=True + a file: the file
    torch.testing.assert_close(student.backbone.stage2[0].conv1.weight, reference.stage2[0].conv1.weight)
    other = tmp_path / "resnet8.pth"
    torch.save(create_cifar_model("resnet8", 100).state_dict(), other)
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        build_student("wrn_16_1", 10, source="cifar", weights=str(other))


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2"])
def test_backward_reaches_every_parameter(name):
    student = build_student(name, 10, source="cifar", pretrained=False).train()
    loss = torch.nn.functional.cross_entropy(student(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [n for n, p in student.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
