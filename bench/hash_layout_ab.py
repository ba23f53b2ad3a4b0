"""Interleaved A/B of two builds of the hash index's C code (slot layout, probe, prefetch).

    python bench/hash_layout_ab.py --base main            # base = git revision main, new = this tree
    python bench/hash_layout_ab.py --base main --new REV --base-loads 0.7 0.75 --loads 0.75
    python bench/hash_layout_ab.py --base main --rows 200000 --rounds 5

bench/results/hash_layout_ab.md records the runs behind kernels/hashslot.h's "tried and not
kept" notes, bench/results/keyed_probe_ab.md those on probe order and probe code (issue 11).

More builds of this tree in the same run: ``--variants LABEL:FLAGS:ORDER`` (gcc flags such as
``-DAHEAD=24``; ORDER ``slot`` fills the slots in the table's row order, ``freq`` hottest row
first, as ``HashIndex.build(frequencies=...)`` does).  Each packed build prints where its keys
sit (share at home and within the 3 prefetched slots, by key and by Zipf traffic).
``--no-check`` times builds that answer wrongly (cost attribution only).

Both builds' ``decode.c`` + ``hashindex.c`` (+ ``hashslot.h``) are compiled into their own
shared library (the base taken from ``git show REV:...``), each library fills its own slot array
with its own ``embserve_hslot_upsert`` at a given load, and one process times the C lookup
(``embserve_lookup``, one thread) of dense IDs and of keyed IDs through each build, round-robin
on the same batches of the same 8x table's rows.  Two builds in one run are the only fair way
to compare layouts on a shared machine: separate runs of ``bench/lookup.py`` differ by more
than the layouts do.

A library is taken for the bucketed layout (``kernels/hashslot.h``: 5 slots per 64-byte line)
when it exports ``embserve_hslot_buckets``, else for the packed layout (12-byte slots at
``12 * s``, any capacity).  The numbers are the raw C call (no table wrapper), so keyed / dense
here is lower than through ``CompressedTable.lookup``, whose per-batch overhead both share.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from interleave import Spread, ratio, run_rounds  # noqa: E402
from lookup import machine  # noqa: E402

from compression import candidate_classes, compress, memory  # noqa: E402
from compression.kernels import cpu_c  # noqa: E402
from compression.synthetic import sample_ids, synthetic_table, zipf_frequencies  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["compression/kernels/decode.c", "compression/kernels/hashindex.c", "compression/kernels/hashslot.h"]
CFLAGS = ["-O3", "-fopenmp", "-std=gnu11", "-ffp-contract=fast", "-fno-strict-aliasing", "-shared", "-fPIC"]
EMPTY = -(2**63)


class IndexView(ctypes.Structure):
    """decode.c's ``index_t`` with the bucketed build's trailing ``hints`` pointer (a build
    without it never reads past ``slots``)."""

    _fields_ = [*cpu_c._IndexC._fields_[: [f[0] for f in cpu_c._IndexC._fields_].index("slots") + 1], ("hints", ctypes.c_void_p)]


def build(name: str, rev: str | None, workdir: Path, extra: list[str]) -> ctypes.CDLL:
    """Compile revision ``rev`` (None: the working tree) into ``workdir/name.so`` and load it."""
    src = workdir / name
    (src / "compression/kernels").mkdir(parents=True)
    for path in SOURCES:
        text = (ROOT / path).read_text() if rev is None else (Path(rev) / path).read_text() if Path(rev).is_dir() else subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
        (src / path).write_text(text)
    out = workdir / f"{name}.so"
    subprocess.run(["gcc", *CFLAGS, *extra, "-o", str(out), str(src / SOURCES[0]), str(src / SOURCES[1])], check=True)
    lib = ctypes.CDLL(str(out))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.embserve_lookup.restype = i64
    lib.embserve_lookup.argtypes = [p, i64, p, p, ctypes.c_int32, p, i64, p, ctypes.c_int32]
    lib.embserve_hslot_upsert.restype = i64
    # the bucketed layout's writes also keep the overflow hints (a bitmap, or NULL)
    lib.embserve_hslot_upsert.argtypes = [p, i64, p, p, p, i64] if hasattr(lib, "embserve_hslot_buckets") else [p, i64, p, p, i64]
    lib.embserve_init()
    return lib


def huge_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` uint8 where the table's own slot arrays go (compression.memory: 2 MiB-aligned,
    advised MADV_HUGEPAGE from 2 MiB up)."""
    return memory.empty((nbytes,), torch.uint8)


