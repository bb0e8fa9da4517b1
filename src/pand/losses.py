"""Loss functions as plain functions on tensors.

Each one is written from the formula of its method's paper (the method is named in each docstring, and the formula
restated there) and unit-tested against an independent computation. All reduce to a scalar, compute in float32
whatever the autocast dtype, and average over the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Names of the two dynamic-weight schedules of VL2Lite (see :func:`vl2lite_weights`).
WEIGHT_SCHEDULES = ("code", "paper")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, KL summed over classes, mean over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * t * t


def vl2lite_visual_loss(student_features: torch.Tensor, condensed_image_embeds: torch.Tensor) -> torch.Tensor:
    """VL2Lite visual KD: ``mean |norm(h) - a_img|`` (L1 averaged over B x d).

    ``student_features`` is the raw pooled feature ``h`` (normalised here); ``condensed_image_embeds`` is
    ``norm(MLP_img(t_img))``.
    """
    return (F.normalize(student_features.float(), dim=-1) - condensed_image_embeds.float()).abs().mean()


def vl2lite_linguistic_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0, scale: float = 0.5
) -> torch.Tensor:
    """VL2Lite linguistic KD: ``scale * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` (batch mean).

    ``scale = 0.5`` is the paper's ``T^2 / 2`` (what the authors' element-wise-mean KLDivLoss times ``C/2`` works out
    to); PAND's code with CoOp features uses ``scale = 1``. The scale is explicit so that nobody depends on a reduction.
    """
    return scale * kd_loss(student_logits, teacher_logits, temperature)


def vl2lite_weights(epoch: int, max_epochs: int, schedule: str = "code") -> tuple[float, float]:
    """VL2Lite's dynamic weights ``(w_cls, w_kd)`` with ``w_kd = 1 - w_cls``.

    ``code``:  ``w_cls = clip(epoch / (8 * max_epochs), 0, 1)``, as the authors' code computes it (w_cls <= 0.125);
               the published numbers come from this form.
    ``paper``: ``w_cls = clip(epoch / (max_epochs / 8), 0, 1)``, the paper's description (CE at full weight after the
               first eighth of training, KD off from then on).
    """
    if max_epochs <= 0:
        raise ValueError(f"max_epochs must be positive, got {max_epochs}")
    if schedule == "code":
        w_cls = epoch / (8.0 * max_epochs)
    elif schedule == "paper":
        w_cls = epoch / (max_epochs / 8.0)
    else:
        raise ValueError(f"unknown VL2Lite weight schedule {schedule!r}; choose one of {WEIGHT_SCHEDULES}")
    w_cls = min(max(w_cls, 0.0), 1.0)
    return w_cls, 1.0 - w_cls


def nlrd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int = 3,
    *,
    pool_student: torch.Tensor | None = None,
    pool_teacher: torch.Tensor | None = None,
    self_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Neighbourhood Logits Relation Distillation (NLRD, the response term of NRKD), as PAND uses it.

    For each sample i, its ``k`` nearest neighbours j are the other samples whose teacher logits have the highest
    cosine similarity to i's. Relation vectors ``d_s = z_s,i - z_s,j`` and ``d_t = z_t,i - z_t,j`` become
    distributions ``q = softmax(d_s)``, ``p = softmax(d_t)``, and the loss is their symmetric Jensen-Shannon
    divergence ``0.5 * (KL(q || m) + KL(p || m))`` with ``m = (p + q) / 2``, averaged over the ``B * k`` pairs.

    Neighbours come from a pool: by default the batch itself; under DDP the logits gathered from every process, with
    ``self_index[i]`` the position of sample i in the pool so that it is not its own neighbour. ``k`` is clamped to
    ``pool size - 1``; ``k < 1`` is an error, never a silent zero. A pool of one sample has no neighbours: the loss
    is then 0 (still attached to the graph), which is what a last batch of size 1 gets.
    """
    s = student_logits.float()
    t = teacher_logits.float()
    ps = s if pool_student is None else pool_student.float()
    pt = t if pool_teacher is None else pool_teacher.float()
    if self_index is None:
        if pool_student is not None or pool_teacher is not None:
            raise ValueError("self_index is required when a neighbour pool is given")
        self_index = torch.arange(s.shape[0], device=s.device)
    if int(k) < 1:
        raise ValueError(f"nlrd_loss needs k >= 1 neighbours, got k={k}")
    k = min(int(k), pt.shape[0] - 1)
    if k < 1:
        return s.sum() * 0.0
    sim = F.normalize(t, dim=-1) @ F.normalize(pt, dim=-1).t()  # [B, P]
    sim = sim.scatter(1, self_index.view(-1, 1), float("-inf"))
    nbr = sim.topk(k, dim=1).indices  # [B, k]
    d_s = s.unsqueeze(1) - ps[nbr]  # [B, k, C]
    d_t = t.unsqueeze(1) - pt[nbr]
    log_q = F.log_softmax(d_s, dim=-1)
    log_p = F.log_softmax(d_t, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    return (0.5 * (kl_q + kl_p)).mean()


def logit_standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (LS, Sun et al., CVPR 2024): z-score each sample's logits over the classes.

    ``z' = (z - mean_c z) / (std_c z + eps)`` with the Bessel-corrected standard deviation (divisor ``C - 1``), as the
    authors' code computes it; the paper writes the population one, which differs by ``sqrt(C / (C - 1))`` and so acts
    like a slightly different temperature. Applied to teacher and student logits separately, before the temperature.
    """
    z = logits.float()
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)


_EXCLUDED = -1e9


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample TCKD and NCKD of Decoupled KD (Zhao et al., CVPR 2022), each already times ``T^2``.

    TCKD is the KL divergence between the binary (target class, all other classes) distributions of teacher and
    student at temperature T. NCKD is the KL divergence between the distributions over the non-target classes alone
    (the target logit removed, the rest renormalised). Classical KD splits exactly into them:
    ``KD = TCKD + (1 - p_t[target]) * NCKD`` per sample, with ``p_t`` the teacher's softmax at T.
    """
    t = float(temperature)
    s, z = student_logits.float() / t, teacher_logits.float() / t
    target_mask = F.one_hot(target, s.shape[-1]).bool()
    log_p_s, log_p_t = F.log_softmax(s, -1), F.log_softmax(z, -1)

    def binary(log_p: torch.Tensor) -> torch.Tensor:
        # log of (p[target], 1 - p[target]), the second as a logsumexp over the other classes for precision
        on = log_p.masked_fill(~target_mask, float("-inf")).logsumexp(-1)
        off = log_p.masked_fill(target_mask, float("-inf")).logsumexp(-1)
        return torch.stack([on, off], -1)

    b_s, b_t = binary(log_p_s), binary(log_p_t)
    tckd = (b_t.exp() * (b_t - b_s)).sum(-1)
    # A finite fill, not -inf: its probability underflows to exactly 0 (so the target drops out), while -inf would
    # make 0 * (-inf - -inf) = NaN in the backward pass.
    q_s = F.log_softmax(s.masked_fill(target_mask, _EXCLUDED), -1)
    q_t = F.log_softmax(z.masked_fill(target_mask, _EXCLUDED), -1)
    nckd = (q_t.exp() * (q_t - q_s)).sum(-1)
    return tckd * t * t, nckd * t * t


def dkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0,
    beta: float = 8.0, temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (see :func:`dkd_terms`), mean over the batch.

    Defaults are the CIFAR-100 ones (alpha 1, beta 8, T 4); the ImageNet R34 -> R18 recipe uses beta 0.5, T 1. The
    warm-up factor ``min(epoch / warmup, 1)`` belongs to the training schedule and is applied by the distiller.
    """
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return (float(alpha) * tckd + float(beta) * nckd).mean()


def ofa_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, eps: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """OFA-KD's adaptive target loss (Hao et al., NeurIPS 2023), mean over the batch.

    ``-sum_c [(p_t + y)^eps - y]_c * log p_s,c`` with ``y`` the one-hot label and ``p_t``, ``p_s`` the softmaxes at
    T. ``eps = 1`` is cross-entropy against the teacher's soft labels; ``eps > 1`` raises the weight of the target
    class where the teacher is unsure of it.
    """
    t = float(temperature)
    y = F.one_hot(target, student_logits.shape[-1]).float()
    p_t = F.softmax(teacher_logits.float() / t, -1)
    log_p_s = F.log_softmax(student_logits.float() / t, -1)
    weight = (p_t + y).pow(float(eps)) - y
    return -(weight * log_p_s).sum(-1).mean()


# -- feature losses of the heterogeneous-distillation family --------------------------------------------------------
def token_grid_side(num_tokens: int, prefix_tokens: int | None = None) -> tuple[int, int]:
    """``(side, prefix)`` of a ViT/MLP token sequence: ``prefix`` leading tokens, then a ``side x side`` patch grid.

    With ``prefix_tokens=None`` the prefix is detected from the count alone: ``N`` a perfect square means no prefix
    (MLP-Mixer, ResMLP, a ViT without class token), ``N - 1`` a perfect square means one class token first (ViT,
    DeiT). No count has both readings beyond ``N = 1`` (consecutive squares differ by at least 3 from there), so the
    rule is unambiguous. Other layouts (a distillation token, registers) must pass ``prefix_tokens`` explicitly.
    """
    n = int(num_tokens)
    candidates = (0, 1) if prefix_tokens is None else (int(prefix_tokens),)
    for prefix in candidates:
        side = math.isqrt(max(n - prefix, 0))
        if prefix >= 0 and side > 0 and side * side == n - prefix:
            return side, prefix
    if prefix_tokens is None:
        raise ValueError(f"{n} tokens are neither a square patch grid nor one class token plus a square grid; "
                         "pass prefix_tokens for other layouts")
    raise ValueError(f"{n} tokens minus {prefix_tokens} prefix tokens do not form a square patch grid")


def tokens_to_map(tokens: torch.Tensor, prefix_tokens: int | None = None) -> torch.Tensor:
    """The patch tokens of ``[B, N, C]`` as a ``[B, C, s, s]`` map, prefix tokens (class token) dropped.

    The prefix is found as in :func:`token_grid_side`; patches are taken in row-major order, as ViTs flatten them.
    """
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens [B, N, C], got shape {tuple(tokens.shape)}")
    b, n, c = tokens.shape
    side, prefix = token_grid_side(n, prefix_tokens)
    return tokens[:, prefix:].transpose(1, 2).reshape(b, c, side, side)


def _as_map(feat: torch.Tensor) -> torch.Tensor:
    # Feature losses work on [B, C, H, W] grids; token features are laid out as their patch grid first.
    if feat.dim() == 4:
        return feat
    if feat.dim() == 3:
        return tokens_to_map(feat)
    raise ValueError(f"expected a feature map [B, C, H, W] or tokens [B, N, C], got shape {tuple(feat.shape)}")


def _neighbour_map(feat: torch.Tensor) -> torch.Tensor:
    """Per sample, the flattened channel-mean squared differences to the right and lower neighbours, L2-normalised."""
    right = feat[..., :, 1:] - feat[..., :, :-1]  # [B, C, H, W-1]
    down = feat[..., 1:, :] - feat[..., :-1, :]  # [B, C, H-1, W]
    energy = torch.cat([right.pow(2).mean(1).flatten(1), down.pow(2).mean(1).flatten(1)], dim=1)
    return F.normalize(energy, dim=1)


def nrkd_feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """NRKD's feature term for one stage: match the local-contrast pattern of student and teacher.

    For a map ``x`` of shape ``[C, H, W]`` (one sample), the neighbours of position ``(h, w)`` are its right
    neighbour ``(h, w + 1)`` and its lower neighbour ``(h + 1, w)``, where they exist. The neighbour maps are

        ``r[h, w] = mean_c (x[c, h, w + 1] - x[c, h, w])^2``   (``H x (W - 1)`` values)
        ``d[h, w] = mean_c (x[c, h + 1, w] - x[c, h, w])^2``   (``(H - 1) x W`` values),

    concatenated into one vector ``v`` per sample and divided by its L2 norm (a map with no contrast stays 0). The loss
    is the mean squared error between the student's and the teacher's ``v``, averaged over entries and batch.

    The channel mean makes maps of different widths comparable, so the channel counts may differ. If the spatial
    sizes differ, both features are adaptive-average-pooled to the smaller size (``min`` of each side) before the
    differences are taken. Token features ``[B, N, C]`` are laid out as their square patch grid first; a class token
    (detected as in :func:`token_grid_side`) has no spatial neighbours and is dropped.
    """
    s, t = _as_map(student_feat).float(), _as_map(teacher_feat).float()
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"batch sizes differ: student {tuple(student_feat.shape)}, "
                         f"teacher {tuple(teacher_feat.shape)}")
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if size[0] * size[1] < 2:
        raise ValueError(f"neighbour differences need at least 2 positions; student {tuple(student_feat.shape)}, "
                         f"teacher {tuple(teacher_feat.shape)}")
    if s.shape[2:] != size:
        s = F.adaptive_avg_pool2d(s, size)
    if t.shape[2:] != size:
        t = F.adaptive_avg_pool2d(t, size)
    return F.mse_loss(_neighbour_map(s), _neighbour_map(t))


#: Pooled sizes of the hierarchical context loss, fine to coarse.
HCL_LEVELS = (4, 2, 1)


def hcl_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss (ReviewKD, reused by PAT) between an aligned student feature and a teacher feature.

    ``L = (MSE(s, t) + sum_k w_k MSE(pool_k(s), pool_k(t))) / (1 + sum_k w_k)`` where ``pool_k`` is adaptive average
    pooling to ``4 x 4``, ``2 x 2`` and ``1 x 1`` and the weights halve level by level: ``1/2, 1/4, 1/8``. For maps
    larger than 4 x 4 that is ``(MSE + MSE_4/2 + MSE_2/4 + MSE_1/8) / 1.875``. As in ReviewKD, a level is used only when
    it is strictly coarser than the map on both sides (pooling a 4 x 4 map to 4 x 4 would merely repeat the full-size
    term, and to anything larger would upsample); the halving then continues over the levels actually used, so a
    4 x 4 map gives ``(MSE + MSE_2/2 + MSE_1/4) / 1.75`` and a 1 x 1 map plain MSE.

    Shapes must match exactly (aligning them is the aligner's job). ``[B, C, H, W]`` maps are pooled directly; for
    tokens ``[B, N, C]`` the full-resolution term covers every token, class token included, and the pooled terms the
    square patch grid (see :func:`token_grid_side`).
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"hcl_loss needs equal shapes, got student {tuple(student_feat.shape)} and teacher "
                         f"{tuple(teacher_feat.shape)}")
    s, t = student_feat.float(), teacher_feat.float()
    total, weight_sum = F.mse_loss(s, t), 1.0
    s_map, t_map = _as_map(s), _as_map(t)
    weight = 1.0
    for level in HCL_LEVELS:
        if level >= min(s_map.shape[2], s_map.shape[3]):
            continue
        weight /= 2.0
        pooled = F.mse_loss(F.adaptive_avg_pool2d(s_map, level), F.adaptive_avg_pool2d(t_map, level))
        total = total + weight * pooled
        weight_sum += weight
    return total / weight_sum


def embedding_distill_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor,
                           kind: str = "cosine") -> torch.Tensor:
    """Feature distillation in the teacher's embedding space (KDEOV; CLIP-KD's strongest single loss).

    Both embeddings are L2-normalised first. ``cosine``: ``mean_b (1 - cos(e_s, t_img))``; ``l2``: the mean squared
    error of the normalised vectors, averaged over the batch and the D components (MSE = ``2 (1 - cos) / D``, so
    the two differ by a constant factor and in nothing else).
    """
    s = F.normalize(student_embeds.float(), dim=-1)
    t = F.normalize(teacher_embeds.float(), dim=-1)
    if kind == "cosine":
        return (1 - (s * t).sum(-1)).mean()
    if kind == "l2":
        return F.mse_loss(s, t)
    raise ValueError(f"embedding distillation is 'cosine' or 'l2', got {kind!r}")


def label_infonce_loss(similarity: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                       symmetric: bool = True) -> torch.Tensor:
    """Image-text InfoNCE against class text embeddings, with class labels as targets.

    ``similarity`` is ``[B, C]``: cosine of each image embedding with each class text embedding. The image -> text
    term is ``CE(sim / tau, y)``: one row per class, so two images of the same class are never each other's negative.
    With ``symmetric``, the text -> image term treats every class present in the batch as a query over the batch's
    images, with all images of that class as positives: ``-mean_{i: y_i = c} log softmax_i(sim[:, c] / tau)``,
    averaged over the classes present; the loss is then the mean of the two directions (the CLIP form).
    """
    logits = similarity.float() / float(temperature)
    image_to_text = F.cross_entropy(logits, labels)
    if not symmetric:
        return image_to_text
    present = torch.unique(labels)
    column_logp = F.log_softmax(logits[:, present], dim=0)  # over images, per present class
    positive = (labels.unsqueeze(1) == present.unsqueeze(0)).float()  # [B, K]
    text_to_image = -((column_logp * positive).sum(0) / positive.sum(0)).mean()
    return 0.5 * (image_to_text + text_to_image)


def _float_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` in float32 even under autocast: a bf16 product keeps about 3 digits, which a temperature of 0.07
    turns into logit errors of about 0.05."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        return a.float() @ b.float().t()


