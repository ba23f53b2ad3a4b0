"""16-bit answers narrowed in C (compression/kernels/decode.c, embserve_narrow): fp16 and bf16
round to nearest even exactly as torch's conversions do, for every finite float32 - normal,
subnormal in fp16, past fp16's range, halfway cases - on the F16C/AVX2 path and on the baseline
build's software path; NaN stays NaN."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.kernels import COMPILED_AVAILABLE, cpu_c

pytestmark = pytest.mark.skipif(not COMPILED_AVAILABLE, reason="compiled decoder not built")

DTYPES = [torch.float16, torch.bfloat16]


def _edges() -> torch.Tensor:
    """Values where rounding is decided: fp16's range ends, its subnormals, ties at every
    exponent, signed zeros."""
    values = [0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e30, -1e30, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 3, 2.0**-26,
              1e-40, -1e-45, 3.4e38, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]
    ties = torch.arange(-24, 16, dtype=torch.float64).exp2()
    steps = ties[:, None] * (1 + torch.tensor([2.0**-11, 3 * 2.0**-11, 2.0**-8, 3 * 2.0**-8], dtype=torch.float64))[None, :]
    return torch.cat([torch.tensor(values, dtype=torch.float64), ties, steps.flatten(), -steps.flatten()]).to(torch.float32)


def _random_finite(count: int, seed: int) -> torch.Tensor:
    bits = torch.randint(-(2**31), 2**31, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    return values[torch.isfinite(values)].contiguous()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_narrowing_equals_torch_on_edges_and_random_bit_patterns(dtype: torch.dtype) -> None:
    for values in (_edges(), _random_finite(1 << 20, seed=1)):
        assert _same_bits(cpu_c.narrow(values, dtype), values.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40))
def test_narrowing_equals_torch_property(dtype: torch.dtype, values: list[float]) -> None:
    """Any length (the vector loops' tails) and any finite float32."""
    x = torch.tensor(values, dtype=torch.float32)
    assert _same_bits(cpu_c.narrow(x, dtype), x.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_stays_nan(dtype: torch.dtype) -> None:
    x = torch.tensor([float("nan"), -float("nan"), 1.0] * 7)
    out = cpu_c.narrow(x, dtype).to(torch.float32)
    assert bool(out[0::3].isnan().all()) and bool(out[1::3].isnan().all()) and bool((out[2::3] == 1.0).all())


@pytest.mark.skipif(shutil.which("cc") is None or platform.machine() not in ("x86_64", "AMD64"), reason="needs a C compiler on x86-64")
def test_baseline_build_narrows_like_torch_too(tmp_path: Path) -> None:
    """A CPU without AVX2/F16C runs the software conversions: build that one alone and hold it
    to torch on the same values."""
    src = Path(cpu_c.__file__).with_name("decode.c")
    lib_path = tmp_path / "narrow_baseline.so"
    subprocess.run(["cc", "-O3", "-std=gnu11", "-ffp-contract=fast", "-fno-strict-aliasing", "-fPIC", "-shared", "-DEMBSERVE_NO_CLONES",
                    f"-I{src.parent}", "-o", str(lib_path), str(src)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.embserve_narrow.restype = ctypes.c_int32
    lib.embserve_narrow.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32]
    values = torch.cat([_edges(), _random_finite(1 << 18, seed=2)])
    for dtype, code in ((torch.float16, 2), (torch.bfloat16, 3)):
        out = torch.empty(values.shape, dtype=dtype)
        assert lib.embserve_narrow(values.data_ptr(), values.numel(), out.data_ptr(), code) == 0
        assert _same_bits(out, values.to(dtype)), dtype
    assert lib.embserve_narrow(values.data_ptr(), 1, out.data_ptr(), 7) == -1
