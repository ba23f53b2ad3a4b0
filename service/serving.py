"""Run the app under an HTTP server, in this process: ``uvicorn`` or ``granian`` (setting
``EMBSERVE_HTTP_SERVER``).

Both run the app's lifespan on this process's event loop, so everything the lifespan starts
(update applier, the v2 gRPC server on ``EMBSERVE_GRPC_PORT``) shares the process, and SIGTERM
or SIGINT is a clean stop (the lifespan's shutdown snapshots changed tables).

Why two: the HTTP server's own per-request work is most of a batch-1 lookup's server CPU.
granian parses HTTP and writes responses in Rust; uvicorn (httptools + uvloop) does part of
that in Python.  ``bench/service.py --compare-servers`` measures both, interleaved, in one
run; the default is the one that measured faster (bench/results/service.md).  granian runs in
its embedded mode (one worker, on our loop), which its authors call experimental, so uvicorn
stays one setting away.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import platform
import signal
from typing import Any

from .settings import Settings

log = logging.getLogger("embserve")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Buffers below this come from the heap and are reused; freed heap tops below the trim
# threshold stay mapped.  64/128 MiB: a request or log entry of 10k x 64 rows is ~2.6 MB.
_MMAP_THRESHOLD_BYTES = 64 << 20
_TRIM_THRESHOLD_BYTES = 128 << 20


def keep_freed_buffers() -> bool:
    """Make glibc reuse freed multi-megabyte buffers instead of unmapping them.

    Why: every update request and every log entry the applier reads allocates a few buffers of
    megabytes (the body, the log's blob, the kept vectors, the encoded rows).  glibc serves each
    from a fresh mmap and unmaps it on free, so every page is faulted in and zeroed by the kernel
    again per request: a profile of the update path put page faults and page clearing at about a
    tenth of the server's CPU (bench/results/streaming_scale.md).  With fixed thresholds the
    heap keeps the freed memory for the next request (bounded by the trim threshold per arena).
    An operator's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` wins; not glibc:
    nothing changes.  Returns whether the thresholds were set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


def run(app: Any, settings: Settings) -> None:
    """Serve ``app`` until SIGTERM/SIGINT."""
    if keep_freed_buffers():
        log.debug("glibc malloc: mmap threshold %d, trim threshold %d", _MMAP_THRESHOLD_BYTES, _TRIM_THRESHOLD_BYTES)
    if settings.http_server == "granian":
        _run_granian(app, settings)
    else:
        _run_uvicorn(app, settings)


def _run_uvicorn(app: Any, settings: Settings) -> None:
    import uvicorn

    http: Any = "auto"
    if settings.http_fast_path:
        try:
            from .fasthttp import TESTED_UVICORN, protocol_class  # needs httptools (uvicorn[standard])
        except ImportError:
            pass
        else:
            if uvicorn.__version__.startswith(TESTED_UVICORN):
                http = protocol_class(app)  # small lookups answered below ASGI (service/fasthttp.py)
            else:  # it subclasses uvicorn internals: only on the releases its tests ran against
                log.warning(
                    "uvicorn %s: the HTTP-level lookup fast path is tested on %s only; serving every request through ASGI",
                    uvicorn.__version__, ", ".join(TESTED_UVICORN),
                )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False, http=http)


def _run_granian(app: Any, settings: Settings) -> None:
    try:
        import granian  # noqa: F401 - the bench extra
    except ImportError:
        raise SystemExit("EMBSERVE_HTTP_SERVER=granian needs granian installed (pip install 'embserve[bench]')") from None
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server.embed import Server

    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # uvloop is optional; asyncio's loop works, a little slower
        loop_factory = asyncio.new_event_loop
    level = settings.log_level.lower()
    server = Server(
        app,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        websockets=False,
        log_level=LogLevels(level) if level in LogLevels.__members__.values() else LogLevels.info,
        log_access=False,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
