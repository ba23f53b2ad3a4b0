"""The sliced JSON encoder of large lookup answers is byte-for-byte the one-shot encoder."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.routers import lookup
from service.wire import LookupOutput

output = st.integers(0, 40).flatmap(
    lambda rows: st.builds(
        LookupOutput,
        st.text(min_size=1, max_size=8),
        arrays(np.float32, st.tuples(st.just(rows), st.integers(0, 9)), elements=st.floats(width=32, allow_nan=False)),
        arrays(np.bool_, st.just(rows)),
        st.integers(0, rows),
    )
)


@given(st.lists(output, min_size=1, max_size=4), st.integers(1, 64))
@settings(max_examples=200, deadline=None)
def test_sliced_json_is_the_one_shot_json(outputs: list[LookupOutput], slice_bytes: int) -> None:
    original = lookup.SLICE_BYTES
    lookup.SLICE_BYTES = slice_bytes  # tiny slices: many row slices per result
    try:
        assert b"".join(lookup.encode_json_parts(outputs)) == lookup.encode_json(outputs)
    finally:
        lookup.SLICE_BYTES = original
