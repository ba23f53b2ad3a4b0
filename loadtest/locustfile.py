"""Locust traffic for embserve: what a ranking tier sends, plus an online trainer's updates.

* ``RankingUser`` - lookups with Zipf-distributed IDs (the head is hot, as in real traffic), a
  mix of batch sizes (1 for a user lookup, 64 to 1024 for candidate items), sometimes several
  lookups in one request (user + candidates), mostly over the binary protocol, some JSON.
* ``UpdateWriter`` - one trainer (``fixed_count = 1``) posting binary upsert batches of
  Zipf-drawn IDs every second; it needs the write token (``EMBSERVE_TOKEN`` or
  ``EMBSERVE_TOKEN_FILE``) unless the server is on loopback without one.

Both call the service through ``service.client.EmbeddingClient`` and report every call to
Locust's statistics.  The tables come from ``GET /v1/tables`` at start (``EMBSERVE_LOAD_TABLES``
narrows them, comma-separated).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080      # web UI
    python loadtest/run.py --seconds 60                                 # headless, with a report
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from locust import User, between, constant, events, task

from service.client import EmbeddingClient, EmbservError

BATCH_SIZES = np.array([1, 16, 64, 256, 1024])
BATCH_WEIGHTS = np.array([0.10, 0.15, 0.30, 0.30, 0.15])
ZIPF_EXPONENT = 1.05


def _token() -> str | None:
    path = os.environ.get("EMBSERVE_TOKEN_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get("EMBSERVE_TOKEN") or None


class ZipfIds:
    """IDs 0..n-1 drawn with P(rank r) ~ 1/r^s, ranks shuffled over the ID space once."""

    def __init__(self, n: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** ZIPF_EXPONENT
        self.cdf = np.cumsum(weights / weights.sum())
        self.ids_by_rank = self.rng.permutation(n).astype(np.int64)

    def draw(self, k: int) -> np.ndarray:
        ranks = np.minimum(np.searchsorted(self.cdf, self.rng.random(k)), len(self.cdf) - 1)
        return self.ids_by_rank[ranks]


def _tables(client: EmbeddingClient) -> list[dict[str, Any]]:
    wanted = {t for t in os.environ.get("EMBSERVE_LOAD_TABLES", "").split(",") if t}
    tables = [t for t in client.tables() if not wanted or t["name"] in wanted]
    if not tables:
        raise RuntimeError("the server hosts no table to load-test")
    return tables


class _EmbservUser(User):
    abstract = True
    binary = True

    def on_start(self) -> None:
        self.api = EmbeddingClient(self.host, token=_token(), binary=self.binary, timeout=30.0)
        self.tables = _tables(self.api)
        seed = int.from_bytes(os.urandom(4), "little")
        self.ids = {t["name"]: ZipfIds(max(int(t["ids"]), 1), seed + k) for k, t in enumerate(self.tables)}
        self.rng = np.random.default_rng(seed)

    def on_stop(self) -> None:
        self.api.close()

    def timed(self, name: str, ids: int, call: Callable[[], Any]) -> None:
        """Run one call and report it to Locust (response_length = IDs, for IDs/s in reports)."""
        started = time.perf_counter()
        error: Exception | None = None
        try:
            call()
        except (EmbservError, OSError) as exc:
            error = exc
        events.request.fire(
            request_type="POST", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=ids, exception=error, context={},
        )

    def batch(self) -> int:
        return int(self.rng.choice(BATCH_SIZES, p=BATCH_WEIGHTS))


class RankingUser(_EmbservUser):
    wait_time = between(0.0, 0.01)

    @task(6)
    def lookup_binary(self) -> None:
        table = self.tables[int(self.rng.integers(len(self.tables)))]["name"]
        ids = self.ids[table].draw(self.batch())
        self.timed(f"lookup binary batch {len(ids)}", len(ids), lambda: self.api.lookup(table, ids))

    @task(3)
    def lookup_user_and_candidates(self) -> None:
        """One request, several lookups: the user's row plus a candidate batch per table."""
        specs = [(self.tables[0]["name"], self.ids[self.tables[0]["name"]].draw(1))]
        specs += [(t["name"], self.ids[t["name"]].draw(self.batch())) for t in self.tables]
        total = sum(len(ids) for _, ids in specs)
        self.timed(f"lookup multi x{len(specs)}", total, lambda: self.api.lookup_many(specs))

    @task(1)
    def lookup_json(self) -> None:
        table = self.tables[0]["name"]
        ids = self.ids[table].draw(int(self.rng.choice([1, 64])))
        json_api = getattr(self, "json_api", None)
        if json_api is None:
            json_api = self.json_api = EmbeddingClient(self.host, token=_token(), binary=False, timeout=30.0)
        self.timed(f"lookup json batch {len(ids)}", len(ids), lambda: json_api.lookup(table, ids))


class UpdateWriter(_EmbservUser):
    """An online trainer: 256 upserted rows a second into the first table."""

    fixed_count = 1
    wait_time = constant(1.0)
    rows_per_batch = 256

    @task
    def upsert(self) -> None:
        table = self.tables[0]
        ids = np.unique(self.ids[table["name"]].draw(self.rows_per_batch))
        vectors = self.rng.standard_normal((len(ids), int(table["dim"])), dtype=np.float32) * 0.1
        self.timed("update binary", len(ids), lambda: self.api.update(table["name"], upsert_ids=ids, vectors=vectors))
