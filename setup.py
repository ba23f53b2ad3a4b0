"""Build the optional compiled kernels (plain C + OpenMP, no torch headers).

``_decode``: the decoder, hash index, row encoder and count-min sketches, loaded with ctypes
(compression/kernels/cpu_c.py); it needs only a C compiler.  ``_entry``: CPython entry points
to the decoder (pyentry.c, compiled with its own copy of decode.c) for per-call-cheap small
lookups; it also needs Python's headers, so it is a separate extension: a machine without them
still gets the decoder.  Without a C compiler the install still succeeds and everything uses
the torch path."""

from setuptools import Extension, setup

# -fno-wrapv undoes the -fwrapv in Python's own CFLAGS (which setuptools puts first): with signed
# overflow defined, gcc keeps the decoder's int loop counters 32-bit and sign-extends them on every
# row address (movslq in the fp16 and code loops).  The 8x table, batch 4096, Zipf IDs, interleaved
# A/B of the same decode.c with and without -fwrapv: 0.88x (0.82..1.06) with it; uniform IDs are
# memory-bound and did not move.  Nothing here relies on wrapping (hashes are unsigned).
_FLAGS = {
    "extra_compile_args": ["-O3", "-fno-wrapv", "-fopenmp", "-std=gnu11", "-ffp-contract=fast", "-fno-strict-aliasing"],
    "extra_link_args": ["-fopenmp"],
    "depends": ["compression/kernels/hashslot.h"],  # the hash slot layout decode.c and hashindex.c include
    "optional": True,
}

setup(
    ext_modules=[
        Extension(
            "compression.kernels._decode",
            sources=["compression/kernels/decode.c", "compression/kernels/hashindex.c", "compression/kernels/encode.c",
                     "compression/kernels/sketch.c"],
            **_FLAGS,
        ),
        Extension("compression.kernels._entry", sources=["compression/kernels/pyentry.c", "compression/kernels/decode.c"], **_FLAGS),
    ]
)
