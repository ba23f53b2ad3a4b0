/* CPython entry points of the compiled decoder: the module ``compression.kernels._entry``,
 * built from this file and its own copy of decode.c (setup.py: a separate extension, because it
 * needs Python's headers and the ctypes library must build without them).
 *
 * Why a second door into the same code: a ctypes call converts each argument through its
 * argtypes and releases and retakes the GIL, about 1.3 us per call on the CI machine - as much as
 * the whole decode of one row.  At ranking batch sizes that is noise; at batch 1 it is most of
 * ``CompressedTable.lookup`` and of the service's answer.  These functions take plain ints
 * (addresses) and buffer objects through METH_FASTCALL (about 0.1 us), keep the GIL for small
 * batches (handing it over costs more than the decode) and release it for large ones, exactly
 * like the ctypes path does.
 *
 * Its copy of the decoder has its own static state (the fp16 table, the CPU feature flags),
 * set by embserve_init when the module loads; it reads the same table memory as the ctypes
 * library, through the same index_t and row_class_t structs (cpu_c.py builds them). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* from decode.c; index_t and row_class_t are opaque here: only their addresses pass through */
void embserve_init(void);
int64_t embserve_lookup(const int64_t *ids, int64_t n, const void *index, const void *classes, int32_t n_classes,
                        float *out, int64_t width, int32_t *loc_out, int32_t threads);
int64_t embserve_pruned_mask(const int32_t *loc, int64_t n, const void *classes, uint8_t *pruned);
int32_t embserve_narrow(const float *src, int64_t count, uint16_t *dst, int32_t kind);

/* 16-bit answers decode this many float32 values at a time into a scratch, then narrow them into
   the answer: the scratch stays in cache, and no float32 copy of the whole answer is made */
#define NARROW_CHUNK_VALUES 16384

#define N_CLASSES 8 /* MAX_CLASSES of decode.c */
/* below this many IDs the GIL is kept: releasing and retaking it costs more than the decode */
#define GIL_RELEASE_MIN 256

static int as_int64(PyObject *o, int64_t *v) {
    long long x = PyLong_AsLongLong(o);
    if (x == -1 && PyErr_Occurred()) return -1;
    *v = (int64_t)x;
    return 0;
}

/* The `count` integer arguments of an entry taking addresses and sizes, into v; -1 with a
 * TypeError naming `name` for a wrong count, or the integer conversion's error. */
static int int_args(PyObject *const *args, Py_ssize_t nargs, int count, int64_t *v, const char *name) {
    if (nargs != count) {
        PyErr_Format(PyExc_TypeError, "%s takes %d integer arguments", name, count);
        return -1;
    }
    for (int k = 0; k < count; k++)
        if (as_int64(args[k], &v[k]) < 0) return -1;
    return 0;
}

/* embserve_lookup of lookup and lookup_loc, from their leading integer arguments v = (ids_addr,
 * n, index_addr, classes_addr, out_addr, width, ...) and the locator array: with the GIL released
 * and `threads` threads from GIL_RELEASE_MIN IDs on, else holding it, on the calling thread. */
static int64_t lookup_addressed(const int64_t *v, int32_t *loc, int32_t threads) {
    const int64_t n = v[1];
    if (n < GIL_RELEASE_MIN)
        return embserve_lookup((const int64_t *)(intptr_t)v[0], n, (const void *)(intptr_t)v[2], (const void *)(intptr_t)v[3], N_CLASSES,
                               (float *)(intptr_t)v[4], v[5], loc, 1);
    int64_t rc;
    Py_BEGIN_ALLOW_THREADS
    rc = embserve_lookup((const int64_t *)(intptr_t)v[0], n, (const void *)(intptr_t)v[2], (const void *)(intptr_t)v[3], N_CLASSES,
                         (float *)(intptr_t)v[4], v[5], loc, threads);
    Py_END_ALLOW_THREADS
    return rc;
}

/* lookup(ids_addr, n, index_addr, classes_addr, out_addr, width, loc_addr, threads) -> unknown
 *
 * The ctypes ``embserve_lookup`` call of cpu_c.lookup with the same arguments (addresses of
 * int64 ids [n], the index_t, the MAX_CLASSES row_class_t array, float32 out [n, width], int32
 * loc [n]).  The caller keeps every pointed-to object alive for the call. */
static PyObject *py_lookup(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[8];
    if (int_args(args, nargs, 8, v, "lookup") < 0) return NULL;
    const int64_t rc = lookup_addressed(v, (int32_t *)(intptr_t)v[6], (int32_t)v[7]);
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "compiled decoder rejected its arguments");
        return NULL;
    }
    return PyLong_FromLongLong(rc);
}

/* lookup_loc(ids_addr, n, index_addr, classes_addr, out_addr, width, threads) -> (unknown, locators)
 *
 * lookup without a locator array from the caller: the int32 locators [n] come back in a new
 * bytearray of 4 * n bytes (native order), which CompressedTable.lookup turns into a tensor
 * only if someone asks for it (LookupResult.locators).  A bytearray made here costs about 0.05
 * us against 0.8 us for the int32 tensor it replaces - a quarter of a batch-1 lookup. */
