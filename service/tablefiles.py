"""Table files in the tables folder, and the rules that keep them consistent with the update log
under concurrent snapshots, drops and crashes.

* **Snapshots of one table are serialized** (``HostedTable.snapshot_lock``, held from the
  capture to the rename).  Two overlapping snapshots could otherwise finish out of order: the
  newer one's file lands, the log is trimmed behind it, then the older one replaces it - and
  the entries in between exist nowhere.  Under the lock a file is also never replaced by one
  that includes less of the log, and ``snapshot_position`` (what the trim goes by) moves only
  after the new file is durably in place.
* **A drop is final.**  It takes the same lock (so it waits for a snapshot in flight), marks the
  table dropped (later snapshot attempts with a stale handle are no-ops), records the name in
  ``dropped-tables.json`` (fsynced, before the file goes) and then deletes the file.  Start-up
  (``TableRegistry.load_dir``) finishes an interrupted drop and removes a dropped table that a
  seed folder copied back, so a restart never resurrects it.  Creating the name again clears
  the record first.
* **Leftovers.**  A snapshot killed mid-write leaves ``.<name>.safetensors.<random>.tmp``; a
  seed copy killed mid-way leaves ``<name>.safetensors.seeding``.  Start-up deletes both.

``dropped-tables.json`` layout: ``{"<table name>": "<log position at the drop>", ...}`` (the
position is informational: what keeps a re-created table from the old one's entries is that it
starts at the log's last position, see ``routers/admin.py``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from compression.storage import TABLE_SUFFIX, capture_state, fsync_dir, write_state

from .updatelog import Position, format_position

if TYPE_CHECKING:  # registry.py imports this module (start-up housekeeping in load_dir)
    from .registry import HostedTable, TableRegistry

log = logging.getLogger("embserve")

DROPPED_FILE = "dropped-tables.json"
_dropped_lock = threading.Lock()  # read-modify-write of the drop record, within this process


def table_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}{TABLE_SUFFIX}"


def write_snapshot(hosted: HostedTable, folder: Path) -> Position | None:
    """Write ``hosted`` to its file with the log position it includes; returns that position, or
    None when the table was dropped (nothing is written then)."""
    with hosted.snapshot_lock:
        if hosted.dropped:
            return None
        # every writer of the table (log entries, re-decisions, capacity changes) takes its write
        # lock: holding it, the copy is consistent with the position, and lookups go on meanwhile
        with hosted.write_lock:
            position = hosted.log_position
            if hosted.snapshot_position is not None and (position is None or position < hosted.snapshot_position):
                # cannot happen while log positions only grow; refuse rather than move the file back
                log.error("not writing %s at %s: its file already includes %s", hosted.name, format_position(position),
                          format_position(hosted.snapshot_position))
                return hosted.snapshot_position
            tensors, manifest = capture_state(hosted.table, format_position(position), hosted.extra(), writers_excluded=True)
            hosted.dirty = False
        try:
            write_state(tensors, manifest, table_path(folder, hosted.name))
        except BaseException:
            hosted.dirty = True  # still to be written
            raise
        hosted.manifest = manifest
        hosted.snapshot_position = position
        hosted.snapshot_at = time.time()
        return position


def drop(tables: TableRegistry, hosted: HostedTable, folder: Path, position: Position | None) -> bool:
    """Stop serving ``hosted`` and delete its file, for good.  Waits for a snapshot of it in
    flight.  Returns False when another drop got there first."""
    with hosted.snapshot_lock:
        if hosted.dropped:
            return False
        hosted.dropped = True
        if tables.get(hosted.name) is hosted:
            tables.remove(hosted.name)
        record_dropped(folder, hosted.name, position)
        path = table_path(folder, hosted.name)
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
    return True


def dropped_names(folder: Path) -> dict[str, str | None]:
    path = Path(folder) / DROPPED_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        # unreadable: keep serving what is there rather than refuse to start; say so loudly
        log.error("cannot read %s (%s): dropped tables are not filtered", path, exc)
        return {}
    return {str(k): v for k, v in data.items()} if isinstance(data, dict) else {}


def record_dropped(folder: Path, name: str, position: Position | None) -> None:
    with _dropped_lock:
        names = dropped_names(folder)
        names[name] = format_position(position)
        _write_json(Path(folder) / DROPPED_FILE, names)


def clear_dropped(folder: Path, name: str) -> None:
    """Forget a drop before the name is created again (durably first: a crash after this and
    before the new file only loses a table that was never acknowledged)."""
    with _dropped_lock:
        names = dropped_names(folder)
        if name in names:
            del names[name]
            _write_json(Path(folder) / DROPPED_FILE, names)


def clean_folder(folder: Path) -> list[str]:
    """Start-up housekeeping (before tables load): delete temp files of interrupted snapshots and
    seed copies, and the files of dropped tables (an interrupted drop, or a seed copy of a
    dropped table).  Returns what it deleted, by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    leftovers = list(folder.glob(f".*{TABLE_SUFFIX}.*.tmp")) + list(folder.glob(f"*{TABLE_SUFFIX}.seeding"))
    for name in dropped_names(folder):
        leftovers.append(table_path(folder, name))
    for path in leftovers:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    if removed:
        fsync_dir(folder)
    return sorted(removed)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

