"""``embserve`` command line: compress, inspect, serve, demo."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import numpy as np
import torch
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from compression import candidate_classes, compress, load_table, read_manifest, save_table
from compression.allocation import OBJECTIVES, BudgetTooSmall
from compression.layout import SUPPORTED_BITS, RowClass
from compression.lifecycle import IdLifecycle, LifecycleConfig
from compression.storage import TABLE_SUFFIX, TableFormatError
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies
from compression.table import CompressedTable

from .registry import valid_table_name
from .settings import Settings

app = typer.Typer(help="Compressed embedding tables: build them, look inside them, serve them.", no_args_is_help=True)
console = Console(stderr=True)


class BadInput(ValueError):
    """Something the user gave (a file, a flag's value) cannot be used; the message says what."""


def _fail(command: str, message: str) -> NoReturn:
    # plain echo, not the rich console: no markup eating brackets, no wrapping into several lines
    typer.echo(f"embserve {command}: {' '.join(message.split())}", err=True)
    raise typer.Exit(2)


@contextmanager
def bad_input_exits(command: str) -> Iterator[None]:
    """Every bad input of ``command`` ends as one line on stderr and exit 2, never a traceback:
    our own checks (:class:`BadInput`), what the library refuses (``ValueError``, which
    ``BudgetTooSmall`` is), unreadable table files and file-system errors."""
    try:
        yield
    except ValidationError as exc:  # settings from flags or EMBSERVE_* variables
        _fail(command, "; ".join(_setting_error(e) for e in exc.errors()))
    except (BudgetTooSmall, ValueError, TableFormatError) as exc:  # BudgetTooSmall is a ValueError; named for the reader
        _fail(command, str(exc))
    except OSError as exc:
        _fail(command, f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))


def _setting_error(error: Any) -> str:
    field = ".".join(str(part) for part in error.get("loc", ()))
    if not field:
        return str(error.get("msg", "invalid settings"))
    return f"{field} (--{field.replace('_', '-')} or EMBSERVE_{field.upper()}): {error.get('msg')}, got {error.get('input')!r}"


def _load_array(path: Path, tensor: str | None = None, what: str = "input") -> torch.Tensor:
    """A numeric array from ``.npy`` or ``.safetensors`` (the one tensor, or ``tensor``)."""
    if not path.is_file():
        raise BadInput(f"{what} {path}: no such file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as exc:  # object arrays, pickles, truncated or foreign files
            raise BadInput(f"{what} {path}: not a numeric .npy array ({exc})") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
            raise BadInput(f"{what} {path}: dtype {getattr(array, 'dtype', type(array).__name__)} is not numeric")
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch lacks most unsigned types
            if array.size and int(array.max()) > np.iinfo(np.int64).max:
                raise BadInput(f"{what} {path}: values above 2^63-1 do not fit int64")
            array = array.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(array))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:  # SafetensorError and friends: not a safetensors file
            raise BadInput(f"{what} {path}: not a readable .safetensors file ({exc})") from None
        if tensor is None:
            if len(tensors) != 1:
                raise BadInput(f"{what} {path} holds {sorted(tensors)}; pick one with --tensor")
            return next(iter(tensors.values()))
        if tensor not in tensors:
            raise BadInput(f"{what} {path} has no tensor {tensor!r}")
        return tensors[tensor]
    raise BadInput(f"{what} {path}: expected a .npy or .safetensors file")


def _parse_ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"{option} {text!r}: expected comma-separated integers") from None
    if not values:
        raise BadInput(f"{option}: give at least one value")
    return values


def _one_per_row(values: torch.Tensor, n: int, option: str, path: Path) -> torch.Tensor:
    if values.dim() != 1 or values.shape[0] != n:
        raise BadInput(f"{option} {path}: expected {n:,} values (one per row of the table), got shape {list(values.shape)}")
    return values


def _candidates(dim: int, dims_text: str | None, bits_text: str | None) -> list[RowClass]:
    bits = _parse_ints(bits_text, "--bits") or []
    unsupported = [b for b in bits if b not in SUPPORTED_BITS]
    if unsupported:
        raise BadInput(f"--bits {','.join(map(str, unsupported))}: supported widths are {', '.join(map(str, SUPPORTED_BITS))}")
    dims = _parse_ints(dims_text, "--dims")
    if dims is not None and any(not 0 <= d <= dim for d in dims):
        raise BadInput(f"--dims {dims_text}: each dim must be between 0 and the table's {dim}")
    return candidate_classes(dim, dims, tuple(bits))


