"""PAND stage 1 (PSC) in one place: the teacher's image embeddings of each split stored once (:mod:`.features`),
CoOp context vectors (:mod:`.learner`) trained on them (:mod:`.coop`), the learned class text features written with
their provenance for stage 2 (:mod:`.store`), the settings' checks (:mod:`.checks`) and the two commands,
``pand features`` and ``pand prompts`` (:mod:`.run`).

Nothing is imported here, so that the light :mod:`.checks` can be read before torch is loaded.
"""
