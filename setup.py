"""Build the optional compiled decode kernel (plain C + OpenMP, no torch headers, loaded with
ctypes; pyentry.c adds CPython entry points to the same library for per-call-cheap small lookups).  Without a C compiler the install still succeeds and lookups use the torch path."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "compression.kernels._decode",
            sources=["compression/kernels/decode.c", "compression/kernels/hashindex.c", "compression/kernels/encode.c",
                     "compression/kernels/sketch.c", "compression/kernels/pyentry.c"],
            depends=["compression/kernels/hashslot.h"],  # the hash slot layout both sources include
            extra_compile_args=["-O3", "-fopenmp", "-std=gnu11", "-ffp-contract=fast", "-fno-strict-aliasing"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
