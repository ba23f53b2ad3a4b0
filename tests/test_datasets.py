"""Data loaders (Criteo TSV, a user's ml-100k folder, synthetic CTR), the frequency-numbered
vocabulary, and the metrics the quality benchmark reports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.training.datasets import GENRES, CTRData, Vocabulary, criteo_tsv, movielens_100k_ctr, synthetic_ctr
from compression.training.evaluation import Split, TrainConfig, auc, evaluate, logloss, rmse, train
from compression.training.methods import FullEmbedding
from compression.training.models import DeepFM, ServedEmbedding


def _criteo_line(label: int, ints: list[str], cats: list[str]) -> str:
    assert len(ints) == 13 and len(cats) == 26
    return "\t".join([str(label), *ints, *cats]) + "\n"


def test_criteo_tsv_reads_labels_dense_and_categorical_codes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines, expect_dense = [], []
    for k in range(40):
        ints = [str(int(v)) if v >= 0 else "" for v in rng.integers(-3, 50, size=13)]
        cats = [f"{rng.integers(0, 3):08x}" if f != 5 else ("" if k % 4 == 0 else "a1b2c3d4") for f in range(26)]
        cats[7] = "rare" if k == 0 else "common"
        lines.append(_criteo_line(k % 2, ints, cats))
        expect_dense.append([math.log1p(max(int(v), 0)) if v else 0.0 for v in ints])
    path = tmp_path / "train.txt"
    path.write_text("".join(lines))
    data = criteo_tsv(path, min_count=2)
    assert len(data) == 40 and data.num_fields == 26 and data.dense is not None
    assert data.labels.tolist() == [float(k % 2) for k in range(40)]
    np.testing.assert_allclose(data.dense, np.array(expect_dense, dtype=np.float32), rtol=1e-6)
    # field C6: empty on every 4th row -> the shared code 0; the one value seen 30 times -> code 1
    assert set(data.columns[::4, 5].tolist()) == {0} and set(data.columns[1::4, 5].tolist()) == {1}
    # field C8: "rare" (seen once) falls under min_count and shares code 0 with empty values
    assert data.columns[0, 7] == 0 and set(data.columns[1:, 7].tolist()) == {1}
    assert (data.columns < data.cardinalities[None, :]).all() and (data.columns >= 0).all()
    assert len(criteo_tsv(path, max_rows=7)) == 7


def test_criteo_tsv_rejects_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("1\t2\t3\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        criteo_tsv(path)
    path.write_text(_criteo_line(1, ["x"] * 13, ["a"] * 26))
    with pytest.raises(ValueError, match="integer"):
        criteo_tsv(path)


def test_synthetic_ctr_skew_controls_the_head_share() -> None:
    def head_share(skew: float) -> float:
        data = synthetic_ctr(20_000, (2000, 50), skew=skew, seed=1)
        counts = np.sort(np.bincount(data.columns[:, 0], minlength=2000))[::-1]
        return float(counts[:20].sum() / counts.sum())  # top 1% of the IDs

    shares = [head_share(s) for s in (0.0, 0.8, 1.2)]
    assert shares[0] < 0.03  # uniform: the top 1% of IDs get about 1% of the traffic
    assert shares[0] < shares[1] < shares[2]
    assert shares[2] > 0.4
    data = synthetic_ctr(5000, seed=2)
    assert 0.05 < data.labels.mean() < 0.95 and (data.columns < data.cardinalities[None, :]).all()


def _write_ml100k(folder: Path) -> None:
    folder.mkdir()
    (folder / "u.data").write_text("1\t10\t5\t100\n2\t10\t3\t101\n1\t20\t4\t102\n3\t20\t1\t103\n")
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|writer|32067\n")
    flags = ["0"] * len(GENRES)
    action_comedy = list(flags)
    action_comedy[1] = action_comedy[5] = "1"
    drama = list(flags)
    drama[8] = "1"
    (folder / "u.item").write_text(
        "10|A Film (1995)|01-Jan-1995||http://x|" + "|".join(action_comedy) + "\n"
        "20|Caf\xe9 (1996)|01-Jan-1996||http://y|" + "|".join(drama) + "\n",
        encoding="latin-1",
    )


def test_movielens_ctr_reads_a_users_ml100k_folder(tmp_path: Path) -> None:
    _write_ml100k(tmp_path / "ml-100k")
    data = movielens_100k_ctr(tmp_path / "ml-100k")
    assert data.field_names == ["user", "item", "genre", "occupation", "age", "gender", "zip"]
    assert data.labels.tolist() == [1.0, 0.0, 1.0, 0.0] and data.ratings is not None
    genre_cols = np.nonzero(data.column_field == 2)[0]
    assert len(genre_cols) == 2  # at most two genres per movie here
    assert sorted(data.columns[0, genre_cols].tolist()) == [1, 5]  # Action, Comedy
    assert data.columns[2, genre_cols].tolist() == [8, -1]  # Drama, one empty slot
    age = data.columns[:, list(data.column_field).index(4)]
    assert age.tolist() == [1, 5, 1, 0]  # 24 -> 18-24 (1), 53 -> 50-55 (5), 17 -> under 18 (0)


def test_vocabulary_numbers_ids_by_training_frequency() -> None:
    data = synthetic_ctr(3000, (300, 40, 5), skew=1.0, seed=3)
    train_part, test_part = data.split((0.8, 0.2), seed=0)
    vocab = Vocabulary.fit(train_part)
    assert vocab.num_ids == 345
    assert bool((np.diff(vocab.counts) <= 0).all())  # ID 0 is the most frequent
    ids = vocab.encode(test_part)
    assert ids.shape == test_part.columns.shape and ids.min() >= 0 and ids.max() < 345
    # distinct (field, code) pairs get distinct IDs
    flat = train_part.columns + np.array([0, 300, 340])[None, :]
    assert len(np.unique(vocab.global_of[flat])) == len(np.unique(flat))
    multi = CTRData(["f"], np.array([[0, -1], [1, 0]]), np.array([0, 0]), np.array([2]), np.array([1.0, 0.0], dtype=np.float32))
    assert Vocabulary.fit(multi).encode(multi).tolist() == [[0, -1], [1, 0]]


def test_split_is_a_seeded_partition() -> None:
    data = synthetic_ctr(1000, (50,), seed=4)
    parts = data.split((0.8, 0.1, 0.1), seed=7)
    assert [len(p) for p in parts] == [800, 100, 100]
    again = data.split((0.8, 0.1, 0.1), seed=7)
    assert all(np.array_equal(a.columns, b.columns) for a, b in zip(parts, again))


@given(st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=6)), min_size=2, max_size=60))
@settings(max_examples=80, deadline=None)
def test_auc_equals_the_pairwise_definition(pairs: list[tuple[bool, int]]) -> None:
    labels = np.array([float(p) for p, _ in pairs])
    scores = np.array([float(s) for _, s in pairs])
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    if len(pos) == 0 or len(neg) == 0:
        assert math.isnan(auc(labels, scores))
        return
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert auc(labels, scores) == pytest.approx(wins / (len(pos) * len(neg)))


def test_logloss_and_rmse() -> None:
    assert logloss(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert logloss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(1e-7))
    assert rmse(np.array([1.0, 3.0]), np.array([2.0, 1.0])) == pytest.approx(math.sqrt(2.5))


def test_deepfm_learns_synthetic_ctr_and_scores_through_a_served_table() -> None:
    torch.manual_seed(0)
    data = synthetic_ctr(4000, (100, 30, 10), skew=0.8, seed=5)
    tr, va, te = data.split((0.7, 0.15, 0.15), seed=0)
    vocab = Vocabulary.fit(tr)
    splits = [Split.of(d, vocab) for d in (tr, va, te)]
    model = DeepFM(FullEmbedding(vocab.num_ids, 8), torch.from_numpy(data.column_field), 8, hidden=(16,))
    log = train(model, splits[0], splits[1], TrainConfig(epochs=3, batch_size=256, embedding_lr=2e-2))
    assert log.best_epoch >= 0
    trained = evaluate(model, splits[2])
    assert trained.auc > 0.6 and trained.rmse is None
    model.embedding = ServedEmbedding(model.embedding.export())  # type: ignore[operator]
    assert evaluate(model, splits[2]).auc == pytest.approx(trained.auc, abs=1e-9)
