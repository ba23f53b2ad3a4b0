"""Row codecs: packing is lossless, quantization error is bounded, layouts are as documented."""

from __future__ import annotations

import platform
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compression.codecs import decode_rows, encode_rows, pack_codes, quantize_rows, unpack_codes
from compression.layout import RowClass, packed_code_bytes


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 8), dim=st.integers(1, 70), data=st.data())
def test_pack_unpack_round_trip(bits: int, n: int, dim: int, data: st.DataObject) -> None:
    codes = data.draw(arrays(np.uint8, (n, dim), elements=st.integers(0, (1 << bits) - 1)))
    packed = pack_codes(torch.from_numpy(codes), bits)
    assert packed.shape == (n, packed_code_bytes(dim, bits))
    assert torch.equal(unpack_codes(packed, bits, dim), torch.from_numpy(codes))


def test_planar_code_order_is_as_documented() -> None:
    # 4 bits, dim 4: stride 2; byte 0 = code0 | code2 << 4, byte 1 = code1 | code3 << 4
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[1 | 3 << 4, 2 | 4 << 4]]
    # 2 bits, dim 8: stride 2; byte k holds codes k, k+2, k+4, k+6 at shifts 0, 2, 4, 6
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[0 | 2 << 2 | 3 << 4 | 1 << 6, 1 | 3 << 2 | 2 << 4 | 0 << 6]]


def test_row_head_is_fp16_scale_then_bias() -> None:
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    row = encode_rows(x, RowClass(4, 2), refit=False)[0].numpy().tobytes()
    scale, bias = struct.unpack("<ee", row[:4])
    assert (scale, bias) == (1.0, 0.0)
    # 2 bits, dim 4: a single code byte (stride 1) holding codes 0..3 at shifts 0, 2, 4, 6
    assert row[4:] == bytes([0 | 1 << 2 | 2 << 4 | 3 << 6])


finite = st.floats(-4.0, 4.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_minmax_error_bound(bits: int, data: st.DataObject) -> None:
    x = torch.from_numpy(data.draw(arrays(np.float32, (4, 24), elements=finite)))
    rc = RowClass(24, bits)
    decoded = decode_rows(encode_rows(x, rc, refit=False), rc)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    step = (hi - lo) / ((1 << bits) - 1)
    # half a step, plus fp16 rounding of scale and bias; a scale below fp16's normal range
    # (2**-14: rows spanning less than about 0.016 at 8 bits) rounds to a multiple of 2**-24, so
    # its error is up to 2**-25 absolute, times the largest code (a row of 0 and 0.00025 at 8
    # bits: 6.8e-6, more than the relative term allows)
    bound = step / 2 + (hi - lo) * 2**-9 + ((1 << bits) - 1) * 2**-25 + lo.abs() * 2**-10 + 1e-6
    assert bool(((decoded - x).abs() <= bound).all())


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_refit_never_worse_than_minmax(bits: int, data: st.DataObject) -> None:
    x = torch.from_numpy(data.draw(arrays(np.float32, (6, 16), elements=finite)))
    rc = RowClass(16, bits)
    plain = ((decode_rows(encode_rows(x, rc, refit=False), rc) - x) ** 2).sum(1)
    refit = ((decode_rows(encode_rows(x, rc, refit=True), rc) - x) ** 2).sum(1)
    assert bool((refit <= plain + 1e-6).all())


def test_one_bit_rows_decode_to_two_levels_at_cluster_means() -> None:
    x = torch.tensor([[-1.0, -1.2, 0.8, 1.0, 1.2, -0.8]])
    rc = RowClass(6, 1)
    decoded = decode_rows(encode_rows(x, rc), rc)
    assert decoded.unique().numel() == 2
    assert torch.allclose(decoded, torch.tensor([[-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]]), atol=2e-3)


def test_float_classes_are_exact_or_fp16_rounded() -> None:
    x = torch.randn(5, 8)
    assert torch.equal(decode_rows(encode_rows(x, RowClass(8, 32)), RowClass(8, 32)), x)
    assert torch.equal(decode_rows(encode_rows(x, RowClass(8, 16)), RowClass(8, 16)), x.half().float())


def test_dim_zero_and_truncated_classes() -> None:
    x = torch.randn(3, 8)
    assert encode_rows(x, RowClass(0, 32)).shape == (3, 0)
    assert decode_rows(encode_rows(x, RowClass(0, 32)), RowClass(0, 32)).shape == (3, 0)
    half = decode_rows(encode_rows(x, RowClass(4, 32)), RowClass(4, 32))
    assert torch.equal(half, x[:, :4])


def test_constant_rows_quantize_exactly() -> None:
    x = torch.full((2, 8), 0.25)
    for bits in (1, 2, 4, 8):
        rc = RowClass(8, bits)
        assert torch.equal(decode_rows(encode_rows(x, rc), rc), x)


@pytest.mark.parametrize("label", ["d64b4", "d0b32", "d7b1"])
def test_row_class_labels_round_trip(label: str) -> None:
    assert RowClass.parse(label).label() == label


def test_row_bytes() -> None:
    assert RowClass(64, 4).row_bytes == 36  # FBGEMM pads this to 48 on GPU
    assert RowClass(64, 8).row_bytes == 68
    assert RowClass(64, 1).row_bytes == 12
    assert RowClass(5, 2).row_bytes == 6
    assert RowClass(0, 8).row_bytes == 0
    with pytest.raises(ValueError):
        RowClass(8, 3)


gaussianish = st.floats(-3.0, 3.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), dim=st.integers(2, 40), outlier=st.floats(0.0, 50.0), data=st.data())
def test_clipping_never_worse_than_minmax_refit_on_any_row(bits: int, dim: int, outlier: float, data: st.DataObject) -> None:
    """The clipping search keeps, per row, the better of (min/max + refit) and (best clip + refit)."""
    x = torch.from_numpy(data.draw(arrays(np.float32, (5, dim), elements=gaussianish)))
    x[0, 0] += outlier  # one heavy-tailed row: where clipping pays most
    rc = RowClass(dim, bits)
    before = ((decode_rows(encode_rows(x, rc, clip=False), rc) - x) ** 2).sum(1)
    after = ((decode_rows(encode_rows(x, rc, clip=True), rc) - x) ** 2).sum(1)
    assert bool((after <= before * (1 + 1e-6) + 1e-9).all()), (before, after)