def interactive_contrastive_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor,
                                 temperature: float = 0.07) -> torch.Tensor:
    """Interactive contrastive learning (ICL; CLIP-KD, Yang et al., CVPR 2024), image form.

    With ``s_i`` and ``t_i`` the L2-normalised student and teacher image embeddings of sample ``i`` of a batch of
    ``B``: each student embedding is an anchor whose positive is the teacher's embedding of the same image and whose
    negatives are the teacher's embeddings of the batch's other images, ``-mean_i log softmax_j(s_i . t_j / tau)[i]``.
    CLIP-KD contrasts the student's image embedding with the teacher's embeddings of the batch's paired captions; a
    classification batch has no caption per image (and this student no text tower), so the teacher's image embeddings
    take their place. It needs no label. A batch of 1 gives 0: the only candidate is the positive.
    """
    s = F.normalize(student_embeds.float(), dim=-1)
    t = F.normalize(teacher_embeds.float(), dim=-1)
    logits = _float_similarity(s, t) / float(temperature)
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def affinity_mimicking_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor, text_embeds: torch.Tensor,
                            temperature: float = 0.07) -> torch.Tensor:
    """Affinity mimicking (TinyCLIP, Wu et al., ICCV 2023); CLIP-KD's CRD (Yang et al., CVPR 2024) is the same KL.

    ``s_i``, ``t_i``: L2-normalised student and teacher image embeddings of sample ``i`` of a batch of ``B``; ``W``:
    the ``C x D`` L2-normalised text embeddings of the vocabulary (``w_c`` its row for class ``c``), which takes the
    place of the papers' batch of paired captions. Two directions:

    * image -> vocabulary: for each image, ``KL(softmax_c(t_i . w_c / tau) || softmax_c(s_i . w_c / tau))``, the
      teacher's distribution over the classes against the student's, averaged over the ``B`` images;
    * vocabulary -> images: for each class, ``KL(softmax_i(w_c . t_i / tau) || softmax_i(w_c . s_i / tau))``, the
      distribution of that class text over the batch's images, averaged over the ``C`` classes.

    The loss is the mean of the two. A batch of 1 has no distribution over images (a softmax over one image is 1 for
    teacher and student alike, a KL of 0 that would only halve the other term), so it is the image -> vocabulary term
    alone. The KL differs from the soft cross-entropy of the teacher's affinities by the teacher's entropy, a constant
    to the student: the gradients are the same. It needs no label.
    """
    s = F.normalize(student_embeds.float(), dim=-1)
    t = F.normalize(teacher_embeds.float(), dim=-1)
    w = F.normalize(text_embeds.float(), dim=-1)
    student_logits = _float_similarity(s, w) / float(temperature)  # [B, C]
    teacher_logits = _float_similarity(t, w) / float(temperature)
    # Each direction is a KL of softmaxes averaged over its distributions: Hinton's KD at temperature 1 (the
    # temperature is already in the logits), over the rows and over the columns.
    image_to_vocabulary = kd_loss(student_logits, teacher_logits, temperature=1.0)
    if len(s) == 1:
        return image_to_vocabulary
    vocabulary_to_images = kd_loss(student_logits.t(), teacher_logits.t(), temperature=1.0)
    return 0.5 * (image_to_vocabulary + vocabulary_to_images)


