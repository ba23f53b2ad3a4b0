"""Metrics and the train / evaluate loops used by the quality benchmark and the tests.

* :func:`auc` - ROC AUC by the rank-sum formula, ties counted half (exact, O(n log n));
* :func:`logloss` - mean binary cross-entropy of predicted probabilities, clipped at 1e-7;
* :func:`rmse` - of the rating head.

:func:`train` runs Adam over mini-batches, adds the embedding module's own loss term (MPE's
bit penalty) and calls its gradient hook (FIITED's utility), scores the validation split after
every epoch, and restores the best-AUC epoch among those where the module's structure was
final (``embedding.ready``); it stops after ``patience`` epochs without improvement.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .datasets import CTRData, Vocabulary


@dataclass
class Split:
    """One split as tensors: global IDs ``[n, C]`` (``-1`` = empty), labels, ratings, dense."""

    ids: torch.Tensor
    labels: torch.Tensor
    ratings: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @classmethod
    def of(cls, data: CTRData, vocab: Vocabulary) -> "Split":
        return cls(
            torch.from_numpy(vocab.encode(data)),
            torch.from_numpy(data.labels),
            None if data.ratings is None else torch.from_numpy(data.ratings),
            None if data.dense is None else torch.from_numpy(data.dense),
        )

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def batch(self, rows: torch.Tensor) -> "Split":
        return Split(
            self.ids[rows], self.labels[rows], None if self.ratings is None else self.ratings[rows], None if self.dense is None else self.dense[rows]
        )


@dataclass
class Metrics:
    auc: float
    logloss: float
    rmse: float | None = None


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 512
    lr: float = 2e-3
    embedding_lr: float = 1e-2
    embedding_l2: float = 1e-4  # on the looked-up vectors, per row
    rating_weight: float = 0.25  # MSE of the rating head, next to the BCE of the CTR head
    patience: int = 2
    seed: int = 0


@dataclass
class TrainLog:
    epochs_run: int = 0
    best_epoch: int = -1
    val_auc: list[float] = field(default_factory=list)
    seconds: float = 0.0


def auc(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> float:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos = float(y.sum())
    neg = float(y.size - pos)
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks over ties
    boundaries = np.concatenate([[0], np.nonzero(np.diff(sorted_s))[0] + 1, [s.size]])
    for a, b in zip(boundaries[:-1], boundaries[1:]):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y > 0.5].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def logloss(labels: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> float:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def rmse(targets: np.ndarray | torch.Tensor, preds: np.ndarray | torch.Tensor) -> float:
    t = np.asarray(targets, dtype=np.float64).reshape(-1)
    p = np.asarray(preds, dtype=np.float64).reshape(-1)
    return float(np.sqrt(((t - p) ** 2).mean()))


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities, ratings)`` for every row of ``split``, in eval mode."""
    was_training = model.training
    model.eval()
    probs, ratings = [], []
    for start in range(0, len(split), batch_size):
        part = split.batch(torch.arange(start, min(start + batch_size, len(split))))
        logit, rating = model(part.ids, part.dense)
        probs.append(torch.sigmoid(logit))
        ratings.append(rating)
    model.train(was_training)
    return torch.cat(probs), torch.cat(ratings)


def evaluate(model: nn.Module, split: Split) -> Metrics:
    probs, ratings = predict(model, split)
    return Metrics(
        auc(split.labels, probs),
        logloss(split.labels, probs),
        None if split.ratings is None else rmse(split.ratings, ratings.clamp(1.0, 5.0)),
    )


def train(model: nn.Module, train_split: Split, val_split: Split, config: TrainConfig) -> TrainLog:
    """Train ``model`` (a :class:`compression.training.models.DeepFM`) in place; see the module doc."""
    start_time = time.perf_counter()
    gen = torch.Generator().manual_seed(config.seed)
    embedding = model.embedding  # type: ignore[attr-defined]
    emb_params = [p for p in embedding.parameters() if p.requires_grad]
    emb_ids = {id(p) for p in emb_params}
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids]
    opt = torch.optim.Adam([{"params": emb_params, "lr": config.embedding_lr}, {"params": other, "lr": config.lr}])
    log = TrainLog()
    best_state, best_auc, stale = None, -1.0, 0
    bce = nn.BCEWithLogitsLoss()
    penalty_of = getattr(embedding, "penalty", lambda: None)
    after_backward = getattr(embedding, "after_backward", lambda ids: None)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train_split), generator=gen)
        for start in range(0, len(order), config.batch_size):
            batch = train_split.batch(order[start : start + config.batch_size])
            logit, rating, l2 = model.forward_with_l2(batch.ids, batch.dense)  # type: ignore[operator]
            loss = bce(logit, batch.labels)
            if batch.ratings is not None and config.rating_weight:
                loss = loss + config.rating_weight * ((rating - batch.ratings) ** 2).mean()
            if config.embedding_l2:
                loss = loss + config.embedding_l2 * l2 / len(batch)
            extra = penalty_of()
            if extra is not None:
                loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            after_backward(batch.ids)
            opt.step()
        log.epochs_run = epoch + 1
        score = evaluate(model, val_split).auc
        log.val_auc.append(score)
        if getattr(embedding, "ready", True) and score > best_auc:
            best_auc, best_state, stale, log.best_epoch = score, copy.deepcopy(model.state_dict()), 0, epoch
        elif getattr(embedding, "ready", True):
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    log.seconds = time.perf_counter() - start_time
    return log