static PyObject *py_lookup_loc(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[7];
    if (int_args(args, nargs, 7, v, "lookup_loc") < 0) return NULL;
    const int64_t n = v[1];
    if (n < 0 || n > PY_SSIZE_T_MAX / 4) {
        PyErr_SetString(PyExc_ValueError, "lookup_loc: negative or oversized length");
        return NULL;
    }
    PyObject *loc = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(4 * n));
    if (loc == NULL) return NULL;
    const int64_t rc = lookup_addressed(v, (int32_t *)PyByteArray_AS_STRING(loc), (int32_t)v[6]);
    if (rc < 0) {
        Py_DECREF(loc);
        PyErr_SetString(PyExc_RuntimeError, "compiled decoder rejected its arguments");
        return NULL;
    }
    return Py_BuildValue("(LN)", (long long)rc, loc);
}

/* lookup_answer's decode, without the GIL's help (it may run with the GIL released): float32
 * rows straight into the answer, or 16-bit ones `chunk` rows at a time through `scratch`. */
static int64_t decode_answer(const int64_t *ids, int64_t n, int64_t index_addr, int64_t classes_addr, char *rows_at, int64_t width,
                             int32_t *loc, int32_t dtype, float *scratch, int64_t chunk) {
    if (dtype < 2)
        return embserve_lookup(ids, n, (const void *)(intptr_t)index_addr, (const void *)(intptr_t)classes_addr, N_CLASSES,
                               (float *)rows_at, width, loc, 1);
    int64_t unknown = 0;
    for (int64_t k = 0; k < n; k += chunk) {
        const int64_t m = n - k < chunk ? n - k : chunk;
        const int64_t got = embserve_lookup(ids + k, m, (const void *)(intptr_t)index_addr, (const void *)(intptr_t)classes_addr,
                                            N_CLASSES, scratch, width, loc + k, 1);
        if (got < 0) return got;
        unknown += got;
        embserve_narrow(scratch, m * width, (uint16_t *)(rows_at + 2 * k * width), dtype);
    }
    return unknown;
}

/* lookup_answer(ids, ids_offset, n, index_addr, classes_addr, answer, rows_offset, width, status_offset[, dtype]) -> unknown
 *
 * A lookup decoded straight into a response buffer, for the service's binary answers:
 *   ids:     any buffer (the request body) holding int64 little-endian IDs [n] at ids_offset
 *            (any alignment: they are copied out first when misaligned);
 *   answer:  a writable buffer (the response bytearray): rows [n, width] are written at
 *            rows_offset, and one status byte per ID at status_offset: 1 the ID has a row, 0 not
 *            (the caller fills unknown rows and marks pruned ones; see service/wire.py for the
 *            layout around them);
 *   dtype:   the rows' type, the wire's codes: 0 or 1 float32 (4 bytes a value), 2 fp16, 3 bf16
 *            (2 bytes, rounded to nearest even by embserve_narrow, NARROW_CHUNK_VALUES at a time).
 * Both ranges are checked against the buffers' lengths.  Returns how many IDs had no row. */
