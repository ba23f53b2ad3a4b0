"""``embserve`` command line: compress, inspect, serve, demo."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from compression import candidate_classes, compress, load_table, read_manifest, save_table
from compression.allocation import OBJECTIVES, BudgetTooSmall
from compression.storage import TABLE_SUFFIX, TableFormatError
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies

from .registry import valid_table_name
from .settings import Settings

app = typer.Typer(help="Compressed embedding tables: build them, look inside them, serve them.", no_args_is_help=True)
console = Console(stderr=True)


def _load_array(path: Path, tensor: str | None = None) -> torch.Tensor:
    """A 1-D or 2-D array from ``.npy`` or ``.safetensors`` (the one tensor, or ``tensor``)."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if tensor is None:
            if len(tensors) != 1:
                raise typer.BadParameter(f"{path} holds {sorted(tensors)}; pick one with --tensor")
            return next(iter(tensors.values()))
        if tensor not in tensors:
            raise typer.BadParameter(f"{path} has no tensor {tensor!r}")
        return tensors[tensor]
    raise typer.BadParameter(f"{path}: expected a .npy or .safetensors file")


def _parse_ints(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in text.split(",") if x.strip()]


def _summary(table_path: Path, elapsed: float | None = None, error: float | None = None) -> None:
    table, manifest = load_table(table_path)
    stats = table.stats()
    grid = RichTable(title=f"{table_path.name}", show_lines=False)
    for col in ("class", "rows", "row bytes", "slab bytes"):
        grid.add_column(col, justify="right")
    for cs in stats.classes:
        grid.add_row(cs.row_class.label(), f"{cs.rows:,}", str(cs.row_class.row_bytes), f"{cs.bytes:,}")
    console.print(grid)
    console.print(
        f"ids {stats.num_ids:,}  dim {stats.dim}  index {stats.index_kind} ({stats.index_bytes:,} B)  "
        f"total {stats.nbytes:,} B  {stats.bits_per_parameter:.2f} bits/param  ratio {stats.compression_ratio:.1f}x vs fp32  "
        f"rotation {'yes' if table.rotation is not None else 'no'}  unknown-ID policy {table.unknown.kind}"
    )
    if error is not None:
        console.print(f"frequency-weighted relative squared error: {error:.4g}")
    if elapsed is not None:
        console.print(f"built in {elapsed:.1f} s")


def weighted_relative_error(rows: torch.Tensor, freqs: torch.Tensor, table_path: Path, sample: int = 65536) -> float:
    """sum f_i ||x_i - x̂_i||^2 / sum f_i ||x_i||^2 over a frequency-drawn sample of IDs."""
    table, _ = load_table(table_path)
    positions = sample_ids(freqs, min(sample, rows.shape[0]))
    ids = positions if table.index.positional else None
    if ids is None:
        return float("nan")  # keyed tables: the caller maps positions to IDs
    decoded = table.lookup(ids).values
    truth = rows[positions]
    return float(((decoded - truth) ** 2).sum() / (truth**2).sum())


