"""Compile the Triton lookup kernels ahead of time for a GPU target, with no GPU present.

Why: the kernel tests run under ``TRITON_INTERPRET=1``, which executes the kernels' Python with
numpy and never builds GPU code, so a construct the GPU compiler rejects (a type mismatch in a
loop-carried value, an unsupported cast) would first show up on the lent GPU, whose minutes are
few.  Triton's wheel carries its whole toolchain (LLVM, ptxas, cuobjdump), so the kernels can be
compiled to sm_90 cubins here, and their register use and spills read back.

    TRITON_INTERPRET unset:  python bench/triton_aot.py [--arch 90] [--out bench/results/triton_aot_<ver>.md]

Covers every index kind, unknown-ID policy and output dtype at least once, the pooled kernel
in both modes, and a table holding every row class (fp32, fp16, int8/4/2/1, rotated truncations).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_aot_")  # honest compile times: no cache hits

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compression.kernels import triton_decode as td  # noqa: E402
from compression.layout import RowClass  # noqa: E402

POINTERS = {
    "qbase": "*u8", "qtab": "*i32",
    "ids_ptr": "*i64", "loc_ptr": "*i32", "starts_ptr": "*i64", "ends_ptr": "*i64",
    "ia": "*i64", "ib": "*i32", "ic": "*i64", "idd": "*i32", "rot": "*fp32",
}
INTS = {"n": "i64", "na": "i64", "nb": "i64", "u0": "i32", "u1": "i32"}
OUT_TYPES = {0: "*fp32", 1: "*fp16", 2: "*bf16"}
# every row class: fp32, fp16, int8, int4, and rotated int2 / int1 truncations
ALL = [RowClass(64, 32), RowClass(64, 16), RowClass(64, 8), RowClass(64, 4), RowClass(32, 2), RowClass(16, 1)]
SLAB_TYPES = {32: "*fp32", 16: "*fp16"}


def signature(fn: object, const: dict[str, int], out: int, classes: list[RowClass], unk: int) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:  # type: ignore[attr-defined]
        if name in const:
            sig[name] = "constexpr"
        elif name == "out_ptr":
            sig[name] = OUT_TYPES[out]
        elif name == "up":
            sig[name] = "*fp32" if unk in (0, 1) else "*fp16"
        elif re.fullmatch(r"s\d", name):
            k = int(name[1])
            sig[name] = SLAB_TYPES.get(classes[k].bits, "*u8") if k < len(classes) else "*u8"
        else:
            sig[name] = POINTERS.get(name) or INTS[name]
    return sig


def resources(cubin: bytes, cuobjdump: Path) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return "REG {} / STACK {} / LOCAL {}".format(*m.group(1, 2, 4)) if m else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tile", type=int, default=None, help="values per tile (default: the kernels' default)")
    parser.add_argument("--warps", type=int, default=None)
    parser.add_argument("--only", default=None, help="compile only variants whose label contains this")
    args = parser.parse_args()
    out_path = args.out or Path(__file__).parent / "results" / f"triton_aot_{triton.__version__}.md"
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rot = [td.class_spec(rc, rc.dim < 64) for rc in ALL] + [0, 0]
    variants: list[tuple[str, object, int, int, int, dict[str, int]]] = []
    kinds = ["resolved", "dense", "runs", "sorted", "hash"]
    for index in range(5):
        variants.append((f"lookup {kinds[index]}, unknown zero, fp32", td._lookup_kernel, index, 0, 0, {}))
    for unk, name in enumerate(td.UNK_CODES):
        if unk:
            variants.append((f"lookup sorted, unknown {name}, fp32", td._lookup_kernel, 3, unk, 0, {}))
    variants.append(("lookup hash, unknown binary_hash, fp16", td._lookup_kernel, 4, 4, 1, {}))
    variants.append(("lookup dense, unknown default, bf16", td._lookup_kernel, 1, 1, 2, {}))
    variants.append(("lookup dense, unknown zero, fp32, per-class quantized", td._lookup_kernel, 1, 0, 0, {"GENERIC": 0}))
    variants.append(("pooled dense, sum, fp32", td._pooled_kernel, 1, 0, 0, {"MEAN": 0}))
    variants.append(("pooled hash, mean, unknown qr, fp16", td._pooled_kernel, 4, 3, 1, {"MEAN": 1}))
    rows = []
    warps = args.warps or td.NUM_WARPS
    for label, fn, index, unk, out, extra in variants:
        if args.only and args.only not in label:
            continue
        bn, bd = td.block_sizes(64, tile=args.tile)
        const = dict(D=64, BLOCK_N=bn, BLOCK_D=bd, INDEX=index, UNK=unk, OUT=out, GENERIC=td.GENERIC_QUANTIZED)
        const.update(extra)
        const.update({f"C{i}": s for i, s in enumerate(rot)})
        started = time.perf_counter()
        kernel = triton.compile(ASTSource(fn, signature(fn, const, out, ALL, unk), const), target=GPUTarget("cuda", args.arch, 32), options={"num_warps": warps})
        seconds = time.perf_counter() - started
        usage = resources(kernel.asm["cubin"], cuobjdump)
        rows.append(f"| {label} | {seconds:.1f} | {len(kernel.asm['cubin']) // 1024} | {usage} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"# Triton kernels compiled ahead of time for sm_{args.arch} (no GPU)",
        "",
        f"`python bench/triton_aot.py` with Triton {triton.__version__}, Python {platform.python_version()}, on "
        f"{platform.machine()} ({os.cpu_count()} CPUs, shared).  Every variant below compiled to a cubin; "
        "registers, stack and local (spill) bytes per thread are read from the cubin with the wheel's cuobjdump. "
        "Table: 6 row classes (d64 fp32, d64 fp16, d64 int8, d64 int4, d32 int2 rotated, d16 int1 rotated), D = 64, "
        f"tile {td.block_sizes(64, tile=args.tile)[0]} x {td.block_sizes(64, tile=args.tile)[1]}, {warps} warps.",
        "",
        "| kernel variant | compile s | cubin KiB | resources per thread |",
        "|---|---|---|---|",
        *rows,
        "",
    ])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
