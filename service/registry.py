"""The tables a service process hosts, by name.  A table's name is its file's stem in the tables
folder; names are restricted to a safe pattern so no request can reach a path outside it."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compression import CompressedTable, load_table
from compression.storage import TABLE_SUFFIX, TableFormatError

log = logging.getLogger("embserve")

TABLE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME_RE = re.compile(TABLE_NAME_PATTERN)


def valid_table_name(name: str) -> bool:
    return bool(_NAME_RE.match(name)) and ".." not in name


@dataclass
class HostedTable:
    name: str
    table: CompressedTable
    manifest: dict[str, Any]
    path: Path | None
    loaded_at: float = field(default_factory=time.time)


class TableRegistry:
    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
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
        hosted = HostedTable(name, table.to(self.device) if table.device != self.device else table, manifest or {}, path)
        with self._lock:
            self._tables[name] = hosted
        return hosted

    def load_dir(self, folder: Path) -> list[str]:
        """Load every table file in ``folder``; a broken file is logged and skipped, not fatal."""
        loaded = []
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
