"""Loading the tables folder at start-up, stoppable by a signal.

uvicorn's signal handlers only set a flag that its main loop reads once start-up is over, so a
Ctrl-C (or a ``docker stop``) while large tables load used to be honoured only after every table
was loaded, the port bound and the update log replayed.  Before serving starts nothing needs
saving (tables come from files, nothing was applied yet), so here the signal's default action
applies: the process stops at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from .registry import TableRegistry
from .settings import Settings

log = logging.getLogger("embserve")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_stop_the_process() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM end the process (logged, then the signal's default
    action, so the exit status says which signal); the previous handlers come back after it.
    Signal handlers belong to the main thread: elsewhere (an in-process test client) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig: int, frame: FrameType | None) -> None:
        log.warning("%s while loading tables: stopping before serving", signal.Signals(sig).name)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ensure_tables_dir(folder: Path) -> None:
    """Create a missing tables folder, and say so: it is usually a mistyped path, and tables
    created by the admin API or snapshots will be written there."""
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        log.warning("tables folder %s did not exist: created it, empty", folder.resolve())


def load_tables(settings: Settings, tables: TableRegistry) -> list[str]:
    """Seed (replicas) and load the tables folder; a signal meanwhile stops the process."""
    with signals_stop_the_process():
        ensure_tables_dir(settings.tables_dir)
        if settings.seed_dir is not None:
            seeded = TableRegistry.seed(settings.tables_dir, settings.seed_dir)
            if seeded:
                log.info("seeded %s from %s", ", ".join(seeded), settings.seed_dir)
        names = tables.load_dir(settings.tables_dir)
    log.info("serving %d table(s) from %s: %s", len(names), settings.tables_dir, ", ".join(names) or "-")
    return names