def _phase_bar(label: str) -> Progress:
    """One bar for a multi-phase job: the description names the phase, the bar its progress."""
    return Progress(TextColumn(f"[bold]{label}[/bold] {{task.description}}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), console=console, transient=True,
                    disable=not console.is_terminal)  # off a terminal rich shows only the end state: nothing to gain


def _stage_reporter(progress: Progress, task: TaskID) -> Callable[[str, int, int], None]:
    def stage(what: str, done: int, total: int) -> None:
        progress.update(task, description=what, completed=done, total=max(total, 1))

    return stage


def _refuse_all_pruned(table: CompressedTable, budget: int, fixed: int, fix: str = "a smaller --ratio or a larger --budget-bytes") -> None:
    """A budget that leaves no byte for rows gives a table of zeros: refuse it rather than write it."""
    if table.classes and all(rc.dim == 0 for rc in table.classes):
        raise BadInput(
            f"a budget of {budget:,} bytes leaves nothing for the rows once the index and fallback take {fixed:,}:"
            f" every row would be pruned (served as zeros); give {fix}"
        )


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
    input: Annotated[Path, typer.Argument(help="dense fp32 table [N, D] (.npy or .safetensors)")],
    output: Annotated[Path, typer.Argument(help="compressed table file to write (.safetensors)")],
    frequencies: Annotated[Optional[Path], typer.Option(help="per-row lookup counts [N] (.npy); default uniform")] = None,
    ids: Annotated[Optional[Path], typer.Option(help="int64 ID of each row [N] (.npy); default dense IDs 0..N-1")] = None,
    tensor: Annotated[Optional[str], typer.Option(help="tensor name inside a .safetensors input")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="target compression ratio vs fp32 (budget = N*D*4/ratio)")] = None,
    budget_bytes: Annotated[Optional[int], typer.Option(help="byte budget for everything the table holds")] = None,
    bits: Annotated[str, typer.Option(help="candidate bit widths, comma-separated (32,16,8,4,2,1)")] = "32,16,8,4,2,1",
    dims: Annotated[Optional[str], typer.Option(help="candidate dims, comma-separated (default D,D/2,D/4,D/8,0)")] = None,
    unknown: Annotated[str, typer.Option(help="unknown-ID policy: zero, default or hashed")] = "zero",
    groups: Annotated[int, typer.Option(help="frequency groups for the allocation")] = 64,
    pq: Annotated[bool, typer.Option("--pq/--no-pq", help="also consider product-quantization (codebook) classes")] = False,
    keyed_index: Annotated[str, typer.Option(help="with --ids: hash (open addressing, updated in place) or sorted (fewer bytes, read-mostly)")] = "hash",
    max_ids: Annotated[Optional[int], typer.Option(help="with --ids: most IDs the served table keeps; past it the least updated are evicted")] = None,
    admit_min_count: Annotated[Optional[int], typer.Option(help="with --ids: upserts a new ID needs before it gets a row")] = None,
    index: Annotated[str, typer.Option(help="ID index: auto (cheapest that serves the IDs), dense, runs or keyed")] = "auto",
    objective: Annotated[str, typer.Option(help="what to minimize: l2 (rankers), cosine (per-row relative error) or knn (retrieval: recall on sampled traffic)")] = "l2",
) -> None:
    """Compress a dense table into mixed (dim, bits) row classes within a memory budget."""
    with bad_input_exits("compress"):
        _compress(input, output, frequencies, ids, tensor, ratio, budget_bytes, bits, dims, unknown, groups, pq, keyed_index, max_ids, admit_min_count, index, objective)


