"""The applier: one background thread that follows the update log and keeps the tables in step.

Each round it reads a run of log entries after its position and applies them in order.  One
entry is applied under its table's lock, so a lookup sees the entry all or nothing.  Around
that it feeds the frequency sketches (updates, and lookups queued by the request path),
re-decides storage classes when a table's segment ends or its budget is exceeded, and writes
snapshots.  After a round, every table reflects every entry up to the applier's position,
whether or not the round touched it; that position is what snapshots record and what start-up
replays from.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.allocation import BudgetTooSmall
from compression.hash_index import EMPTY as KEY_EMPTY
from compression.hash_index import HashIndex
from compression.layout import LOCATOR_CLASS_SHIFT
from compression.policies import apply_decision

from .metrics import ServiceMetrics
from .registry import HostedTable, TableRegistry
from .settings import Settings
from .tablefiles import write_snapshot
from .updatelog import LogRecord, MalformedEntry, Position, UpdateBatch, UpdateLog, format_position
from .updatelog.trim_coordinator import TrimGap, coordinator_for

log = logging.getLogger("embserve.applier")

_READ_BATCH = 256
_LOOKUP_QUEUE_MAX = 4096
# binary lookups' ID slices of at most _SMALL_SLICE_BYTES (8 IDs) may wait up to this many per
# table (4 MiB): at 60k batch-1 lookups/s a round's worth is far more than _LOOKUP_QUEUE_MAX, and
# the slices dropped past a count cap were lookups the sketch, and so admission and the
# allocator, never counted; larger slices (up to the inline body limit each) keep the count cap
_SMALL_SLICE_BYTES = 64
_SMALL_SLICES_MAX = 65536
# lookup IDs fed to a table's sketch per applier round, at most; beyond it a uniform sample
# stands for all of them, each sampled ID counting total/sample (an unbiased estimate), so the
# applier's CPU stays bounded however hot the traffic
_SKETCH_SAMPLE_MAX = 16384
# Re-decisions fill this share of the budget: the rest is room for the new IDs that arrive
# before the next segment, so a table at its budget does not re-decide on every new ID.
_BUDGET_FILL = 0.95
# A table whose rows cannot fit its budget is tried again at most this often (and only after
# updates or a new budget): a failed decision costs a full pass over its rows.
_OVER_BUDGET_RETRY_S = 5.0


class RejectedEntry(ValueError):
    pass


def validate_batch(hosted: HostedTable, batch: UpdateBatch) -> None:
    """The checks an entry must pass before any of it is applied (HTTP writes were already
    checked; entries a trainer wrote straight into the stream are checked here)."""
    table = hosted.table
    if batch.vectors.shape[0] and batch.dim != table.dim:
        raise RejectedEntry(f"vectors have dim {batch.dim}, table {hosted.name!r} has {table.dim}")
    if not np.isfinite(batch.vectors).all():
        raise RejectedEntry("vectors hold NaN or Inf")
    if table.index.positional and batch.upsert_ids.shape[0] and int(batch.upsert_ids.min()) < 0:
        raise RejectedEntry("a dense table takes only IDs >= 0")
    if not table.index.positional and (batch.upsert_ids == KEY_EMPTY).any():
        raise RejectedEntry("ID -2**63 cannot be stored in a keyed table (it marks free hash slots)")


class Applier:
    def __init__(self, log_: UpdateLog, tables: TableRegistry, metrics: ServiceMetrics, settings: Settings) -> None:
        self.log = log_
        self.tables = tables
        self.metrics = metrics
        self.settings = settings
        positions = [h.log_position for h in (tables.get(n) for n in tables.names()) if h is not None]
        # replay from the oldest table position; a table with none has seen no entry at all
        self.position: Position | None = None if (not positions or None in positions) else min(positions)  # type: ignore[type-var]
        self.caught_up = False
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lookups: deque[tuple[str, np.ndarray]] = deque(maxlen=_LOOKUP_QUEUE_MAX)
        # table -> IDs' bytes of binary lookups not fed yet (record_lookup_bytes): appended by the
        # request path, taken off the front by _drain_lookups, each a single operation under the GIL
        self._raw_lookups: dict[str, list[bytes]] = {}
        self._drain_lock = threading.Lock()
        self._rng = np.random.default_rng()
        self._last_snapshot = time.monotonic()
        self.error: str | None = None
        # replicas sharing a Redis stream trim it together (service/updatelog/trim_coordinator.py)
        self.trim_coordinator = coordinator_for(log_, settings.replica_id, settings.replica_ttl_s, settings.port)
        self._last_heartbeat = float("-inf")
        # set when entries this replica needs were trimmed before it came back: its tables lack
        # acknowledged updates, so /readyz keeps it out of traffic (service/routers/health.py)
        self.gap: TrimGap | None = None
        if self.trim_coordinator is not None:
            # Register before checking and before the first read: a trim by another replica
            # after the check but before a later registration would drop entries this one has
            # not read yet, and nothing would report it.  Registered first, every later trim
            # keeps what it needs, and every earlier one shows in missed().
            needed = self.needed_position()
            self.trim_coordinator.heartbeat(needed)
            self._last_heartbeat = time.monotonic()
            self._record_gap(self.trim_coordinator.gap(needed), needed, "was away")
        # 1 for the life of this process: replaying what the stream still has cannot bring back
        # what was trimmed, and neither can a restart; only re-seeded tables can
        metrics.log_gap.set(0 if self.gap is None else 1)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="embserve-applier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self.step(block_ms=100)
                backoff = 0.1
                self.error = None
            except Exception as exc:  # noqa: BLE001 - the loop must survive a log outage
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("applier round failed; retrying in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def step(self, block_ms: int = 0) -> int:
        """One round: apply what the log has, feed sketches, re-decide, snapshot.  Returns the
        number of entries applied (public so tests and catch-up can drive it synchronously)."""
        if self.trim_coordinator is not None and self.gap is None and time.monotonic() - self._last_heartbeat >= self.settings.replica_ttl_s:
            self._check_gap_after_silence()
        records = self.log.read(self.position, _READ_BATCH, block_ms)
        # lookups queued while read() waited came before these entries were appended: count them
        # first, so a new ID is placed with the traffic it already had
        self._drain_lookups()
        if records:
            self.apply(records)
        elif not self.caught_up:
            with self._cond:
                self.caught_up = True
                self._cond.notify_all()
            log.info("caught up with the update log at %s", format_position(self.position))
        self._maybe_redecide()
        if time.monotonic() - self._last_snapshot >= self.settings.snapshot_interval_s:
            self.snapshot_all(only_dirty=True)
        if self.trim_coordinator is not None and time.monotonic() - self._last_heartbeat >= self.settings.replica_ttl_s / 3:
            self.trim_coordinator.heartbeat(self.needed_position())
            self._last_heartbeat = time.monotonic()
        self._update_lag()
        return len(records)

    def _check_gap_after_silence(self) -> None:
        """This replica has not heartbeaten for a whole TTL (a log outage, a stall): its trim
        record may have expired, and another replica may have trimmed entries it has not read
        yet.  Checked before the next read, which would otherwise go on from the first entry
        after the gap as if nothing were missing.  A gap holds it out of readiness for good, as
        one found at start does."""
        assert self.trim_coordinator is not None
        gap = self.trim_coordinator.gap(self.position)
        self.trim_coordinator.heartbeat(self.needed_position())
        self._last_heartbeat = time.monotonic()
        self._record_gap(gap, self.position, f"was silent (no heartbeat for {self.settings.replica_ttl_s:.0f} s)")

    def _record_gap(self, gap: TrimGap | None, needed: Position | None, why: str) -> None:
        """Hold this replica out of readiness for ``gap`` (entries after ``needed`` trimmed)."""
        if gap is None:
            return
        self.gap = gap
        self.metrics.log_gap.set(1)
        log.error("entries after %s were trimmed from the stream while this replica %s: re-seed it from a fresh snapshot "
                  "(held out of readiness: /readyz answers 503 until then)", format_position(needed) or "the stream's start", why)

    # ------------------------------------------------------------------ applying

    def apply(self, records: list[LogRecord]) -> None:
        for rec in records:
            self._apply_one(rec)
        last = records[-1].position
        with self._cond:
            self.position = last
            for name in self.tables.names():
                hosted = self.tables.get(name)
                if hosted is not None and (hosted.log_position is None or hosted.log_position < last):
                    hosted.log_position = last
            self._cond.notify_all()

    def _apply_one(self, rec: LogRecord) -> None:
        batch = rec.batch
        if isinstance(batch, MalformedEntry):
            self.metrics.updates_rejected.labels("malformed").inc()
            log.warning("skipping malformed log entry %s: %s", format_position(rec.position), batch)
            return
        hosted = self.tables.get(batch.table)
        if hosted is None:
            self.metrics.updates_rejected.labels("unknown_table").inc()
            return
        if hosted.log_position is not None and rec.position <= hosted.log_position:
            return  # already in the table (its snapshot includes this entry)
        try:
            validate_batch(hosted, batch)
        except RejectedEntry as exc:
            self.metrics.updates_rejected.labels("invalid").inc()
            log.warning("rejecting log entry %s for %s: %s", format_position(rec.position), batch.table, exc)
            return
        table = hosted.table
        # the batch's arrays are read-only views of the log's bytes (entry.py): copy the IDs
        # (8 bytes a row) here, and the vectors only once the gate has said which rows stay
        ids = torch.from_numpy(batch.upsert_ids.copy())
        deletes = torch.from_numpy(batch.delete_ids.copy())
        filtered = evicted = 0
        victims = None
        with hosted.write_lock:
            # No other writer now (write_lock), so what only reads the table, or writes what
            # lookups never read, runs beside the lookups: admission and the choice of victims
            # (a function of the log alone, compression/lifecycle.py), the new rows' classes, and
            # the put's plan and encoding (a 10k-row int8 entry held lookups ~25 ms when all of it
            # ran under table.lock, ~5 ms now), and the growth of a slab or index it fills (the
            # copy; only the swap takes table.lock).  One hold of table.lock then writes the entry:
            # evictions, rows, deletes; lookups see it all or nothing.
            if ids.numel() and table.lifecycle is not None:
                gate = table.lifecycle.gate(table, ids)
                keep = gate.keep.numpy()
                ids, vectors, filtered, evicted = ids[gate.keep], torch.from_numpy(batch.vectors[keep]), gate.filtered, gate.evicted
                victims = gate.victims
            else:
                vectors = torch.from_numpy(batch.vectors.copy())
            plan = table.plan_put(ids, vectors, self._classes_for(hosted, ids, leaving=victims)) if ids.numel() else None
            if plan is not None:
                table.reserve(plan, leaving=victims)  # a slab or index that must grow: copied here, swapped in
            with table.lock:
                if victims is not None and victims.numel():
                    table.delete(victims)
                if plan is not None:
                    table.commit_put(plan)
                removed = table.delete(deletes) if deletes.numel() else 0
                hosted.log_position = rec.position
        if filtered:
            self.metrics.updates_filtered.labels(hosted.name).inc(filtered)
        if evicted:
            self.metrics.evicted_ids.labels(hosted.name).inc(evicted)
        if ids.numel() and hosted.sketch is not None:
            hosted.sketch.add(ids)
        hosted.updates_since_decision += batch.size
        hosted.dirty = True
        self.metrics.updates_applied.labels(hosted.name, "upsert").inc(int(ids.numel()))
        self.metrics.updates_applied.labels(hosted.name, "delete").inc(removed)

    def _classes_for(self, hosted: HostedTable, ids: torch.Tensor, leaving: torch.Tensor | None = None) -> torch.Tensor:
        """Existing IDs keep their class until the next re-decision; new IDs get the class their
        frequency rank had at the last decision (or the most populated class, with no policy).
        ``leaving``: held IDs (not among ``ids``) that the same entry evicts first: the class
        populations are counted without them."""
        table = hosted.table
        loc = table.index.resolve(ids.to(table.device)).cpu()
        current = (loc >> LOCATOR_CLASS_SHIFT).to(torch.int64)
        new = loc < 0
        if not bool(new.any()):
            return current
        counts = table.rows_per_class()
        if leaving is not None and leaving.numel():
            gone = table.index.resolve(leaving.to(table.device)).cpu()
            gone = torch.bincount((gone[gone >= 0] >> LOCATOR_CLASS_SHIFT).to(torch.int64), minlength=len(counts))
            counts = [k - int(g) for k, g in zip(counts, gone.tolist(), strict=True)]
        default = int(torch.tensor(counts).argmax()) if sum(counts) else 0
        if hosted.policy is not None and hosted.sketch is not None:
            placed = hosted.rank_map.class_for(hosted.sketch.estimate(ids[new]), default)
        else:
            placed = torch.full((int(new.sum()),), default, dtype=torch.int64)
        current[new] = placed
        return current

    # ------------------------------------------------------------------ read-your-writes

    def wait_for(self, position: Position, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.position is None or self.position < position:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_caught_up(self, timeout: float) -> bool:
        """Block until start-up replay is done (what /readyz reports)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.caught_up:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # ------------------------------------------------------------------ frequencies and classes

    def record_lookup(self, table: str, ids: np.ndarray) -> None:
        """Called on the request path: queue only; the sketch is fed from this thread.  A full
        queue drops its oldest entry, counted in ``embserve_sketch_dropped_lookups_total``."""
        lookups = self._lookups
        if len(lookups) == lookups.maxlen:
            try:
                self.metrics.sketch_dropped.labels(lookups[0][0]).inc()
            except IndexError:  # drained meanwhile: nothing dropped
                pass
        lookups.append((table, ids))

    def record_lookup_bytes(self, table: str, ids: bytes) -> None:
        """:meth:`record_lookup` for IDs as a binary request carries them (little-endian int64
        bytes, a slice of its body): a batch-1 lookup builds no array, and this thread joins a
        round's slices of a table and makes one array of them, with no Python step per request
        (the per-request queue and its drain loop were about 8% of a batch-1 lookup's server
        CPU).  At most ``_LOOKUP_QUEUE_MAX`` slices wait per table, ``_SMALL_SLICES_MAX`` when
        they are small (a few IDs each, the batch-1 traffic that arrives fastest); later ones are
        dropped until the next round, as the array queue drops its oldest."""
        parts = self._raw_lookups.get(table)
        if parts is None:
            parts = self._raw_lookups.setdefault(table, [])
        waiting = len(parts)
        if waiting < _LOOKUP_QUEUE_MAX or (waiting < _SMALL_SLICES_MAX and len(ids) <= _SMALL_SLICE_BYTES):
            parts.append(ids)
        else:
            self.metrics.sketch_dropped.labels(table).inc()  # a lock, but only past the cap

    def _drain_lookups(self) -> None:
        # one sketch update per table for everything queued since the last round: the torch
        # overhead of an update is paid once, not once per request.  Locked: a re-decision
        # called from a request thread drains too, and sketch updates must not interleave.
        with self._drain_lock:
            pending: dict[str, list[np.ndarray]] = {}
            while self._lookups:
                name, ids = self._lookups.popleft()
                pending.setdefault(name, []).append(ids)
            for name, parts in list(self._raw_lookups.items()):  # list(): the request path may add a table meanwhile
                taken = len(parts)
                if taken:
                    raw = b"".join(parts[:taken])
                    del parts[:taken]  # what was appended since stays for the next round
                    pending.setdefault(name, []).append(np.frombuffer(raw, dtype="<i8"))
            for name, chunks in pending.items():
                hosted = self.tables.get(name)
                if hosted is None or hosted.sketch is None:
                    continue
                ids = np.concatenate(chunks)
                weight = 1.0
                if ids.shape[0] > _SKETCH_SAMPLE_MAX:
                    weight = ids.shape[0] / _SKETCH_SAMPLE_MAX
                    ids = ids[self._rng.integers(0, ids.shape[0], _SKETCH_SAMPLE_MAX)]
                hosted.sketch.add(torch.from_numpy(ids), weight)

    def _maybe_redecide(self) -> None:
        now = time.monotonic()
        for name in self.tables.names():
            hosted = self.tables.get(name)
            if hosted is None or hosted.policy is None or hosted.budget_bytes is None:
                continue
            if hosted.over_budget is not None and (
                hosted.updates_since_decision == 0 or now - hosted.over_budget_since < _OVER_BUDGET_RETRY_S
            ):
                continue  # it did not fit; nothing changed since, or tried a moment ago
            over = hosted.table.nbytes > hosted.budget_bytes
            segment = hosted.updates_since_decision >= self.settings.segment_updates or (
                hosted.updates_since_decision > 0 and now - hosted.last_decision_at >= self.settings.segment_seconds
            )
            # A re-decision is O(held IDs) (compact, estimates, the policy, the index rebuild): a
            # 1M-ID table takes seconds, so a stream that fills a segment faster than that would
            # keep the applier re-deciding and never applying.  Segments therefore also wait for
            # the last re-decision's time times (1 / share - 1): at most `redecide_max_share` of
            # the applier's time.  An over-budget table does not wait (the budget comes first).
            share = self.settings.redecide_max_share
            paced = now - hosted.last_decision_at >= hosted.last_decision_seconds * (1.0 / share - 1.0)
            segment = segment and paced
            if over or segment:
                # one table's trouble is that table's: the round (and every other table) goes on
                try:
                    self.redecide(hosted)
                except BudgetTooSmall:
                    pass  # marked over budget by redecide
                except Exception:  # noqa: BLE001
                    log.exception("re-deciding %s failed; its rows stay where they are", hosted.name)

    def redecide(self, hosted: HostedTable) -> dict[str, Any]:
        """Re-assign every row's class by the table's policy inside its budget, move rows, compact."""
        if hosted.policy is None or hosted.budget_bytes is None:
            raise ValueError(f"table {hosted.name!r} has no policy and budget")
        started = time.perf_counter()
        table = hosted.table
        self._drain_lookups()  # the decision counts every lookup answered so far, not only the drained ones
        with hosted.write_lock:
            # Nothing else writes the table now (write_lock) and lookups only read it, so what
            # the decision reads needs no table.lock: lookups go on while it is made (1M IDs:
            # 0.2 s to decide, 0.3-0.5 s to compact, 0.5 s to rebuild the index, all of which
            # held them up before; bench/results/redecide_stall.md).
            ids, _ = table.index.live_items()
            ids = ids.cpu()
            if hosted.sketch is not None:
                hosted.sketch.decay()
                freqs = hosted.sketch.estimate(ids)
            else:
                freqs = torch.ones(ids.numel())
            # index, rotation, fallback: not the policy's to move.  Slabs and their free lists
            # are the rows' (apply_decision compacts: no free slots after it)
            fixed = table.nbytes - sum(s.numel() * s.element_size() for s in table.slabs + table.free)
            try:
                try:
                    decision = hosted.policy.decide(table, ids, freqs, int(hosted.budget_bytes * _BUDGET_FILL) - fixed)
                except BudgetTooSmall:  # no room left for new IDs: the whole budget, then
                    decision = hosted.policy.decide(table, ids, freqs, int(hosted.budget_bytes) - fixed)
            except BudgetTooSmall as exc:
                # the rows stay as they are and the table is served over its budget, marked so
                # (table info, /readyz, embserve_table_over_budget) until deletes or a budget fit
                hosted.over_budget = str(exc)
                hosted.over_budget_since = time.monotonic()
                hosted.updates_since_decision = 0
                log.warning("table %s is over its budget of %d bytes: %s", hosted.name, hosted.budget_bytes, exc)
                raise
            hosted.over_budget = None
            # rows re-encoded beside the lookups and written under table.lock in one step, then
            # compacted a slab at a time (copied beside, swapped under it)
            moved = apply_decision(table, ids, decision, sole_writer=True)
            hosted.rank_map = decision.rank_map
            if isinstance(table.index, HashIndex):
                # the IDs that arrived since the last one into the static part (one slot read
                # each), or the hottest back in their home slots: built beside the index, taken
                # under the lock
                rebuilt = table.index.rebuilt(None if hosted.sketch is None else hosted.sketch.estimate)
                with table.lock:
                    table.index.take(rebuilt)
        hosted.updates_since_decision = 0
        hosted.last_decision_at = time.monotonic()
        hosted.last_decision_seconds = time.perf_counter() - started
        hosted.dirty = True
        for label, rows in moved.items():
            self.metrics.rows_moved.labels(hosted.name, label).inc(rows)
        self.metrics.resize_events.labels(hosted.name).inc()
        self.metrics.redecision_seconds.labels(hosted.name).observe(hosted.last_decision_seconds)
        log.info("re-decided %s in %.2fs: moved %s, %d bytes (budget %d)", hosted.name, time.perf_counter() - started, moved, table.nbytes, hosted.budget_bytes)
        return {"moved": moved, "bytes": table.nbytes, "budget_bytes": hosted.budget_bytes}

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, hosted: HostedTable) -> Position | None:
        """Write the table and the log position it includes; the file replaces the old one
        atomically.  Serialized per table, never backwards, a no-op once dropped (tablefiles.py)."""
        return write_snapshot(hosted, Path(self.settings.tables_dir))

    def snapshot_all(self, only_dirty: bool = False) -> None:
        for name in self.tables.names():
            hosted = self.tables.get(name)
            if hosted is not None and (hosted.dirty or not only_dirty or hosted.snapshot_position != hosted.log_position):
                try:
                    self.snapshot(hosted)
                except Exception:  # noqa: BLE001 - a failed write (disk full) keeps the older file and the log behind it
                    log.exception("snapshot of %s failed; the log is kept behind its last file", name)
        self._last_snapshot = time.monotonic()
        self.trim()

    def needed_position(self) -> Position | None:
        """The oldest log position this replica may still replay from: its oldest snapshot
        (None: it needs the whole log)."""
        kept = [self.tables.get(n) for n in self.tables.names()]
        positions = [h.snapshot_position for h in kept if h is not None]
        if None in positions:
            return None
        return min(positions) if positions else self.position  # type: ignore[type-var]

    def trim(self) -> int:
        """Drop log entries every table's snapshot already holds; on a Redis stream, only those
        every live replica's snapshots hold.  Off with ``trim_log=false``."""
        if self.trim_coordinator is not None:
            needed = self.needed_position()
            self._last_heartbeat = time.monotonic()
            if not self.settings.trim_log:
                self.trim_coordinator.heartbeat(needed)  # still hold the others back
                return 0
            return self.trim_coordinator.trim(needed)
        if not self.settings.trim_log:
            return 0
        kept = [self.tables.get(n) for n in self.tables.names()]
        positions = [h.snapshot_position for h in kept if h is not None]
        if not positions or None in positions:
            return 0
        return self.log.trim_before(min(positions))  # type: ignore[type-var]

    # ------------------------------------------------------------------ metrics

    def _update_lag(self) -> None:
        try:
            lag = self.log.count_after(self.position, limit=1_000_000)
            oldest = self.log.oldest_after(self.position) if lag else None
        except Exception:  # noqa: BLE001 - metrics must not break the loop
            return
        self.metrics.log_lag_entries.set(lag)
        self.metrics.log_lag_seconds.set(0.0 if oldest is None else max(0.0, time.time() - oldest))
