"""Coarse-grained parallelism for the encoder: independent pieces of work (row chunks, candidate
classes) on a few Python threads, each running torch with one intra-op thread.

Why not torch's own intra-op threads: encoding is hundreds of small ops per block of rows, and
every op ends in an OpenMP barrier.  On a shared host (more runnable threads than cores) one
descheduled thread stalls the others at each barrier, spinning: `embserve compress` of a
1M x 64 table took 38 s wall / 22 CPU-s with 2 intra-op threads at load average 7.5 and 7.6 s
/ 6 CPU-s with one.  Threads that each own whole pieces never wait on each other mid-piece; torch
releases the GIL inside every op, so two of them keep two cores busy.

Each piece is computed exactly as it would be serially (one thread, same op order), so results
do not depend on the number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


# the torch thread count in force when coarse_threads() was entered (None outside it)
_outer_threads: ContextVar[int | None] = ContextVar("outer_threads", default=None)


def default_workers() -> int:
    """Workers for :func:`thread_map`: the caller's torch thread count (so ``OMP_NUM_THREADS=1``
    or ``torch.set_num_threads(1)`` keeps everything on one core), at most the CPU count.
    Inside :func:`coarse_threads`, the count from before it was entered."""
    outer = _outer_threads.get()
    return max(1, min(outer if outer is not None else torch.get_num_threads(), os.cpu_count() or 1))


@contextmanager
def coarse_threads() -> Iterator[None]:
    """Run the calling thread's torch ops on one intra-op thread (the small ops between the
    parallel pieces suffer from barrier spinning just the same), while :func:`thread_map` still
    uses as many workers as the caller had threads; the caller's count is restored on exit."""
    own = torch.get_num_threads()
    token = _outer_threads.set(_outer_threads.get() or own)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(own)
        _outer_threads.reset(token)


def _single_threaded() -> None:
    torch.set_num_threads(1)  # per worker thread (OpenMP's thread count is per calling thread)


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """``fn`` over ``items`` on ``workers`` threads (default :func:`default_workers`), results
    yielded in input order as they are ready (so a caller can report progress).  With one
    worker it runs inline, in the calling thread, with its thread settings untouched."""
    workers = default_workers() if workers is None else workers
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
        return
    own = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(items)), initializer=_single_threaded) as pool:
            yield from pool.map(fn, items)
    finally:
        # some BLAS libraries take the thread count process-wide: give the caller its own back
        torch.set_num_threads(own)