def _compress(
    input: Path, output: Path, frequencies: Path | None, ids: Path | None, tensor: str | None, ratio: float | None,
    budget_bytes: int | None, bits: str, dims: str | None, unknown: str, groups: int, pq: bool = False,
    keyed_index: str = "hash", max_ids: int | None = None, admit_min_count: int | None = None, index: str = "auto", objective: str = "l2",
) -> None:
    if (ratio is None) == (budget_bytes is None):
        raise BadInput("give exactly one of --ratio and --budget-bytes")
    if (ratio is not None and not ratio > 0) or (budget_bytes is not None and budget_bytes <= 0):
        raise BadInput("--ratio and --budget-bytes must be positive")
    if keyed_index not in ("hash", "sorted"):
        raise BadInput(f"--keyed-index {keyed_index!r}: must be hash or sorted")
    lifecycle = None
    if max_ids is not None or admit_min_count is not None:
        if ids is None or keyed_index != "hash":
            raise BadInput("--max-ids and --admit-min-count need --ids and the hash index")
        lifecycle = LifecycleConfig(max_ids=max_ids, admit_min_count=admit_min_count or 0)  # ValueError: one line, exit 2
    if unknown not in ("zero", "default", "hashed"):
        raise BadInput(f"--unknown {unknown!r}: must be zero, default or hashed")
    if index not in ("auto", "dense", "runs", "keyed"):
        raise BadInput(f"--index {index!r}: must be auto, dense, runs or keyed")
    if objective not in OBJECTIVES:
        raise BadInput(f"--objective {objective!r}: must be one of {', '.join(OBJECTIVES)}")
    if groups < 1:
        raise BadInput(f"--groups {groups}: must be at least 1")
    if output.suffix != TABLE_SUFFIX or output.is_dir():
        raise BadInput(f"output {output}: give a file name ending in {TABLE_SUFFIX} (the server loads only those)")
    rows = _load_array(input, tensor).to(torch.float32)
    if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise BadInput(f"input {input}: expected a non-empty 2-D table [N, D], got shape {list(rows.shape)}")
    n = rows.shape[0]
    freqs = _one_per_row(_load_array(frequencies, what="--frequencies").to(torch.float64), n, "--frequencies", frequencies) if frequencies else None
    id_tensor = None
    if ids:
        raw_ids = _load_array(ids, what="--ids")
        if raw_ids.is_floating_point():
            raise BadInput(f"--ids {ids}: expected integer IDs, got {raw_ids.dtype}")
        id_tensor = _one_per_row(raw_ids.to(torch.int64), n, "--ids", ids)
    cands = _candidates(rows.shape[1], dims, bits)
    started = time.perf_counter()
    with _phase_bar("compress") as progress:
        task = progress.add_task("starting", total=1)
        table, report = compress(
            rows, freqs, budget_bytes=budget_bytes, ratio=ratio, ids=id_tensor, candidates=cands,
            num_groups=groups, unknown=unknown, pq=pq, keyed_index=keyed_index,  # type: ignore[arg-type]
            index=index, objective=objective,  # type: ignore[arg-type]
            stage=_stage_reporter(progress, task),
        )
        _refuse_all_pruned(table, report.budget_bytes, report.fixed_bytes)
        if lifecycle is not None:
            table.lifecycle = IdLifecycle(lifecycle)
        progress.update(task, description=f"writing {output.name}", completed=0, total=1)
        save_table(table, output, extra={"source": input.name})
        elapsed = time.perf_counter() - started
        progress.update(task, description="measuring the error on sampled traffic", completed=0, total=1)
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


def _env_help(field: str, text: str) -> str:
    """A serve flag's help: what it sets, its environment variable and default (from Settings).
    Parentheses, not brackets: typer renders help as rich markup, where ``[...]`` is a style tag."""
    return f"{text} (env EMBSERVE_{field.upper()}, default {Settings.model_fields[field].default})"


