"""The tables a service process hosts, by name.  A table's name is its file's stem in the tables
folder; names are restricted to a safe pattern so no request can reach a path outside it."""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compression import CompressedTable, load_table
from compression.frequency import DecayedCountMinSketch
from compression.policies import POLICIES, DimensionPolicy, RankClassMap
from compression.storage import TABLE_SUFFIX, TableFormatError

from .tablefiles import clean_folder
from .updatelog import Position, parse_position

log = logging.getLogger("embserve")

TABLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME_RE = re.compile(TABLE_NAME_PATTERN)


def valid_table_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and ".." not in name


def policy_from_config(config: dict[str, Any] | None) -> DimensionPolicy | None:
    """``{"name": "scall", "alpha": 0.6}`` -> a policy object; None or name "none" -> None."""
    if not config or config.get("name") in (None, "none"):
        return None
    params = {k: v for k, v in config.items() if k != "name"}
    kind = POLICIES.get(str(config["name"]))
    if kind is None:
        raise ValueError(f"unknown policy {config['name']!r}; one of {sorted(POLICIES)} or 'none'")
    return kind(**params)  # type: ignore[no-any-return]


def policy_config(policy: DimensionPolicy | None) -> dict[str, Any]:
    if policy is None:
        return {"name": "none"}
    return {k: v for k, v in vars(policy).items()}


@dataclass
class HostedTable:
    """A served table and what streaming keeps about it."""

    name: str
    table: CompressedTable
    manifest: dict[str, Any]
    path: Path | None
    loaded_at: float = field(default_factory=time.time)
    log_position: Position | None = None  # every log entry up to here is in the table
    snapshot_position: Position | None = None  # ... and up to here in its file on disk
    snapshot_at: float | None = None
    budget_bytes: int | None = None
    policy: DimensionPolicy | None = None
    rank_map: RankClassMap = field(default_factory=RankClassMap)
    sketch: DecayedCountMinSketch | None = None
    updates_since_decision: int = 0
    last_decision_at: float = field(default_factory=time.monotonic)
    last_decision_seconds: float = 0.0  # how long the last re-decision took (paces the next one)
    dirty: bool = False  # changed since the last snapshot
    # snapshots of this table run one at a time (service/tablefiles.py): two overlapping ones
    # could finish out of order and put an older file over a newer one the trim relied on
    snapshot_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # the table's writers, one at a time: the applier's log entries, re-decisions (which an
    # admin request may run on its own thread) and capacity changes.  Lookups never take it, only
    # table.lock, which writers hold just while they change what lookups read; so a re-decision
    # does its work (seconds at 1M IDs) with lookups going on and takes table.lock only to swap
    # arrays, and a snapshot copies the table holding this lock alone (no writer can change it;
    # lookups only read).  Order: snapshot_lock, write_lock, table.lock.
    write_lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    dropped: bool = False  # set under snapshot_lock by a drop: later snapshots are no-ops
    over_budget: str | None = None  # why the policy cannot fit the rows in the budget; None = fits
    over_budget_since: float = 0.0  # monotonic time of the last failed re-decision

    def extra(self) -> dict[str, Any]:
        """Manifest ``extra`` to write with a snapshot: what the table was made from, plus the
        streaming settings that must survive a restart."""
        extra = dict(self.manifest.get("extra", {}))
        extra["budget_bytes"] = self.budget_bytes
        extra["policy"] = policy_config(self.policy)
        return extra


class TableRegistry:
    def __init__(self, device: str = "cpu", sketch_width: int = 1 << 20, half_life_s: float = 3600.0) -> None:
        self.device = torch.device(device)
        self.sketch_width = sketch_width
        self.half_life_s = half_life_s
        self._tables: dict[str, HostedTable] = {}
        self._lock = threading.Lock()
        self.ready = False
        self.load_errors: dict[str, str] = {}

    def names(self) -> list[str]:
        return sorted(self._tables)

    def get(self, name: str) -> HostedTable | None:
        return self._tables.get(name)

    def add(self, name: str, table: CompressedTable, manifest: dict[str, Any] | None = None, path: Path | None = None) -> HostedTable:
        if not valid_table_name(name):
            raise ValueError(f"invalid table name {name!r}: must match {TABLE_NAME_PATTERN}")
        manifest = manifest or {}
        extra = manifest.get("extra", {}) or {}
        hosted = HostedTable(
            name,
            table.to(self.device) if table.device != self.device else table,
            manifest,
            path,
            log_position=parse_position(manifest.get("log_position")),
            budget_bytes=extra.get("budget_bytes"),
            policy=policy_from_config(extra.get("policy")),
            sketch=DecayedCountMinSketch(self.sketch_width, 4, self.half_life_s),
        )
        hosted.snapshot_position = hosted.log_position
        with self._lock:
            self._tables[name] = hosted
        return hosted

    def remove(self, name: str) -> HostedTable | None:
        with self._lock:
            return self._tables.pop(name, None)

    @staticmethod
    def seed(folder: Path, seed_dir: Path) -> list[str]:
        """Copy base tables that ``folder`` lacks from ``seed_dir`` (atomically: temp + rename), so
        a new replica starts from the shared base and keeps its own snapshots in ``folder``."""
        copied = []
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(seed_dir.glob(f"*{TABLE_SUFFIX}")):
            target = folder / path.name
            if target.exists() or not valid_table_name(path.name[: -len(TABLE_SUFFIX)]):
                continue
            partial = target.with_name(target.name + ".seeding")
            shutil.copyfile(path, partial)
            os.replace(partial, target)
            copied.append(path.name)
        return copied

    def load_dir(self, folder: Path) -> list[str]:
        """Load every table file in ``folder``; a broken file is logged and skipped, not fatal.  First
        the folder is cleaned (``tablefiles.clean_folder``): leftovers of interrupted writes go, and
        so do files of dropped tables (an interrupted drop, or a seed copy of a dropped table)."""
        loaded = []
        removed = clean_folder(folder)  # interrupted snapshots and seed copies, dropped tables
        if removed:
            log.info("removed leftovers of interrupted writes and dropped tables: %s", ", ".join(removed))
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{TABLE_SUFFIX}")):
                name = path.name[: -len(TABLE_SUFFIX)]
                if not valid_table_name(name):
                    self.load_errors[path.name] = "file name is not a valid table name"
                    continue
                try:
                    table, manifest = load_table(path, device=self.device)
                except (TableFormatError, OSError, ValueError) as exc:
                    log.error("cannot load table %s: %s", path, exc)
                    self.load_errors[path.name] = str(exc)
                    continue
                self.add(name, table, manifest, path)
                loaded.append(name)
                log.info("loaded table %s from %s", name, path)
        self.ready = True
        return loaded