@pytest.mark.parametrize("bits", [4, 2])
def test_clipping_lowers_error_on_gaussian_rows(bits: int) -> None:
    """On Gaussian rows (what trained embeddings look like) the clipped range wins clearly."""
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(1))
    rc = RowClass(64, bits)
    before = float(((decode_rows(encode_rows(x, rc, clip=False), rc) - x) ** 2).sum())
    after = float(((decode_rows(encode_rows(x, rc, clip=True), rc) - x) ** 2).sum())
    assert after < 0.985 * before


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_blocked_encoding_equals_row_by_row(bits: int) -> None:
    """quantize_rows works in cache-sized blocks; a row's bytes must not depend on its batch."""
    from compression.codecs import _BLOCK_ROWS

    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(_BLOCK_ROWS * 2 + 37, 24, generator=gen) * torch.rand(_BLOCK_ROWS * 2 + 37, 1, generator=gen) * 3
    x[5, 3] = 40.0  # an outlier row, clipped
    x[_BLOCK_ROWS + 1] = 0.5  # a constant row (zero scale)
    rc = RowClass(24, bits)
    whole = encode_rows(x, rc)
    pieces = torch.cat([encode_rows(x[i : i + 1], rc) for i in range(0, x.shape[0], 97)])
    assert torch.equal(whole[::97], pieces)
    odd = torch.cat([encode_rows(x[s : s + 300], rc) for s in range(0, x.shape[0], 300)])
    assert torch.equal(whole, odd)


# ---------------------------------------------------------------- compiled encoder == torch encoder

from compression.kernels import cpu_c  # noqa: E402