@app.command("compress")
def compress_cmd(
    input: Annotated[Path, typer.Argument(help="dense fp32 table [N, D] (.npy or .safetensors)", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Argument(help="compressed table file to write (.safetensors)")],
    frequencies: Annotated[Optional[Path], typer.Option(help="per-row lookup counts [N] (.npy); default uniform")] = None,
    ids: Annotated[Optional[Path], typer.Option(help="int64 ID of each row [N] (.npy); default dense IDs 0..N-1")] = None,
    tensor: Annotated[Optional[str], typer.Option(help="tensor name inside a .safetensors input")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="target compression ratio vs fp32 (budget = N*D*4/ratio)")] = None,
    budget_bytes: Annotated[Optional[int], typer.Option(help="byte budget for everything the table holds")] = None,
    bits: Annotated[str, typer.Option(help="candidate bit widths, comma-separated")] = "32,16,8,4,2,1",
    dims: Annotated[Optional[str], typer.Option(help="candidate dims, comma-separated (default D,D/2,D/4,D/8,0)")] = None,
    unknown: Annotated[str, typer.Option(help="unknown-ID policy: zero, default or hashed")] = "zero",
    groups: Annotated[int, typer.Option(help="frequency groups for the allocation")] = 64,
    index: Annotated[str, typer.Option(help="ID index: auto (cheapest that serves the IDs), dense, runs or keyed")] = "auto",
    objective: Annotated[str, typer.Option(help="what to minimize: l2 (rankers) or cosine (retrieval; per-row relative error)")] = "l2",
) -> None:
    """Compress a dense table into mixed (dim, bits) row classes within a memory budget."""
    if (ratio is None) == (budget_bytes is None):
        raise typer.BadParameter("give exactly one of --ratio and --budget-bytes")
    if unknown not in ("zero", "default", "hashed"):
        raise typer.BadParameter("--unknown must be zero, default or hashed")
    if index not in ("auto", "dense", "runs", "keyed"):
        raise typer.BadParameter("--index must be auto, dense, runs or keyed")
    if objective not in OBJECTIVES:
        raise typer.BadParameter(f"--objective must be one of {', '.join(OBJECTIVES)}")
    rows = _load_array(input, tensor).to(torch.float32)
    if rows.dim() != 2:
        raise typer.BadParameter(f"{input}: expected a 2-D table, got shape {list(rows.shape)}")
    freqs = _load_array(frequencies).to(torch.float64) if frequencies else None
    id_tensor = _load_array(ids).to(torch.int64) if ids else None
    cands = candidate_classes(rows.shape[1], _parse_ints(dims), tuple(_parse_ints(bits) or ()))
    started = time.perf_counter()
    with Progress(TextColumn("[bold]encoding rows"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("encode", total=rows.shape[0])
        try:
            table, report = compress(
                rows, freqs, budget_bytes=budget_bytes, ratio=ratio, ids=id_tensor, candidates=cands,
                num_groups=groups, unknown=unknown, index=index, objective=objective,  # type: ignore[arg-type]
                progress=lambda done, total: progress.update(task, completed=done),
            )
        except (BudgetTooSmall, ValueError) as exc:
            console.print(f"[red]cannot compress:[/red] {exc}")
            raise typer.Exit(2) from exc
    save_table(table, output, extra={"source": input.name})
    elapsed = time.perf_counter() - started
    error = weighted_relative_error(rows, freqs if freqs is not None else torch.ones(rows.shape[0]), output) if id_tensor is None else None
    _summary(output, elapsed, error)
    console.print(f"budget {report.budget_bytes:,} B; plan {report.plan}, index {report.index}, objective {report.objective}; wrote {output}")


@app.command("inspect")
def inspect_cmd(file: Annotated[Path, typer.Argument(help="compressed table file", exists=True, dir_okay=False)]) -> None:
    """Print a table file's manifest, classes, bytes and ratio."""
    try:
        manifest = read_manifest(file)
    except TableFormatError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    console.print_json(data=manifest)
    _summary(file)


@app.command("serve")
def serve_cmd(
    tables_dir: Annotated[Optional[Path], typer.Option(help="folder of table files [env EMBSERVE_TABLES_DIR]")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address [env EMBSERVE_HOST]")] = None,
    port: Annotated[Optional[int], typer.Option(help="port [env EMBSERVE_PORT]")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N [env EMBSERVE_DEVICE]")] = None,
    torch_threads: Annotated[Optional[int], typer.Option(help="torch/decoder threads [env EMBSERVE_TORCH_THREADS]")] = None,
) -> None:
    """Serve every table in the tables folder over HTTP."""
    overrides = {k: v for k, v in dict(tables_dir=tables_dir, host=host, port=port, device=device, torch_threads=torch_threads).items() if v is not None}
    _serve(Settings(**overrides))


def _serve(settings: Settings) -> None:
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.token is None and settings.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("embserve").warning(
            "no write token (EMBSERVE_TOKEN / EMBSERVE_TOKEN_FILE): updates and admin calls are refused from anywhere but loopback"
        )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)


@app.command("demo")
def demo_cmd(
    tables_dir: Annotated[Path, typer.Option(help="where the demo table is written and served from")] = Path("tables"),
    rows: Annotated[int, typer.Option(help="IDs in the demo table")] = 1_000_000,
    dim: Annotated[int, typer.Option(help="embedding dimension")] = 64,
    ratio: Annotated[float, typer.Option(help="compression ratio vs fp32")] = 8.0,
    name: Annotated[str, typer.Option(help="table name")] = "demo",
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8080,
    rebuild: Annotated[bool, typer.Option(help="rebuild even if the demo table exists")] = False,
    serve: Annotated[bool, typer.Option(help="serve it once built (--no-serve: build and exit, e.g. a seeding job)")] = True,
) -> None:
    """Build a realistic demo table (Zipf-distributed IDs, trained-like rows), compress it, serve it."""
    if not valid_table_name(name):
        raise typer.BadParameter("invalid table name")
    path = tables_dir / f"{name}{TABLE_SUFFIX}"
    if rebuild or not path.exists():
        started = time.perf_counter()
        console.print(f"building demo table {name}: {rows:,} x {dim}, Zipf frequencies, ratio {ratio}x ...")
        freqs = zipf_frequencies(rows)
        dense = synthetic_table(rows, dim, freqs)
        table, _ = compress(dense, freqs, ratio=ratio)
        save_table(table, path, extra={"source": "embserve demo", "rows": rows, "dim": dim, "ratio": ratio})
        console.print(f"built in {time.perf_counter() - started:.1f} s")
        _summary(path)
    else:
        console.print(f"the demo table exists: {path} (--rebuild to make it anew)")
    if serve:
        _serve(Settings(tables_dir=tables_dir, host=host, port=port))


@app.command("probe")
def probe_cmd(
    path: Annotated[str, typer.Argument(help="endpoint to probe")] = "/healthz",
    timeout: Annotated[float, typer.Option(help="seconds")] = 2.0,
) -> None:
    """Exit 0 when the local server answers ``path`` with 200 (container health checks; no curl needed)."""
    import http.client

    settings = Settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    try:
        conn = http.client.HTTPConnection(host, settings.port, timeout=timeout)
        conn.request("GET", path)
        status = conn.getresponse().status
    except OSError as exc:
        console.print(f"probe {path}: {exc}")
        raise typer.Exit(1) from None
    if status != 200:
        console.print(f"probe {path}: HTTP {status}")
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
