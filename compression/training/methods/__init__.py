"""Training-time compression methods as ``torch.nn.Module`` embeddings that export into the
serving format (:class:`compression.table.CompressedTable`), plus the post-training ones.

Each module documents what it stores per ID and how a row is decoded.  In eval mode a module's
``forward(ids)`` equals ``module.export().lookup(ids).values`` exactly (``tests/test_methods.py``).

==========================  =========================================  ==========================
method                      stores                                     exported as
==========================  =========================================  ==========================
:class:`FullEmbedding`      fp32 rows                                  one class ``d{D}b32``
:class:`MPEEmbedding`       per frequency group: ``b`` bits/coordinate  one class per width, runs
:class:`FIITEDEmbedding`    per ID: a prefix of fp16 chunks            one class per length
:class:`BinaryHashEmbedding`  ``ceil(S/k)`` sub-tables of ``2**k`` rows  no rows + ``binary_hash``
:class:`HybridBinaryHashEmbedding`  head rows + a BH table             rows + ``binary_hash``
:class:`HashingTrickEmbedding`  ``K`` shared rows                      no rows + ``hashed``
:class:`QREmbedding`        quotient + remainder rows                  no rows + ``qr``
:class:`CodebookEmbedding`  per ID ``m`` codes + fp16 codebooks (DPQ,    PQ classes ``d{D}pq{m}x{k}``
                            MGQE: more centroids for frequent IDs)
==========================  =========================================  ==========================
"""

from .base import FullEmbedding, ServableEmbedding, codec_rounded, fp16_rounded, hash_only_table, rows_table, straight_through
from .codebook import CodebookEmbedding, DPQEmbedding, MGQEEmbedding, codes_table
from .binary_hash import BinaryHashEmbedding, HybridBinaryHashEmbedding
from .fiited import FIITEDEmbedding
from .hashing import HashingTrickEmbedding, QREmbedding
from .mpe import MPEEmbedding, search_then_retrain
from .post_training import POST_TRAINING, post_training_table

__all__ = [
    "BinaryHashEmbedding",
    "CodebookEmbedding",
    "DPQEmbedding",
    "MGQEEmbedding",
    "codes_table",
    "FIITEDEmbedding",
    "FullEmbedding",
    "HashingTrickEmbedding",
    "HybridBinaryHashEmbedding",
    "MPEEmbedding",
    "POST_TRAINING",
    "QREmbedding",
    "ServableEmbedding",
    "codec_rounded",
    "fp16_rounded",
    "hash_only_table",
    "post_training_table",
    "rows_table",
    "search_then_retrain",
    "straight_through",
]
