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


def _independent_class_embeddings(teacher, names, templates):
    """Every prompt encoded on its own, normalised, averaged over templates, re-normalised: no library code."""
    rows = []
    for name in names:
        per_template = []
        for t in templates:
            with torch.no_grad():
                e = teacher.model.encode_text(teacher.tokenizer([t.format(name)])).float()[0]
            per_template.append(e / e.norm())
        mean = torch.stack(per_template).mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("templates", [["a photo of a {}."],
                                       ["a photo of a {}.", "a drawing of a {}.", "{}, a kind of thing."]])
def test_class_embeddings_match_an_independent_computation(tiny_teacher, monkeypatch, templates):
    import pand.teachers.clip as clip_module

    names = [f"class {i}" for i in range(7)]
    expected = _independent_class_embeddings(tiny_teacher, names, templates)
    got = tiny_teacher.class_embeddings(names, templates)
    assert got.shape == (7, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # several text-tower batches (2 classes of 3 templates per forward) give the same C x D matrix
    monkeypatch.setattr(clip_module, "_TEXTS_PER_FORWARD", 2 * len(templates))
    torch.testing.assert_close(tiny_teacher.class_embeddings(names, templates), expected, atol=1e-6, rtol=0)


def test_class_embeddings_need_class_names(tiny_teacher):
    with pytest.raises(ConfigError, match="class name"):
        tiny_teacher.class_embeddings([], ["a photo of a {}."])


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, and no network at all: any connection attempt fails the test."""
    import socket

    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # huggingface_hub read the variables at import

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_offline_uncached_tag_fails_at_once_without_network(empty_hub_cache, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as e:
        load_clip_teacher("ViT-B-32", "laion2b_s34b_b79k")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "ViT-B-32" in msg and "laion2b_s34b_b79k" in msg and str(empty_hub_cache) in msg
    assert "HF_HUB_OFFLINE=1" in msg and "teacher.pretrained=/path/to/" in msg


def test_network_failure_suggests_offline_mode(empty_hub_cache, monkeypatch):
    import open_clip.pretrained
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):  # what huggingface_hub raises after its retries when DNS fails
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as err:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub") from err

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", unreachable)
    with pytest.raises(WeightsUnavailableError) as e:
        load_clip_teacher("ViT-B-32", "laion2b_s34b_b79k")
    msg = str(e.value)
    assert "ViT-B-32" in msg and "laion2b_s34b_b79k" in msg and "Name or service not known" in msg
    assert "set HF_HUB_OFFLINE=1" in msg and "teacher.pretrained=/path/to/" in msg
