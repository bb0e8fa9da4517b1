"""``pand teacher text-tower``: a small open_clip text tower distilled from an open-vocabulary run's teacher, trained on
texts that never hold a held-out class name, selected on val texts, with its agreement with the teacher's text tower
on the run's images; and ``pand export format=open_clip text_tower=DIR``, which exports the student with it."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import pand.text_tower_fit as fitting
from pand.cli import main
from pand.deploy import load_student
from pand.engine.data import PandDataModule
from pand.errors import MismatchError
from pand.export import export_student
from pand.io import atomic_write_bytes, is_output_folder
from pand.teachers import load_clip_teacher
from pand.teachers.registry import load_teacher
from pand.teachers.text_tower import (
    build_tower,
    default_size,
    load_text_tower,
    tower_meta,
    tower_text_cfg,
    vocabulary_words,
    weights_bytes,
)
from tests import test_export_open_clip as export_tests
from tests.engine import test_eval_open_vocab as eval_tests
from tests.engine.conftest import tiny_overrides
from tests.test_cli import run_in_clean_interpreter

# The runs the open_clip export tests and the open-vocabulary eval tests train: a 3-class resnet18 with
# method.head=linear (exportable), and a 10-class base-to-novel run (5 base, 5 novel classes).
resnet18_ckpt = export_tests.resnet18_ckpt
trained = eval_tests.trained

FEW_WORDS = 1500  # of the tokenizer's ~32,000: a fit of a few seconds
FAST = {"steps": 30, "batch_size": 64, "lr": 3e-3}


def _fit(ckpt, out, **options):
    # The first words of the vocabulary only, so that the teacher embeds a corpus of seconds, not of minutes.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fitting, "vocabulary_words", lambda tok: vocabulary_words(tok)[:FEW_WORDS])
        return fitting.fit_text_tower(ckpt, out, **{**FAST, **options})


@pytest.fixture(scope="module")
def split_run(trained):
    return trained[1] / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def split_tower(split_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tower") / "tower"
    return out, _fit(split_run, out)


@pytest.fixture(scope="module")
def export_tower(resnet18_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("tower") / "tower"
    _fit(resnet18_ckpt, out)
    return out


# -- the corpus ----------------------------------------------------------------------------------------------------
def test_the_corpus_holds_the_base_names_and_no_word_of_a_novel_name(split_run, tmp_path):
    loaded = load_student(split_run)
    data = PandDataModule(loaded.config["data"], seed=int(loaded.config["seed"]))
    templates = loaded.config["data"]["templates"]
    base, novel = fitting.run_vocabulary(data)
    assert len(base) == len(novel) == 5 and not set(base) & set(novel)
    # words that only a novel name has ("Black footed Albatross": black, footed; "Red winged Blackbird": red, ...):
    # common words the tokenizer's vocabulary holds, so the rule has something to remove
    template_words = set().union(*(fitting.words_of(t.replace("{}", " ")) for t in templates))
    novel_only = set().union(*map(fitting.words_of, novel)) - set().union(*map(fitting.words_of, base)) - template_words
    tokenizer = open_clip.get_tokenizer("pand-tiny-vit")
    vocabulary = vocabulary_words(tokenizer)
    assert {"black", "red", "least", "winged"} <= novel_only & set(vocabulary)

    user = tmp_path / "texts.txt"
    user.write_text("a small bird on a branch\na red bird on a branch\n\n")
    corpus = fitting.run_corpus(data, templates, tokenizer, user)
    texts = corpus.train + corpus.val
    assert all(not fitting.words_of(text) & novel_only for text in texts)
    assert not any(name.lower() in text.lower() for name in novel for text in texts)
    # the base names are there, in every template, and always train
    assert {t.format(name) for name in base for t in templates} <= set(corpus.train)
    counts = corpus.counts
    assert counts["class_prompts"] == len(base) * len(templates)
    removed = sum(1 for w in vocabulary if w in set().union(*map(fitting.words_of, novel)))
    assert counts["held_out_words_removed"] == removed > 0
    assert counts["words"] == len(vocabulary) - removed - counts["duplicates"]
    assert counts["corpus_file"] == 1 and counts["held_out_texts_removed"] == 1  # "a red bird ..." left out
    assert "a small bird on a branch" in texts
    # one text in twenty is val, the same texts whatever else is in the corpus
    assert 0.04 < len(corpus.val) / len(texts) < 0.06
    again = fitting.build_corpus(base, templates, novel, words=vocabulary[:3000])
    assert set(again.val) <= set(corpus.val)


def test_build_corpus_counts_each_source_and_keeps_held_out_captions_out():
    corpus = fitting.build_corpus(["cat", "dog"], ["a photo of a {}.", "a {} photo."], ["tiger shark"],
                                  words=["tiger", "house", "shark", "tree"],
                                  captions=["a cat on a mat", "a tiger in the grass", "a cat on a mat", "a photo."],
                                  user_texts=["a shark", "a boat"])
    texts = corpus.train + corpus.val
    assert corpus.counts == {"class_prompts": 4, "captions": 2, "words": 2, "corpus_file": 1,
                             "held_out_words_removed": 2, "held_out_texts_removed": 2, "duplicates": 1}
    assert not any({"tiger", "shark"} & fitting.words_of(t) for t in texts)
    assert corpus.train[:4] == ["a photo of a cat.", "a cat photo.", "a photo of a dog.", "a dog photo."]
    record = corpus.record()
    assert record["train"] + record["val"] == len(texts) == 9 and len(record["sha256"]) == 64


# -- the tower -----------------------------------------------------------------------------------------------------
def test_the_tower_is_open_clips_text_tower_with_the_teachers_tokens_and_a_clips_text_keys(tiny_teacher):
    teacher_cfg = open_clip.get_model_config("pand-tiny-vit")
    cfg = tower_text_cfg(teacher_cfg["text_cfg"])
    assert default_size(teacher_cfg["text_cfg"]) == {"width": 16, "heads": 1, "layers": 1}
    assert default_size({"width": 512, "layers": 12}) == {"width": 256, "heads": 4, "layers": 4}  # ViT-B/16's
    assert {k: cfg[k] for k in ("context_length", "vocab_size")} == {"context_length": 32, "vocab_size": 49408}
    tower = build_tower(cfg, 32)
    assert type(tower).__name__ == "TextTransformer"
    clip = open_clip.model.CLIP(32, teacher_cfg["vision_cfg"], cfg)
    text_keys = {k for k in clip.state_dict() if not k.startswith("visual.") and k != "logit_scale"}
    assert set(tower.state_dict()) == text_keys
    # a CustomTextCLIP keeps the same tower under text., where the export puts it for such a teacher
    custom = open_clip.model.CustomTextCLIP(32, teacher_cfg["vision_cfg"], cfg)
    assert {k for k in custom.state_dict() if k.startswith("text.")} == {f"text.{k}" for k in tower.state_dict()}
    with pytest.raises(Exception, match="width=30 is not a multiple of heads=4"):
        tower_text_cfg(teacher_cfg["text_cfg"], width=30, heads=4)
    with pytest.raises(Exception, match="Hugging Face model 'bert-base-uncased'"):
        tower_text_cfg({"hf_model_name": "bert-base-uncased"})


# -- fitting -------------------------------------------------------------------------------------------------------
def test_fitting_lowers_the_val_loss_writes_both_files_and_is_deterministic(split_run, split_tower, tmp_path):
    out, record = split_tower
    assert sorted(p.name for p in out.iterdir()) == [".pand-output", "text_tower.json", "text_tower.safetensors"]
    assert is_output_folder(out)
    assert json.loads((out / "text_tower.json").read_text()) == json.loads(json.dumps(record))
    history = record["fit"]["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == FAST["steps"]
    assert record["fit"]["val_loss"] < history[0]["val_loss"]
    assert record["fit"]["val_loss"] == min(h["val_loss"] for h in history)  # selected on val
    assert record["fit"]["class_prompts_in_every_batch"] == 5
    assert record["params"] < record["teacher_text_params"]
    assert record["corpus"]["class_prompts"] == 5 and record["corpus"]["held_out_words_removed"] > 0
    assert record["teacher"] == load_teacher(load_student(split_run).config).identity

    again = _fit(split_run, tmp_path / "again")
    first, second = load_file(str(out / "text_tower.safetensors")), load_file(str(tmp_path / "again" /
                                                                                 "text_tower.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert again["agreement"] == {**record["agreement"], "seconds": again["agreement"]["seconds"]}
    other = _fit(split_run, tmp_path / "seed1", seed=1)
    assert other["fit"]["history"][-1]["val_loss"] != history[-1]["val_loss"]


def _by_hand(tower, names, templates):
    rows = []
    with torch.no_grad():
        for name in names:
            tokens = tower.tokenizer([t.format(name) for t in templates])
            rows.append(F.normalize(F.normalize(tower.tower(tokens), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def test_the_agreement_report_is_an_independent_recomputation_from_the_embeddings(split_run, split_tower):
    out, record = split_tower
    report = record["agreement"]
    loaded = load_student(split_run)
    teacher = load_teacher(loaded.config)
    tower = load_text_tower(out, teacher)
    data = PandDataModule(loaded.config["data"], seed=int(loaded.config["seed"]))
    base, novel = report["classes"]["base"], report["classes"]["novel"]
    templates = loaded.config["data"]["templates"]
    ours, theirs = teacher.class_embeddings(base + novel, templates), _by_hand(tower, base + novel, templates)

    def argmaxes(split, rows):
        ds = data.splits[split]
        with torch.no_grad():
            images = torch.stack([loaded.preprocess(ds.load_image(i)) for i in range(len(ds))])
            e = loaded.model.embed(images)
        return (e @ ours[rows].t()).argmax(1), (e @ theirs[rows].t()).argmax(1), torch.as_tensor(ds.targets)

    b, n = list(range(5)), list(range(5, 10))
    a_t, a_d, y = argmaxes("test", b)
    assert report["test"]["base"]["images"] == len(y)
    assert report["test"]["base"]["agreement"] == pytest.approx(float((a_t == a_d).float().mean()), abs=1e-6)
    assert report["test"]["base"]["top1_teacher_tower"] == pytest.approx(float((a_t == y).float().mean()), abs=1e-6)
    assert report["test"]["base"]["top1_distilled_tower"] == pytest.approx(float((a_d == y).float().mean()), abs=1e-6)
    n_t, n_d, ny = argmaxes("test_novel", n)
    assert report["test"]["novel"]["agreement"] == pytest.approx(float((n_t == n_d).float().mean()), abs=1e-6)
    assert report["test"]["novel"]["top1_distilled_tower"] == pytest.approx(float((n_d == ny).float().mean()), abs=1e-6)
    all_t = torch.cat([argmaxes("test", b + n)[0], argmaxes("test_novel", b + n)[0]])
    all_d = torch.cat([argmaxes("test", b + n)[1], argmaxes("test_novel", b + n)[1]])
    assert report["test"]["all"]["agreement"] == pytest.approx(float((all_t == all_d).float().mean()), abs=1e-6)
    v_t, v_d, _ = argmaxes("val", b)
    assert report["val"]["base"]["agreement"] == pytest.approx(float((v_t == v_d).float().mean()), abs=1e-6)
    assert "novel" not in report["val"]  # a base-to-novel run's val images are base images
    cos = (ours * theirs).sum(-1)
    assert report["class_embedding_cosine"]["novel"] == pytest.approx(float(cos[5:].mean()), abs=1e-5)
    assert report["class_embedding_cosine"]["all"] == pytest.approx(float(cos.mean()), abs=1e-5)


def test_a_closed_set_run_is_refused_with_the_reason(data, tmp_path, capsys):
    closed = tmp_path / "ce"
    assert main(["train", *tiny_overrides(data, closed, "method=ce", "trainer.max_epochs=1", "test=false",
                                          *export_tests.SMALL)]) == 0
    capsys.readouterr()
    assert main(["teacher", "text-tower", f"ckpt_path={closed}/checkpoints/best.ckpt", f"out={tmp_path / 'tt'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a closed-set student (method=ce)" in err
    assert "a text tower serves an open-vocabulary student (method=openvocab)" in err
    assert not (tmp_path / "tt").exists()


# -- export --------------------------------------------------------------------------------------------------------
def test_export_with_the_distilled_tower_loads_in_open_clip_and_gives_pands_similarities(resnet18_ckpt, export_tower,
                                                                                         tmp_path):
    out = tmp_path / "oc"
    meta = export_student(resnet18_ckpt, "open_clip", out, text_tower=export_tower)["student"]
    loaded = load_student(resnet18_ckpt)
    teacher = load_teacher(loaded.config)
    tower = load_text_tower(export_tower, teacher)
    names, templates = loaded.class_names, loaded.config["data"]["templates"]
    x = export_tests._images()
    model, _, tokenizer, theirs = export_tests._open_clip_similarities(out, x, names, templates)
    with torch.no_grad():
        ours = loaded.model.embed(x) @ tower.class_embeddings(names, templates).t()
    assert (theirs - ours).abs().max().item() <= 1e-5
    cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["text_cfg"] == tower.text_cfg and cfg["text_cfg"]["width"] == 16
    exported = model.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in tower.tower.state_dict().items())
    record = meta["open_clip"]["text_tower"]
    assert record["from"] == "distilled" and record["folder"] == str(export_tower)
    assert record["agreement"] == tower.record["agreement"] and record["params"] < record["teacher_text_params"]
    assert meta["open_clip"]["check"]["max_abs_similarity_diff"] <= 1e-5
    # the stored text matrix is the one the exported encode_text makes
    torch.testing.assert_close(torch.tensor(meta["open_vocabulary"]["text_matrix"]),
                               tower.class_embeddings(names, templates), atol=1e-6, rtol=0)
    default = export_student(resnet18_ckpt, "open_clip", tmp_path / "teacher")["student"]
    assert default["open_clip"]["text_tower"]["from"] == "teacher"


def test_a_tower_made_for_another_teacher_is_refused_with_the_reason(resnet18_ckpt, export_tower, tmp_path, capsys):
    other = load_clip_teacher("pand-tiny-vit", "random:1")
    tower = load_text_tower(export_tower, load_teacher(load_student(resnet18_ckpt).config))
    folder = tmp_path / "other"
    folder.mkdir()
    atomic_write_bytes(folder / "text_tower.safetensors", weights_bytes(tower.tower, tower_meta(
        other, tower.text_cfg, 32, False, "x")))
    (folder / "text_tower.json").write_text("{}")
    with pytest.raises(MismatchError, match="distilled from teacher 'pand-tiny-vit' \\(pretrained 'random:1'"):
        load_text_tower(folder, load_teacher(load_student(resnet18_ckpt).config))
    capsys.readouterr()
    out = tmp_path / "oc"
    assert main(["export", f"ckpt_path={resnet18_ckpt}", "format=open_clip", f"out={out}",
                 f"text_tower={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pand export: error: the text tower was distilled from teacher")
    assert "a text tower only stands in for the teacher it was distilled from" in err
    assert not out.exists()


# -- options -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["steps=0"], "steps=0 is not allowed: expected an integer >= 1"),
    (["lr=-1"], "lr=-1 is not allowed: expected a number > 0"),
    (["width=30", "heads=4"], "width=30 is not a multiple of heads=4"),
    (["warm_start=maybe"], "warm_start='maybe' is not allowed: expected true or false"),
    (["contrastive_weight=-0.5"], "contrastive_weight=-0.5 is not allowed: expected a number >= 0"),
    (["device=tpu"], "device='tpu' is not allowed: expected auto, cpu, cuda, cuda:N or mps"),
    (["corpus={missing}"], "corpus='{missing}': no such file"),
    (["widht=8"], "unknown argument 'widht=8'; did you mean width=...?"),
])
def test_option_errors_are_one_line(extra, message, tmp_path, capsys):
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"never read")
    missing = str(tmp_path / "missing.txt")
    argv = ["teacher", "text-tower", f"ckpt_path={ckpt}", f"out={tmp_path / 'out'}",
            *(e.format(missing=missing) for e in extra)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("pand teacher: error: ") and message.format(missing=missing) in captured.err


def test_export_text_tower_option_errors_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"never read")
    (tmp_path / "empty").mkdir()
    for extra, message in ((["format=onnx", f"text_tower={tmp_path}"], "chooses the text tower of format=open_clip"),
                           (["format=open_clip", f"text_tower={tmp_path / 'nothing'}"], "no such folder"),
                           (["format=open_clip", f"text_tower={tmp_path / 'empty'}"],
                            "is not a text tower folder: it has no text_tower.safetensors or text_tower.json")):
        assert main(["export", f"ckpt_path={ckpt}", f"out={tmp_path / 'out'}", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv", [["teacher", "--help"], ["teacher", "text-tower", "--help"]])
def test_help_is_printed_without_importing_torch(argv):
    rc, out, err, heavy = run_in_clean_interpreter(*argv)
    assert rc == 0 and heavy == [], err
    assert "text-tower" in out and "usage" in out
    if argv[-2:] == ["text-tower", "--help"]:
        assert "ckpt_path=PATH" in out and "warm_start=true" in out and "text_tower=DIR" in out


def test_the_words_of_a_hugging_face_tokenizers_vocabulary():
    """open_clip's HFTokenizer keeps the transformers tokenizer as ``.tokenizer``: its entries carry a word-start mark
    (BPE ``Ġ``, SentencePiece ``▁``) and WordPiece continuations start with ``##``; a stand-in with such a vocabulary
    (nothing downloaded)."""
    from types import SimpleNamespace

    vocab = {"Ġshirt": 0, "▁Dress": 1, "##ing": 2, "Ġa": 3, "Ġ123": 4, "[CLS]": 5, "boot": 6, "shirt": 7, "Ġcafé": 8}
    hf = SimpleNamespace(tokenizer=SimpleNamespace(get_vocab=lambda: vocab))
    assert vocabulary_words(hf) == ["shirt", "dress", "boot"]  # once each, in vocabulary order, lower-cased


def test_data_overrides_rebuild_the_runs_data_from_where_it_moved(resnet18_ckpt, tmp_path, monkeypatch, capsys):
    import shutil

    config = torch.load(resnet18_ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["config"]
    moved = tmp_path / "moved"
    shutil.copytree(config["data"]["root"], moved)
    roots = []
    original = fitting.PandDataModule

    def recording(cfg, **kwargs):
        roots.append(cfg["root"])
        return original(cfg, **kwargs)

    monkeypatch.setattr(fitting, "PandDataModule", recording)
    monkeypatch.setattr(fitting, "vocabulary_words", lambda tok: vocabulary_words(tok)[:FEW_WORDS])
    argv = ["teacher", "text-tower", f"ckpt_path={resnet18_ckpt}", f"out={tmp_path / 'tower'}", "steps=2",
            f"data.root={moved}", "data.num_workers=0"]
    assert main(argv) == 0, capsys.readouterr().err
    assert roots and set(roots) == {str(moved)}
    assert json.loads(capsys.readouterr().out)["options"]["steps"] == 2


def test_a_misspelt_data_override_is_refused_with_the_setting_meant(resnet18_ckpt, tmp_path, capsys):
    argv = ["teacher", "text-tower", f"ckpt_path={resnet18_ckpt}", f"out={tmp_path / 'tower'}", "data.rot=/elsewhere"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data.rot: the run's data section has no such setting; did you mean data.root?" in err
    assert not (tmp_path / "tower" / "text_tower.safetensors").exists()
