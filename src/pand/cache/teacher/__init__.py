"""The teacher cache: K augmented views per training image, their parameters and the teacher's output for each.

Layout of a cache folder (format version 4; shards: :mod:`pand.cache.teacher.layout`):

    meta.json        provenance (teacher spec and identity, dataset fingerprint, transform, K, seed, classes, ...),
                     ``outputs`` (what it holds), ``complete``, ``shard_size`` and ``num_shards``, each array's row
                     shape and dtype ("arrays"), the checksums of the text files and, once complete, of every shard's
                     digests.npy ("shards")
    shards/NNNNN/    rows ``NNNNN * shard_size ..`` (up to 1,024 images and 64 MiB per shard), written whole:
      params.npy     float32 [n, K, P]  augmentation parameters of every view (replayable with ReplayableAugment)
      digests.npy    uint8   [n, A, 16] per image: blake2b-128 of its params row ([:, 0]) and of its row of each output
                                        array below, in that order ([:, 1:])
      shard.json     the shard's rows and the checksum of its digests.npy

and, for a CLIP teacher (``outputs: ["image_embeds"]``):

    shards/NNNNN/embeds.npy  float16 [n, K, D]  L2-normalised teacher image embedding of exactly that view
    text.safetensors float32 [C, D]     the class text embeddings of the data config's templates
    captions.safetensors float16 [M, D] when the training images have captions (``data=captions``): the teacher's
                                        embedding of each distinct caption, row r for row r of the run's
                                        :class:`~pand.data.captions.CaptionTable`; meta.json records the table's
                                        digest (``captions``), so a cache of another caption list is refused

or, for a classifier teacher (``outputs: ["logits"]``; no text file, meta.json has ``num_classes`` and
``logits_topk``):

    shards/NNNNN/logits.npy        float16 [n, K, C]  the teacher's class logits of that view (``cache.topk`` unset)
    shards/NNNNN/logits_topk.npy   float16 [n, K, k+1] with ``cache.topk=k``: the k largest logits, then the floor
    shards/NNNNN/logits_index.npy  int16   [n, K, k]  their classes (int32 above 32,767 classes)

Top-k rows are rebuilt exactly as :func:`decode_topk` says: the kept classes get their logits, every other class the
floor ``log(mean(exp(z_j)))`` over the classes not kept, so the softmax at T=1 keeps the kept probabilities and the
left-over mass exactly and spreads that mass evenly.

Which storage (``python benchmarks/cache_logit_storage.py``; teacher logits from a cosine classifier over random
class prototypes with mean top-1 probability 0.85, a half-trained student; per-sample relative error of the KD loss
at T=4 against float32 logits, median / 99th percentile; 4,096 samples):

    C     storage   bytes/view  KD T=4 error       KD T=1 error       KD T=4 with LS (standardize)
    10    float16   20          5.3e-4 / 1.4e-3    3.5e-4 / 1.0e-3    9.1e-5 / 6.3e-4
    10    top-5     22          4.8e-2 / 2.4e-1    2.6e-3 / 2.6e-2    1.1e-1 / 8.3e-1
    100   float16   200         2.1e-4 / 8.7e-4    2.1e-4 / 6.8e-4    2.9e-5 / 1.4e-4
    100   top-10    42          3.8e-1 / 5.3e-1    9.1e-3 / 5.7e-2    6.5e-1 / 1.4
    100   top-20    82          2.9e-1 / 4.2e-1    4.5e-3 / 2.9e-2    3.6e-1 / 8.2e-1
    100   top-50    202         1.2e-1 / 2.1e-1    8.0e-4 / 5.6e-3    1.1e-1 / 2.9e-1
    1000  float16   2000        8.2e-5 / 2.7e-4    2.4e-4 / 1.0e-3    9.6e-6 / 3.9e-5
    1000  top-5     22          6.7e-1 / 7.5e-1    2.3e-2 / 2.3e-1    28 / 54
    1000  top-20    82          6.3e-1 / 6.9e-1    1.4e-2 / 1.3e-1    4.9 / 11
    1000  top-200   802         3.8e-1 / 4.3e-1    1.8e-3 / 1.7e-2    3.9e-1 / 6.8e-1

float16 rows are within 1.4e-3 of float32 for every C; top-k is not, at the temperatures KD uses: at T=4 most of the
softened mass sits outside the top k (94 % outside the top 20 of 1000 classes), and spreading it evenly moves the
loss by 12-67 % (median); logit standardisation z-scores the flattened row and is off by more. So every class count is
stored in full float16 by default (ImageNet-1k at K=10: 25.6 GB, as much as CLIP embeddings of D=1024);
``cache.topk=k`` is for class counts whose full rows do not fit, and then only for KD near T=1 without
``standardize``.

During training each epoch picks one cached view per image (seeded by seed, epoch and index), the data loader rebuilds
that view for the student from its parameters, and :class:`CachedTeacherSource` returns the stored output: the
teacher model is never loaded. A cache made with another teacher (a classifier's weights file is compared by content,
see :func:`pand.engine.teacher_side.teacher_spec`), data, transform, output storage or format version is refused with
the reason (:class:`~pand.errors.MismatchError`); an unfinished one is never read as complete.

``cache.precision`` (fp32, the default; bf16; fp16) runs the teacher under autocast while the cache is built. The
first batch of each build is then also computed in fp32 and the build is refused before it writes a row unless every
row agrees within ``cache.precision_tolerance`` (relative L2 error; embeddings and logits alike): bf16 agrees with
fp32 to about 1 %, 20-45x the error of the cache's own float16 storage, fp16 to 2-6x it (measured, see
:mod:`pand.teachers.precision`). A low-precision cache records ``precision`` (fp32 caches record nothing, so every
older cache still matches) and is refused by a run asking for another precision, like any other setting; the
measured agreement is kept in meta.json (``agreement``, not compared).

What :meth:`TeacherCache.open` checks, what it costs, and how a build reserves its disk space: see
:mod:`pand.cache.integrity`.
"""

from pand.cache.teacher.record import (
    FORMAT_VERSION,
    cache_record,
    choose_view,
    decode_topk,
    encode_topk,
    logits_topk,
)
from pand.cache.teacher.source import CachedTeacherSource
from pand.cache.teacher.store import TeacherCache

__all__ = [
    "FORMAT_VERSION",
    "CachedTeacherSource",
    "TeacherCache",
    "cache_record",
    "choose_view",
    "decode_topk",
    "encode_topk",
    "logits_topk",
]
