"""Compressed embedding tables in pure PyTorch: codecs, the table store, budget allocation.

Usable on its own (a notebook, a training job); the HTTP service in ``service`` hosts it.
"""

from .allocation import BudgetTooSmall, CompressionReport, build_table, candidate_classes, compress, compress_uniform
from .hash_index import HashIndex
from .index import DenseIndex, KeyedIndex, RunIndex
from .layout import RowClass
from .pooling import pool_bags
from .storage import FORMAT_VERSION, TableFormatError, load_table, read_manifest, save_table
from .table import CompressedTable, LookupResult, TableStats
from .unknown import UnknownPolicy, bucket_of

__all__ = [
    "BudgetTooSmall",
    "CompressedTable",
    "CompressionReport",
    "DenseIndex",
    "FORMAT_VERSION",
    "HashIndex",
    "KeyedIndex",
    "LookupResult",
    "RowClass",
    "RunIndex",
    "TableFormatError",
    "TableStats",
    "UnknownPolicy",
    "bucket_of",
    "build_table",
    "candidate_classes",
    "compress",
    "compress_uniform",
    "load_table",
    "pool_bags",
    "read_manifest",
    "save_table",
]
