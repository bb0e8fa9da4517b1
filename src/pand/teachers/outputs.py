"""The names of a teacher's per-sample outputs, the keys under which sources deliver them to distillers.

``image_embeds``    B x D, L2-normalised image embeddings of a CLIP-like teacher (float32).
``logits``          B x C class logits: a classifier's own, or a CLIP teacher's zero-shot / CoOp ones.
``member_logits``   B x M x C class logits of each of the M members of a teacher ensemble (float32), member m's
                    exactly as it gives them alone; the ensemble's ``logits`` are their average after the softmax.
``stage_features``  a list, one tensor per stage of :attr:`~pand.teachers.frozen.FrozenTeacher.stage_names`, shallow
                    to deep: maps ``[B, C, H, W]`` or tokens ``[B, N, C]``. Captured by forward hooks during the same
                    forward pass (:class:`~pand.networks.stages.StageTap`), never cached (too large per view).

A module of names only, so that the config checks can read them before torch is loaded.
"""

IMAGE_EMBEDS = "image_embeds"
LOGITS = "logits"
MEMBER_LOGITS = "member_logits"
STAGE_FEATURES = "stage_features"