def caption_infonce_loss(image_embeds: torch.Tensor, caption_embeds: torch.Tensor, caption_ids: torch.Tensor,
                         temperature: float = 0.07) -> torch.Tensor:
    """Symmetric image-caption InfoNCE (CLIP's loss) of a batch against the teacher's embeddings of its captions.

    Sample ``i`` has the L2-normalised image embedding ``e_i`` and one caption, ``caption_ids[i]`` (a row of the
    run's caption table) with the teacher's text embedding ``c_i``. The batch's distinct captions are the texts
    ``u_1..u_K``, and ``y_i`` is the one of sample ``i``: a caption shared by several images is one text, so those
    images are never each other's negatives. Image -> text: ``CE(e_i . u / tau, y_i)``; text -> image: each text
    ``u_k`` ranks the batch's images, every image captioned ``u_k`` a positive,
    ``-mean_{i: y_i = k} log softmax_i(e . u_k / tau)``, averaged over the texts; the loss is the mean of the two
    (:func:`label_infonce_loss` with the captions as the classes).
    """
    unique, rows = torch.unique(caption_ids, return_inverse=True)
    first = torch.full((len(unique),), len(caption_ids), dtype=torch.long, device=caption_ids.device)
    first = first.scatter_reduce(0, rows, torch.arange(len(caption_ids), device=caption_ids.device), "amin")
    texts = F.normalize(caption_embeds[first].float(), dim=-1)
    similarity = _float_similarity(F.normalize(image_embeds.float(), dim=-1), texts)
    return label_infonce_loss(similarity, rows, temperature, symmetric=True)


