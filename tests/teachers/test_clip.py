import pytest
import torch
import torch.nn.functional as F

from pand.errors import ConfigError, WeightsUnavailableError
from pand.teachers import LiveTeacherSource, load_clip_teacher


def test_teacher_is_frozen_and_stays_in_eval_mode(tiny_teacher):
    tiny_teacher.train()
    assert not tiny_teacher.training and not tiny_teacher.model.training
    parent = torch.nn.Sequential(tiny_teacher)
    parent.train()
    assert not any(m.training for m in tiny_teacher.modules())
    assert not any(p.requires_grad for p in tiny_teacher.parameters())
    out = tiny_teacher.encode_images(torch.randn(2, 3, 32, 32, requires_grad=True))
    assert out.grad_fn is None


def test_embeddings_are_normalised_and_zero_shot_logits_scaled(tiny_teacher):
    img = tiny_teacher.encode_images(torch.randn(3, 3, 32, 32))
    txt = tiny_teacher.class_embeddings(["cat", "dog"], ["a photo of a {}."])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    logits = tiny_teacher.zero_shot_logits(img, txt)
    torch.testing.assert_close(logits, (1 / 0.07) * img @ txt.t())


def test_template_ensemble_is_renormalised_mean(tiny_teacher):
    names, templates = ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    each = [tiny_teacher.encode_texts([t.format(n) for n in names]) for t in templates]
    expected = F.normalize((each[0] + each[1]) / 2, dim=-1)
    torch.testing.assert_close(tiny_teacher.class_embeddings(names, templates), expected)


def test_template_without_placeholder_is_refused(tiny_teacher):
    with pytest.raises(ConfigError, match="no '\\{\\}'"):
        tiny_teacher.class_embeddings(["cat"], ["a photo"])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_through_a_weights_file(tmp_path, tiny_teacher, suffix):
    path = tmp_path / f"teacher{suffix}"
    state = {k: v.contiguous() for k, v in tiny_teacher.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_clip_teacher("pand-tiny-vit", str(path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_images(x), tiny_teacher.encode_images(x))
    assert loaded.identity["weights"] == tiny_teacher.identity["weights"]
    assert loaded.identity["pretrained"].startswith("file:")


def test_random_teachers_are_seeded_and_distinguishable(tiny_teacher):
    torch.manual_seed(123)  # the global RNG does not matter: "random" is seeded with 0
    again = load_clip_teacher("pand-tiny-vit", "random")
    assert again.identity["weights"] == tiny_teacher.identity["weights"]
    other = load_clip_teacher("pand-tiny-vit", "random:1")
    assert other.identity["weights"] != tiny_teacher.identity["weights"]
    with pytest.raises(ConfigError, match="random:<integer seed>"):
        load_clip_teacher("pand-tiny-vit", "random:x")


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="missing.safetensors"):
        load_clip_teacher("pand-tiny-vit", str(tmp_path / "missing.safetensors"))


def test_offline_tag_explains_how_to_supply_weights():
    with pytest.raises(WeightsUnavailableError, match="teacher.pretrained=/path/to"):
        load_clip_teacher("ViT-B-16", "laion2b_s34b_b88k")


def test_unset_pretrained_and_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="teacher.pretrained is not set"):
        load_clip_teacher("pand-tiny-vit", None)
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        load_clip_teacher("no-such-model", "random")
    with pytest.raises(ConfigError, match="neither a file nor a pretrained tag"):
        load_clip_teacher("ViT-B-16", "not_a_tag")


def test_custom_text_teacher_loads():
    teacher = load_clip_teacher("pand-tiny-customtext", "random")
    assert type(teacher.model).__name__ == "CustomTextCLIP"
    assert teacher.class_embeddings(["a", "b", "c"], ["{}"]).shape == (3, 32)


def test_prepare_images_converts_size_and_statistics(tiny_teacher):
    x = torch.rand(2, 3, 32, 32)
    same = tiny_teacher.prepare_images(x, tiny_teacher.mean, tiny_teacher.std)
    assert same is x
    big = tiny_teacher.prepare_images(torch.rand(2, 3, 64, 64), tiny_teacher.mean, tiny_teacher.std)
    assert big.shape == (2, 3, 32, 32)
    # An image normalised with mean 0 / std 1 is re-normalised with the teacher's statistics.
    raw = torch.rand(1, 3, 32, 32)
    conv = tiny_teacher.prepare_images(raw, (0, 0, 0), (1, 1, 1))
    mean = torch.tensor(tiny_teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_teacher.std).view(1, 3, 1, 1)
    torch.testing.assert_close(conv, (raw - mean) / std)


def test_live_source_gives_the_teachers_embeddings(tiny_teacher):
    source = LiveTeacherSource(tiny_teacher, tiny_teacher.mean, tiny_teacher.std)
    x = torch.randn(4, 3, 32, 32)
    out = source({"image": x}, {"image_embeds"})
    torch.testing.assert_close(out["image_embeds"], tiny_teacher.encode_images(x))
    with pytest.raises(ConfigError, match="cannot provide"):
        source({"image": x}, {"text_logits_of_another_kind"})