def huge_kib(t: torch.Tensor) -> int:
    """KiB of ``t``'s mapping backed by transparent huge pages (/proc/self/smaps; 0 if unknown)."""
    addr, current = t.data_ptr(), False
    try:
        for line in Path("/proc/self/smaps").read_text().splitlines():
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = lo <= addr < hi
            elif current and head == "AnonHugePages:":
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def filled_slots(lib: ctypes.CDLL, keys: torch.Tensor, locs: torch.Tensor, load: float) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The library's own slot array holding ``keys`` at about ``load``: (bytes, capacity in
    slots, overflow hints or None)."""
    n = keys.numel()
    if hasattr(lib, "embserve_hslot_buckets"):
        per = lib.embserve_hslot_buckets()
        cap = per * math.ceil(n / load / per)
        raw = huge_buffer(64 * (cap // per))
        words = raw.view(torch.int32).view(-1, 16)
        words.zero_()
        for j in range(per):
            words[:, 3 * j + 1] = -(2**31)
            words[:, 3 * j + 2] = -1
        hints = torch.zeros(-(-(cap // per) // 8), dtype=torch.uint8)
        lib.embserve_hslot_upsert(raw.data_ptr(), cap, hints.data_ptr(), keys.data_ptr(), locs.data_ptr(), n)
        return raw, cap, hints
    cap = -(-math.ceil(n / load) // 16) * 16
    raw = huge_buffer(12 * cap)
    words = raw.view(torch.int32).view(-1, 3)
    words[:, 0] = 0
    words[:, 1] = -(2**31)
    words[:, 2] = -1
    lib.embserve_hslot_upsert(raw.data_ptr(), cap, keys.data_ptr(), locs.data_ptr(), n)
    return raw, cap, None


def placement(raw: torch.Tensor, cap: int, freqs: torch.Tensor, keys: torch.Tensor) -> str:
    """How far the packed slots' keys sit from their home slot: the share at home and within the
    3-slot window the pipeline prefetches, by key and by Zipf traffic."""
    from compression.hash_index import home_slots, slot_keys

    slots = raw[: 12 * cap].view(torch.int32).view(cap, 3)
    held = torch.nonzero(slot_keys(slots) != EMPTY).flatten()
    k = slot_keys(slots, held)
    disp = (held - home_slots(k, cap)) % cap
    row = torch.searchsorted(torch.sort(keys).values, k)
    w = freqs[torch.sort(keys).indices[row]].double()
    w = w / w.sum()
    return (f"at home {float((disp == 0).double().mean()):.3f} of keys, {float(w[disp == 0].sum()):.3f} of zipf traffic; "
            f"within 3 slots {float((disp <= 2).double().mean()):.3f} / {float(w[disp <= 2].sum()):.3f}; mean displacement {float(disp.double().mean()):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision (or a directory holding the sources) of the base build; empty: this tree")
    parser.add_argument("--base-loads", type=float, nargs="+", default=[0.7])
    parser.add_argument("--loads", type=float, nargs="+", default=[0.75, 0.8], help="loads of the new build's index")
    parser.add_argument("--new", default="", help="git revision (or a directory holding the sources) of the new build; empty: this tree")
    parser.add_argument("--base-cflags", nargs="*", default=[], help="extra gcc flags for the base build")
    parser.add_argument("--new-cflags", nargs="*", default=[], help="extra gcc flags for the new build (e.g. -DFOO=1)")
    parser.add_argument("--variants", nargs="*", default=[], metavar="LABEL:FLAGS:ORDER",
                        help="more builds of this tree, each at the first --loads value: LABEL, gcc flags (space-separated, may be empty), "
                             "and the order its slots are filled in (slot: the table's row order; freq: hottest row first)")
    parser.add_argument("--order", choices=["slot", "freq"], default="slot", help="the order base and new builds fill their slots in")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=256, help="batches per pass: short passes (64) gave A/A ratios 0.91..1.06")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--passes", type=int, default=3, help="passes per measurement; the best counts")
    parser.add_argument("--no-check", action="store_true", help="time builds that answer wrongly (ATTR_ attribution variants)")
    parser.add_argument("--out", type=Path, default=None, help="also append the report to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = [f"## `{' '.join(sys.argv[1:])}`", "", f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC.", "", "```"]

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build("base", args.base or None, Path(tmp), args.base_cflags), "new": build("new", args.new or None, Path(tmp), args.new_cflags)}
        variants = []  # (label, order)
        for spec in args.variants:
            label, flags, order = spec.split(":")
            if order not in ("slot", "freq"):
                raise SystemExit(f"variant {spec!r}: order must be slot or freq")
            libs[label] = build(label, None, Path(tmp), flags.split())
            variants.append((label, order))
        freqs = zipf_frequencies(args.rows)
        rows = synthetic_table(args.rows, args.dim, freqs)
        table, _ = compress(rows, freqs, ratio=8, candidates=candidate_classes(args.dim, dims=[args.dim, 0]))
        del rows
        classes = cpu_c.class_array(table.slabs, table.classes)
        n = args.rows
        keys = torch.randperm(n, generator=torch.Generator().manual_seed(9)) * 1_000_003 - 7 * n
        positions, locs = table.index.live_items()
        kk, kl = keys[positions].contiguous(), locs.to(torch.int32).contiguous()
        hot = torch.argsort(freqs[positions], descending=True, stable=True)  # the fill order "freq": hottest row first
        fills = {"slot": (kk, kl), "freq": (kk[hot].contiguous(), kl[hot].contiguous())}
        # method -> (library, index view, the arrays it keeps alive, keyed?, index bytes)
        dense_view = cpu_c.dense_index(table.index.locator)
        methods: dict[str, tuple[ctypes.CDLL, object, object, bool, int]] = {"dense": (libs["new"], dense_view, None, False, table.index.locator.numel() * 4)}
        builds = [("base", x, args.order) for x in args.base_loads] + [("new", x, args.order) for x in args.loads]
        builds += [(label, args.loads[0], order) for label, order in variants]
        for name, load, order in builds:
            raw, cap, hints = filled_slots(libs[name], *fills[order], load)
            label = f"{name} load {n / cap:.3f}" + (" freq" if order == "freq" else "")
            say(f"{label}: {huge_kib(raw) / 1024:.0f} of {raw.numel() / 2**20:.0f} MiB in huge pages")
            if hints is None:  # (computed with the format's home formula: meaningless for a build that changes the hash)
                say(f"{label}: {placement(raw, cap, freqs, keys)}")
            if hints is not None:  # the same slots probed without hints, and with them
                methods[f"{label} no hints"] = (libs[name], IndexView(kind=cpu_c.INDEX_HASH, n=cap, slots=raw.data_ptr()), raw, True, raw.numel())
                ones = int(sum(bin(b).count("1") for b in hints.tolist()))
                say(f"{label}: {ones / (cap // 5):.3f} of buckets hinted")
                label += " hints"
            view = IndexView(kind=cpu_c.INDEX_HASH, n=cap, slots=raw.data_ptr(), hints=None if hints is None else hints.data_ptr())
            methods[label] = (libs[name], view, (raw, hints), True, raw.numel())
        streams = {
            "uniform": [torch.randint(0, n, (args.batch,), generator=torch.Generator().manual_seed(k)) for k in range(args.batches)],
            "zipf": [sample_ids(freqs, args.batch, seed=1000 + k) for k in range(args.batches)],
        }
        out = torch.empty(args.batch, args.dim)
        loc = torch.empty(args.batch, dtype=torch.int32)

        def call(m: str, ids: torch.Tensor) -> None:
            lib, view, _, _, _ = methods[m]
            lib.embserve_lookup(ids.data_ptr(), ids.numel(), ctypes.byref(view), ctypes.byref(classes), 8, out.data_ptr(), args.dim, loc.data_ptr(), 1)

        def measure(m: str, batches: list[torch.Tensor]) -> float:
            best = 0.0
            for _ in range(args.passes):
                t = time.thread_time()
                for ids in batches:
                    call(m, ids)
                best = max(best, len(batches) * args.batch / (time.thread_time() - t))
            return best

        for d, batches in streams.items():
            feeds = {m: [keys[b] if methods[m][3] else b for b in batches] for m in methods}
            want = None
            for m in methods:  # every build answers alike
                call(m, feeds[m][0])
                want = out.clone() if want is None else want
                assert args.no_check or torch.equal(out, want), m
            per_round = run_rounds({m: (lambda m=m: measure(m, feeds[m])) for m in methods}, args.rounds)
            base_name = next(m for m in methods if m.startswith("base"))
            say(f"{d}, batch {args.batch}, {args.rounds} rounds (median, min..max of same-round ratios)")
            for m in methods:
                vs_dense = ratio(per_round[m], per_round["dense"])
                vs_base = ratio(per_round[m], per_round[base_name])
                say(f"  {m:24s} {methods[m][4] / 2**20:6.2f} MiB  {Spread.of(per_round[m]).median / 1e6:6.1f} M/s  "
                      f"/dense {vs_dense.fmt()}  /base {vs_base.fmt()}")

    if args.out is not None:
        with args.out.open("a") as f:
            f.write("\n".join([*report, "```", "", ""]))


if __name__ == "__main__":
    main()
