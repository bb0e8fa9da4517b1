"""Any backbone as an open-vocabulary student: torchvision's MobileNetV2 (a ``features`` sequence), a timm CSP-Darknet
(KDEOV's YOLO-style backbone) and a timm ResNet, with the conv head on the map the backbone pools and the MLP head on
the pooled feature."""

import pytest
import torch
import torch.nn.functional as F

from pand.distillers import Progress, TeacherContext, build_distiller
from pand.students import build_student
from pand.students.open_vocab import OpenVocabStudent

C, D, B, SIDE = 4, 16, 6, 64

# (name, source, the stage the conv head taps): the module whose output the backbone pools.
BACKBONES = [
    ("mobilenet_v2", "torchvision", "features.18"),  # the final 1x1 conv to 1280 channels
    ("cs3darknet_focus_s", "timm", "stages.3"),
    ("resnet18", "timm", "layer4"),
]
IDS = [b[0] for b in BACKBONES]


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _student(name, source):
    torch.manual_seed(0)
    return build_student(name, C, source=source, pretrained=False, image_size=SIDE)


def _pooled_map(backbone, images):
    """The backbone's own last feature map: timm's forward_features, torchvision's features."""
    forward_features = getattr(backbone, "forward_features", None) or backbone.features
    return forward_features(images)


def _first_conv(module):
    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize(("name", "source", "stage"), BACKBONES, ids=IDS)
def test_the_conv_head_taps_the_map_the_backbone_pools(name, source, stage):
    model = OpenVocabStudent(_student(name, source), D, head="conv", input_size=(3, SIDE, SIDE)).eval()
    assert model.stage == stage
    images = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        tokens = model.visual_tokens(images)
        reference = _pooled_map(model.backbone, images)
        pooled = model.backbone(images)
    assert reference.dim() == 4 and reference.shape[-1] == SIDE // 32  # stride 32: the deepest map, not a stage before
    torch.testing.assert_close(tokens, reference.flatten(2).transpose(1, 2))
    # ... and it is what the backbone average-pools into its feature.
    torch.testing.assert_close(reference.mean((2, 3)), pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["conv", "mlp"])
@pytest.mark.parametrize(("name", "source", "stage"), BACKBONES, ids=IDS)
def test_embeddings_are_unit_vectors_and_train_the_whole_backbone(name, source, stage, head):
    student = _student(name, source)
    model = OpenVocabStudent(student, D, head=head, vocabulary=_unit(C, D, seed=0), input_size=(3, SIDE, SIDE))
    channels = model.head[0].in_channels
    assert channels == (_pooled_map(model.backbone, torch.zeros(1, 3, SIDE, SIDE)).shape[1] if head == "conv"
                        else student.feature_dim)
    images = torch.randn(B, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    e = model.embed(images)
    assert e.shape == (B, D)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(B))
    assert model(images).shape == (B, C)
    (e @ _unit(D, seed=2)).sum().backward()
    grad = _first_conv(model.backbone).weight.grad
    assert grad is not None and grad.abs().sum() > 0  # the gradient reaches the stem through every block


@pytest.mark.parametrize("head", ["conv", "mlp"])
@pytest.mark.parametrize(("name", "source", "stage"), BACKBONES, ids=IDS)
def test_a_few_openvocab_steps_lower_the_loss(name, source, stage, head):
    context = TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=_unit(C, D, seed=0))
    distiller = build_distiller({"name": "openvocab", "head": head, "dropout": 0.0}, _student(name, source), C,
                                context)
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.randn(B, 3, SIDE, SIDE, generator=g), "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    teacher = {"image_embeds": _unit(B, D, seed=4)}
    optimizer = torch.optim.Adam(distiller.parameters(), lr=1e-3)

    # Train mode throughout, without dropout: batch statistics of a fixed batch make the loss a function of the weights.
    def loss():
        out = distiller.training_losses(batch, teacher, Progress(0, 1))
        assert set(out.losses) == {"distill", "align", "icl"}  # the method's default terms
        return sum(out.losses.values())

    distiller.train()
    losses = []
    for _ in range(5):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    with torch.no_grad():
        final = loss().item()
    assert final < 0.9 * losses[0], (losses, final)