@app.command("serve")
def serve_cmd(
    tables_dir: Annotated[Optional[Path], typer.Option(help=_env_help("tables_dir", "folder of table files"), show_default=False)] = None,
    host: Annotated[Optional[str], typer.Option(help=_env_help("host", "bind address"), show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option(help=_env_help("port", "port"), show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help=_env_help("device", "cpu, cuda, cuda:N"), show_default=False)] = None,
    torch_threads: Annotated[Optional[int], typer.Option(help=_env_help("torch_threads", "torch/decoder threads"), show_default=False)] = None,
) -> None:
    """Serve every table in the tables folder over HTTP.  Every other setting is an environment
    variable (README, Configuration); a flag wins over its variable."""
    overrides = {k: v for k, v in dict(tables_dir=tables_dir, host=host, port=port, device=device, torch_threads=torch_threads).items() if v is not None}
    with bad_input_exits("serve"):  # a bad flag or EMBSERVE_* value: one line, not a pydantic traceback
        settings = Settings(**overrides)
    _serve(settings)


def _serve(settings: Settings) -> None:
    from .app import create_app
    from .serving import run

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.token is None and settings.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("embserve").warning(
            "no write token (EMBSERVE_TOKEN / EMBSERVE_TOKEN_FILE): updates and admin calls are refused from anywhere but loopback"
        )
    run(create_app(settings), settings)


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
    path = tables_dir / f"{name}{TABLE_SUFFIX}"
    with bad_input_exits("demo"):
        if not valid_table_name(name):
            raise BadInput(f"--name {name!r}: table names match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}} (no '..')")
        if rebuild or not path.exists():
            _build_demo(path, name, rows, dim, ratio)
        else:
            console.print(f"the demo table exists: {path} (--rebuild to make it anew)")
    if serve:
        _serve(Settings(tables_dir=tables_dir, host=host, port=port))


def _build_demo(path: Path, name: str, rows: int, dim: int, ratio: float) -> None:
    if rows < 1 or dim < 1 or not ratio > 0:
        raise BadInput("--rows and --dim must be at least 1 and --ratio positive")
    started = time.perf_counter()
    console.print(f"building demo table {name}: {rows:,} x {dim}, Zipf frequencies, ratio {ratio}x ...")
    with _phase_bar("demo") as progress:
        task = progress.add_task("generating rows", total=1)
        freqs = zipf_frequencies(rows)
        dense = synthetic_table(rows, dim, freqs)
        progress.update(task, completed=1)
        table, report = compress(dense, freqs, ratio=ratio, stage=_stage_reporter(progress, task))
    _refuse_all_pruned(table, report.budget_bytes, report.fixed_bytes, "a smaller --ratio or a larger --dim")
    save_table(table, path, extra={"source": "embserve demo", "rows": rows, "dim": dim, "ratio": ratio})
    console.print(f"built in {time.perf_counter() - started:.1f} s")
    _summary(path)
@app.command("capacity")
def capacity_cmd(
    table: Annotated[str, typer.Argument(help="keyed table on the server")],
    url: Annotated[str, typer.Option(help="server base URL")] = "http://127.0.0.1:8080",
    max_ids: Annotated[Optional[int], typer.Option(help="most IDs with a row; the lowest counts are evicted past it")] = None,
    unlimited: Annotated[bool, typer.Option(help="drop the max_ids limit")] = False,
    admit_min_count: Annotated[Optional[int], typer.Option(help="upserts a new ID needs before it gets a row (0 = all)")] = None,
    half_life_rows: Annotated[Optional[int], typer.Option(help="the counts halve every this many upserted rows")] = None,
) -> None:
    """Set a served keyed table's max_ids and admission count (admin API; token from EMBSERVE_TOKEN)."""
    import json

    import httpx

    body = {k: v for k, v in dict(max_ids=max_ids, admit_min_count=admit_min_count, count_half_life_rows=half_life_rows).items() if v is not None}
    if unlimited:
        body["unlimited"] = True
    if not body:
        console.print("capacity: give --max-ids, --unlimited, --admit-min-count or --half-life-rows")
        raise typer.Exit(2)
    token = Settings().token
    headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else {}
    try:
        r = httpx.put(f"{url.rstrip('/')}/v1/admin/tables/{table}/capacity", json=body, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        console.print(f"capacity: {exc}")
        raise typer.Exit(1) from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        console.print(f"capacity: HTTP {r.status_code}: {message}")
        raise typer.Exit(2)
    print(json.dumps(r.json()))


@app.command("probe")
def probe_cmd(
    path: Annotated[str, typer.Argument(help="endpoint to probe")] = "/healthz",
    timeout: Annotated[float, typer.Option(help="seconds")] = 2.0,
) -> None:
    """Exit 0 when the local server answers PATH with 200 (container health checks; no curl needed)."""
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
