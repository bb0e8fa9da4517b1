import pytest
import torch
import torchvision

from pand.errors import ConfigError, WeightsUnavailableError
from pand.students import build_student


@pytest.mark.parametrize(
    "name, source, dim",
    [("resnet18", "auto", 512), ("mobilenet_v2", "torchvision", 1280), ("resnet18", "timm", 512)],
)
def test_feature_width_is_discovered(name, source, dim):
    student = build_student(name, 7, source=source, pretrained=False)
    assert student.feature_dim == dim
    x = torch.randn(2, 3, 32, 32)
    assert student.features(x).shape == (2, dim)
    assert student(x).shape == (2, 7)


def test_any_timm_model_by_name():
    student = build_student("mobilenetv3_small_050", 3, pretrained=False)
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert student.feature_dim == student.linear_cls.in_features


def test_local_imagenet_weights_file_is_loaded(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    student = build_student("resnet18", 5, pretrained=True, weights=str(path))
    torch.testing.assert_close(student.backbone.conv1.weight, reference.conv1.weight)


def test_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "mbv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="does not fit"):
        build_student("resnet18", 5, weights=str(path))


def test_offline_pretrained_says_how_to_go_on(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(WeightsUnavailableError, match="student.pretrained=false"):
        build_student("resnet18", 5, pretrained=True)


def test_unknown_names_are_refused():
    with pytest.raises(ConfigError):
        build_student("not_a_model_anywhere", 5, pretrained=False)
    with pytest.raises(ConfigError, match="student.source"):
        build_student("resnet18", 5, source="keras", pretrained=False)