def text_distill_loss(student_embeds: torch.Tensor, teacher_embeds: torch.Tensor, contrastive_weight: float = 1.0,
                      temperature: float = 0.01) -> torch.Tensor:
    """Distillation of a CLIP text tower into a smaller one (TinyCLIP's and CLIP-KD's losses, text side).

    ``s_i`` and ``t_i`` are the L2-normalised student and teacher text embeddings of text ``i`` of a batch of ``B``.
    The loss is ``mean_i (1 - s_i . t_i)`` (feature distillation in its cosine form) plus ``contrastive_weight`` times
    the symmetric InfoNCE between the two towers, ``0.5 * (CE(s t^T / tau, i) + CE(t s^T / tau, i))``: each student
    embedding is pulled to its own teacher embedding and away from the batch's other texts' (CLIP-KD's ICL), and each
    teacher embedding ranks the student's. The contrastive term keeps apart texts the cosine term alone would let
    collapse onto one direction, which is what zero-shot argmax needs. A batch of 1 has no negative: its InfoNCE is 0.
    """
    s = F.normalize(student_embeds.float(), dim=-1)
    t = F.normalize(teacher_embeds.float(), dim=-1)
    cosine = (1 - (s * t).sum(-1)).mean()
    if not contrastive_weight:
        return cosine
    logits = _float_similarity(s, t) / float(temperature)
    targets = torch.arange(len(s), device=s.device)
    contrastive = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
    return cosine + float(contrastive_weight) * contrastive