def _encode_both(x: torch.Tensor, rc: RowClass, **kw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows through the compiled encoder and through the torch one."""
    saved = cpu_c.ENCODER_AVAILABLE
    try:
        cpu_c.ENCODER_AVAILABLE = saved
        compiled = encode_rows(x, rc, **kw)
        cpu_c.ENCODER_AVAILABLE = False
        reference = encode_rows(x, rc, **kw)
    finally:
        cpu_c.ENCODER_AVAILABLE = saved
    return compiled, reference


needs_encoder = pytest.mark.skipif(not cpu_c.ENCODER_AVAILABLE, reason="compiled encoder not built (python setup.py build_ext --inplace)")

# values across the float32 range: zeros of both signs, subnormals, the fp16 edge (65504) and
# past it, and everything in between
wide = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-38, 6e-8, 65504.0, -65504.0, 65520.0, 1e5, -3e38]),
    st.floats(-4.0, 4.0, width=32),
    st.floats(-2.0**-10, 2.0**-10, width=32),
    st.floats(-7e4, 7e4, width=32),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
)


@needs_encoder
@settings(max_examples=300, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), n=st.integers(1, 6), dim=st.integers(1, 70), refit=st.booleans(), clip=st.booleans(),
       special=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]), data=st.data())
def test_compiled_encoder_is_bit_exact_with_torch(
    bits: int, n: int, dim: int, refit: bool, clip: bool, special: float | None, data: st.DataObject
) -> None:
    """Any rows, any class: the same bytes from both encoders (a replica with the C library and
    one without hold the same table).  Rows with NaN/Inf or past fp16 are left to torch by the
    compiled path, so those match by construction - and are checked here too."""
    x = torch.from_numpy(data.draw(arrays(np.float32, (n, dim), elements=wide)))
    if special is not None:
        x[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, dim - 1))] = special
    compiled, reference = _encode_both(x, RowClass(dim, bits), refit=refit, clip=clip)
    assert torch.equal(compiled, reference)


@needs_encoder
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("dim", [64, 24, 7])
def test_compiled_encoder_is_bit_exact_on_many_rows(bits: int, dim: int) -> None:
    """Many rows of several shapes: rare ties (a refit or clip candidate within a rounding of the
    incumbent, a sum on an fp16 rounding boundary) would show up here."""
    gen = torch.Generator().manual_seed(bits * 100 + dim)
    n = 6000
    x = torch.randn(n, dim, generator=gen) * torch.rand(n, 1, generator=gen).pow(4) * 10
    x[:500] = torch.randint(-4, 5, (500, dim), generator=gen).float()  # small integers: many ties
    x[500:1000] = x[500:1000] * 1e-39  # subnormal float32 rows (scale and bias underflow in fp16)
    x[1000:1500, ::2] = 0.0
    x[1000:1500, 1::2] *= -0.0
    x[1500:1600] = x[1500:1600] * 1e4 + 3e4  # near the fp16 limit
    for kw in ({}, {"clip": False}, {"refit": False}):
        compiled, reference = _encode_both(x, RowClass(dim, bits), **kw)
        assert torch.equal(compiled, reference), (kw, int((compiled != reference).any(1).sum()))


@needs_encoder
def test_compiled_encoder_leaves_non_finite_rows_to_torch() -> None:
    """A NaN, an Inf or a range past fp16 is not encoded by the C path (it returns None and the
    caller takes torch's path for the whole batch); finite rows in range are."""
    rc = RowClass(8, 8)
    ok = torch.randn(3, 8)
    assert cpu_c.encode_rows(ok, 8, True, (0.95,), rc.row_bytes) is not None
    for bad in (float("nan"), float("inf"), -1e6):  # -1e6: the bias overflows fp16
        x = ok.clone()
        x[1, 2] = bad
        assert cpu_c.encode_rows(x, 8, True, (0.95,), rc.row_bytes) is None


@pytest.mark.skipif(shutil.which("cc") is None or platform.machine() not in ("x86_64", "AMD64"), reason="needs a C compiler on x86-64")
def test_baseline_build_of_the_encoder_is_bit_exact_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The library picks its x86-64-v3 (AVX2) encoder on this machine; a CPU without AVX2 runs
    the baseline (SSE2) build of the same source.  Build that one alone (-DEMBSERVE_NO_CLONES)
    and hold it to the torch encoder as well."""
    import ctypes
    import subprocess

    from compression.codecs import _CLIP_GRID

    src = Path(cpu_c.__file__).with_name("encode.c")
    lib_path = tmp_path / "encode_baseline.so"
    subprocess.run(["cc", "-O3", "-std=gnu11", "-ffp-contract=fast", "-fno-strict-aliasing", "-fPIC", "-shared",
                    "-DEMBSERVE_NO_CLONES", "-o", str(lib_path), str(src)], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.embserve_encode_rows.restype = i64
    lib.embserve_encode_rows.argtypes = [p, i64, i32, i32, i32, p, i32, p, i64, i32]
    gen = torch.Generator().manual_seed(7)
    saved = cpu_c.ENCODER_AVAILABLE
    try:
        cpu_c.ENCODER_AVAILABLE = False  # encode_rows below: the torch path
        for dim in (3, 24, 64):
            x = torch.randn(1500, dim, generator=gen) * torch.rand(1500, 1, generator=gen).pow(4) * 10
            x[:300] = torch.randint(-3, 4, (300, dim), generator=gen).float()
            for bits in (1, 2, 4, 8):
                rc = RowClass(dim, bits)
                grid = _CLIP_GRID.get(bits, ())
                out = torch.empty((x.shape[0], rc.row_bytes), dtype=torch.uint8)
                rc_code = lib.embserve_encode_rows(x.data_ptr(), x.shape[0], dim, bits, 1, (ctypes.c_float * max(1, len(grid)))(*grid),
                                                   len(grid), out.data_ptr(), rc.row_bytes, 1)
                assert rc_code == 0 and torch.equal(out, encode_rows(x, rc)), (dim, bits)
    finally:
        cpu_c.ENCODER_AVAILABLE = saved