static PyObject *py_lookup_answer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9 && nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "lookup_answer takes 9 or 10 arguments");
        return NULL;
    }
    int64_t ids_off, n, index_addr, classes_addr, rows_off, width, status_off, dtype = 0;
    if (as_int64(args[1], &ids_off) < 0 || as_int64(args[2], &n) < 0 || as_int64(args[3], &index_addr) < 0 ||
        as_int64(args[4], &classes_addr) < 0 || as_int64(args[6], &rows_off) < 0 || as_int64(args[7], &width) < 0 ||
        as_int64(args[8], &status_off) < 0 || (nargs == 10 && as_int64(args[9], &dtype) < 0))
        return NULL;
    if (n < 0 || width <= 0 || ids_off < 0 || rows_off < 0 || status_off < 0 || n > ((int64_t)1 << 40) / (width + 9)) {
        PyErr_SetString(PyExc_ValueError, "lookup_answer: negative or oversized arguments");
        return NULL;
    }
    if (dtype < 0 || dtype > 3) {
        PyErr_SetString(PyExc_ValueError, "lookup_answer: dtype must be 0/1 (float32), 2 (fp16) or 3 (bf16)");
        return NULL;
    }
    const int64_t value_bytes = dtype >= 2 ? 2 : 4;
    Py_buffer ids_view, out_view;
    if (PyObject_GetBuffer(args[0], &ids_view, PyBUF_SIMPLE) < 0) return NULL;
    if (PyObject_GetBuffer(args[5], &out_view, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&ids_view);
        return NULL;
    }
    PyObject *result = NULL;
    int32_t loc_small[64];
    int64_t ids_small[64];
    int32_t *loc = loc_small;
    int64_t *ids_copy = NULL;
    float *scratch = NULL;
    if (ids_off + 8 * n > ids_view.len || rows_off + value_bytes * n * width > out_view.len || status_off + n > out_view.len) {
        PyErr_SetString(PyExc_ValueError, "lookup_answer: a range runs past its buffer");
        goto done;
    }
    if (n > 64) {
        loc = (int32_t *)PyMem_Malloc((size_t)n * sizeof(int32_t));
        if (loc == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    const char *ids_at = (const char *)ids_view.buf + ids_off;
    const int64_t *ids = (const int64_t *)ids_at;
    if (((uintptr_t)ids_at & 7) != 0) { /* the decoder reads int64s: give it aligned ones */
        ids_copy = n > 64 ? (int64_t *)PyMem_Malloc((size_t)n * sizeof(int64_t)) : ids_small;
        if (ids_copy == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memcpy(ids_copy, ids_at, (size_t)n * 8);
        ids = ids_copy;
    }
    char *rows_at = (char *)out_view.buf + rows_off;
    if (((uintptr_t)rows_at & (uintptr_t)(value_bytes - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "lookup_answer: rows_offset leaves the rows misaligned");
        goto done;
    }
    /* 16-bit rows: chunks of whole rows through a float32 scratch */
    const int64_t chunk = value_bytes == 4 ? n : (NARROW_CHUNK_VALUES / width > 0 ? NARROW_CHUNK_VALUES / width : 1);
    if (value_bytes == 2 && n > 0) {
        scratch = (float *)PyMem_Malloc((size_t)(chunk < n ? chunk : n) * (size_t)width * sizeof(float));
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    int64_t rc;
    if (n >= GIL_RELEASE_MIN) {
        Py_BEGIN_ALLOW_THREADS
        rc = decode_answer(ids, n, index_addr, classes_addr, rows_at, width, loc, (int32_t)dtype, scratch, chunk);
        Py_END_ALLOW_THREADS
    } else {
        rc = decode_answer(ids, n, index_addr, classes_addr, rows_at, width, loc, (int32_t)dtype, scratch, chunk);
    }
    if (rc < 0) {
        PyErr_SetString(PyExc_RuntimeError, "compiled decoder rejected its arguments");
        goto done;
    }
    uint8_t *status = (uint8_t *)out_view.buf + status_off;
    for (int64_t k = 0; k < n; k++) status[k] = loc[k] >= 0;
    result = PyLong_FromLongLong(rc);
done:
    if (loc != loc_small && loc != NULL) PyMem_Free(loc);
    if (scratch != NULL) PyMem_Free(scratch);
    if (ids_copy != NULL && ids_copy != ids_small) PyMem_Free(ids_copy);
    PyBuffer_Release(&out_view);
    PyBuffer_Release(&ids_view);
    return result;
}

/* pruned(loc_addr, n, classes_addr, out_addr) -> count
 *
 * embserve_pruned_mask: bool (uint8) out [n] = the locator names a row of a pruned (dim-0)
 * class; returns how many do.  The caller keeps the int32 loc [n], the class array and out
 * alive for the call. */
static PyObject *py_pruned(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t v[4];
    if (int_args(args, nargs, 4, v, "pruned") < 0) return NULL;
    if (v[1] < 0) {
        PyErr_SetString(PyExc_ValueError, "pruned: negative length");
        return NULL;
    }
    return PyLong_FromLongLong(embserve_pruned_mask((const int32_t *)(intptr_t)v[0], v[1], (const void *)(intptr_t)v[2],
                                                    (uint8_t *)(intptr_t)v[3]));
}

/* answer_buffer(size) -> bytearray of ``size`` bytes, contents not initialised
 *
 * PyByteArray_FromStringAndSize with no source bytes: the service's binary answer, every byte
 * of which its writer sets (head, lookup_answer's rows and statuses, the padding), so the
 * zero-fill of bytearray(size) - about 9 us for a batch-1024 answer at 64 dims - is skipped. */
static PyObject *py_answer_buffer(PyObject *self, PyObject *arg) {
    (void)self;
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "answer_buffer: negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, size);
}

static PyMethodDef methods[] = {
    {"lookup", (PyCFunction)(void (*)(void))py_lookup, METH_FASTCALL, "embserve_lookup by addresses (see pyentry.c)"},
    {"lookup_loc", (PyCFunction)(void (*)(void))py_lookup_loc, METH_FASTCALL,
     "embserve_lookup by addresses, the locators returned in a new bytearray (see pyentry.c)"},
    {"lookup_answer", (PyCFunction)(void (*)(void))py_lookup_answer, METH_FASTCALL,
     "decode IDs from one buffer into rows and status bytes of another (see pyentry.c)"},
    {"pruned", (PyCFunction)(void (*)(void))py_pruned, METH_FASTCALL, "embserve_pruned_mask by addresses (see pyentry.c)"},
    {"answer_buffer", (PyCFunction)py_answer_buffer, METH_O, "a bytearray whose contents are not initialised (see pyentry.c)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_entry", "CPython entry points of the compiled decoder", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__entry(void) {
    embserve_init();
    PyObject *m = PyModule_Create(&module);
    /* lookup_answer takes its dtype argument (16-bit answers): cpu_c.ENTRY_NARROW */
    if (m != NULL && PyModule_AddIntConstant(m, "ANSWER_DTYPES", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
