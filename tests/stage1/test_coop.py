import math

import pytest
import torch
import torch.nn.functional as F

from pand.errors import ConfigError
from pand.stage1.coop import CoopResult, coop_lr, train_coop
from pand.stage1.learner import PromptLearner

NAMES = ["cat", "dog", "red winged blackbird", "T-shirt/top", "airplane"]


def _problem(dim, n_train=160, n_val=80, noise=0.3, seed=1):
    """Separable synthetic features: normalised random class centroids plus noise."""
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(len(NAMES), dim, generator=g), dim=-1)

    def split(n):
        y = torch.arange(n) % len(NAMES)
        return F.normalize(centroids[y] + noise * torch.randn(n, dim, generator=g), dim=-1), y

    return (*split(n_train), *split(n_val))


def _train(teacher, data, *, seed=0, epochs=4, **kw):
    torch.manual_seed(0)
    learner = PromptLearner(teacher.model, teacher.tokenizer, NAMES, n_ctx=4, csc=True)
    result = train_coop(learner, *data, logit_scale=teacher.logit_scale, epochs=epochs, seed=seed, progress=False, **kw)
    return learner, result


@pytest.fixture(scope="module")
def trained(tiny_teacher):
    data = _problem(tiny_teacher.embed_dim)
    return data, *_train(tiny_teacher, data)


def test_training_improves_val_accuracy(trained):
    _, _, result = trained
    assert isinstance(result, CoopResult)
    assert len(result.history) == 4
    first = result.history[0]["val_acc"]
    assert result.val_acc > max(first, result.initial_val_acc) + 0.1
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_result_is_consistent_with_history(trained):
    data, learner, result = trained
    accs = [h["val_acc"] for h in result.history]
    assert [h["epoch"] for h in result.history] == list(range(4))
    assert set(result.history[0]) == {"epoch", "train_loss", "train_acc", "val_acc", "lr"}
    assert result.val_acc == max(accs)
    assert result.best_epoch == accs.index(max(accs))
    # The returned features are normalised, give the reported val accuracy, and the learner holds the best context.
    feats = result.text_features
    assert feats.shape == (len(NAMES), data[0].shape[1]) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(len(NAMES)))
    val_x, val_y = data[2], data[3]
    assert (val_x @ feats.t()).argmax(1).eq(val_y).float().mean().item() == pytest.approx(result.val_acc)
    with torch.no_grad():
        torch.testing.assert_close(learner(), feats, atol=1e-6, rtol=0)


def test_learning_rate_schedule(trained):
    _, _, result = trained
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(1e-5)  # constant warm-up epoch
    assert lrs[1:] == pytest.approx([0.5 * 0.002 * (1 + math.cos(math.pi * e / 4)) for e in (1, 2, 3)])
    assert coop_lr(0, epochs=10, lr=0.1, warmup_epochs=0, warmup_lr=1e-5) == pytest.approx(0.1)
    assert coop_lr(5, epochs=10, lr=0.1, warmup_epochs=2, warmup_lr=1e-5) == pytest.approx(0.05)


def test_deterministic_for_a_seed(tiny_teacher, trained):
    data, _, result = trained
    _, again = _train(tiny_teacher, data)
    assert again.history == result.history
    assert torch.equal(again.text_features, result.text_features)
    _, other = _train(tiny_teacher, data, seed=1, epochs=2)
    assert other.history[1]["train_loss"] != result.history[1]["train_loss"]


def test_bad_inputs_raise_config_error(tiny_teacher):
    tr_x, tr_y, va_x, va_y = _problem(tiny_teacher.embed_dim, n_train=10, n_val=5)
    learner = PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, NAMES, n_ctx=2)
    kw = {"logit_scale": 10.0, "epochs": 1, "progress": False}
    with pytest.raises(ConfigError, match="labels"):
        train_coop(learner, tr_x, tr_y + 10, va_x, va_y, **kw)
    with pytest.raises(ConfigError, match="D ="):
        train_coop(learner, tr_x[:, :8], tr_y, va_x[:, :8], va_y, **kw)
    with pytest.raises(ConfigError, match="empty"):
        train_coop(learner, tr_x, tr_y, va_x[:0], va_y[:0], **kw)
    with pytest.raises(ConfigError, match="epochs"):
        train_coop(learner, tr_x, tr_y, va_x, va_y, logit_scale=10.0, epochs=0, progress=False)


def test_progress_bar_runs(tiny_teacher, capsys):
    tr_x, tr_y, va_x, va_y = _problem(tiny_teacher.embed_dim, n_train=10, n_val=5)
    learner = PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, NAMES, n_ctx=2)
    result = train_coop(learner, tr_x, tr_y, va_x, va_y, logit_scale=10.0, epochs=1, batch_size=4, progress=True)
    assert result.best_epoch == 0
    assert "val_acc" in capsys.readouterr().err


def test_bf16_training_stores_the_fp32_encoding_of_the_best_context(tiny_teacher):
    from pand.teachers.precision import measure_agreement, teacher_autocast

    data = _problem(tiny_teacher.embed_dim)
    learner, result = _train(tiny_teacher, data, epochs=2, precision="bf16")
    assert result.precision == "bf16" and result.text_features.dtype == torch.float32
    with torch.no_grad():
        fp32 = learner()  # the learner holds the best context
        with teacher_autocast("cpu", "bf16"):
            low = learner()
    torch.testing.assert_close(result.text_features, fp32, atol=0, rtol=0)
    stats = result.text_features_agreement
    assert stats == {"precision": "bf16", "tolerance": 0.02, **measure_agreement(fp32, low)}
    assert stats["rows"] == len(NAMES) and 0 < stats["max_rel_error"] <= 0.02
    assert 0 < result.probe_agreement["max_rel_error"] <= 0.02  # checked before training
    val_x, val_y = data[2], data[3]
    assert (val_x @ fp32.t()).argmax(1).eq(val_y).float().mean().item() == pytest.approx(result.val_acc)


def test_low_precision_training_is_refused_before_a_step_when_it_disagrees(tiny_teacher):
    from pand.errors import PrecisionError

    data = _problem(tiny_teacher.embed_dim)
    torch.manual_seed(0)
    learner = PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, NAMES, n_ctx=4, csc=True)
    before = learner.ctx.detach().clone()
    with pytest.raises(PrecisionError, match=r"untrained prompts: the fp16 pass .* > tolerance "
                                             r"prompts.precision_tolerance=1e-09"):
        train_coop(learner, *data, logit_scale=tiny_teacher.logit_scale, epochs=1, progress=False, precision="fp16",
                   tolerance=1e-9)
    assert torch.equal(learner.ctx.detach(), before)


def test_fp16_training_learns_with_a_scaled_loss(tiny_teacher):
    data = _problem(tiny_teacher.embed_dim)
    _, result = _train(tiny_teacher, data, precision="fp16")
    assert result.precision == "fp16" and result.text_features_agreement["max_rel_error"] <= 0.02
    assert result.val_acc > result.initial_val_acc + 0.1
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
