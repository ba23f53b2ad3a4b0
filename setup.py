"""Build the optional compiled kernels (plain C + OpenMP, no torch headers).

``_decode``: the decoder, hash index, row encoder and count-min sketches, loaded with ctypes
(compression/kernels/cpu_c.py); it needs only a C compiler.  ``_entry``: CPython entry points
to the decoder (pyentry.c, compiled with its own copy of decode.c) for per-call-cheap small
lookups; it also needs Python's headers, so it is a separate extension: a machine without them
still gets the decoder.  Without a C compiler the install still succeeds and everything uses
the torch path."""

from setuptools import Extension, setup

_FLAGS = {
    "extra_compile_args": ["-O3", "-fopenmp", "-std=gnu11", "-ffp-contract=fast", "-fno-strict-aliasing"],
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
