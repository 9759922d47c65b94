/* A replace pull of FL4Health's (nnz, ndim) int64 coordinates: a check pass, then one write pass (see
 * pull.py's replace_coo_into, which falls back to numpy wherever this module is missing or declines).
 *
 * check(coords, shape, threads) -> bool
 *     True when every row of the C-contiguous int64 buffer `coords` (rows of len(shape) coordinates)
 *     lies inside `shape` and their flat row-major positions strictly increase.
 * write(dense, itemsize, add_zero, coords, shape, values, threads) -> None
 *     The writable buffer `dense` (prod(shape) items of `itemsize` bytes) becomes zero but for `values`
 *     (same itemsize, one per row) at the rows' flat positions. With add_zero (itemsize 4: float32,
 *     8: float64) each value is written plus 0, as densifying into zeros gives it (-0.0 becomes +0.0).
 *     The tensor is built a cache-sized span at a time and each span is written once. Every position is
 *     checked again before it is written: coordinates changed since check() raise ValueError (with
 *     part of `dense` written), never write outside it.
 *
 * Both let go of the GIL and share their work among `threads` OpenMP threads. Linked against
 * libgomp.so.1, the module joins the runtime torch has loaded already, so that its threads are torch's:
 * right after a torch operation they are still spinning, waiting for work, and take this at once
 * (threads of our own would have to share the cores with them while they spin). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#define MAX_NDIM 64
#define SPAN_BYTES 16384 /* bytes of the tensor write() builds in the core's cache at a time */
#define MIN_SHARE (1 << 16) /* fewest rows (check) or elements (write) a thread takes on */

typedef struct {
    Py_ssize_t ndim;
    uint64_t dims[MAX_NDIM];
    uint64_t numel;
} Shape;

static int read_shape(PyObject *shape, Shape *out) {
    PyObject *seq = PySequence_Fast(shape, "shape must be a sequence of ints");
    if (seq == NULL) return -1;
    out->ndim = PySequence_Fast_GET_SIZE(seq);
    out->numel = 1;
    int error = 0;
    if (out->ndim < 1 || out->ndim > MAX_NDIM) {
        PyErr_SetString(PyExc_ValueError, "shape must have 1 to 64 dimensions");
        error = 1;
    }
    for (Py_ssize_t axis = 0; !error && axis < out->ndim; axis++) {
        long long dim = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, axis));
        if (dim == -1 && PyErr_Occurred()) {
            error = 1;
        } else if (dim < 0) {
            PyErr_SetString(PyExc_ValueError, "shape must not be negative");
            error = 1;
        } else if (dim > 0 && out->numel > (uint64_t)PY_SSIZE_T_MAX / (uint64_t)dim) {
            PyErr_SetString(PyExc_ValueError, "shape has more elements than memory can hold");
            error = 1;
        } else {
            out->dims[axis] = (uint64_t)dim;
            out->numel *= (uint64_t)dim;
        }
    }
    Py_DECREF(seq);
    return error ? -1 : 0;
}

/* The number of rows in `coords`; -1 with a ValueError when it does not hold whole rows. */
static Py_ssize_t row_count(const Py_buffer *coords, Py_ssize_t ndim) {
    Py_ssize_t row = (Py_ssize_t)sizeof(int64_t) * ndim;
    if (coords->len % row != 0) {
        PyErr_SetString(PyExc_ValueError, "coords must hold whole rows of int64, one per coordinate");
        return -1;
    }
    return coords->len / row;
}

static int thread_count(Py_ssize_t threads, uint64_t work) {
    uint64_t most = work / MIN_SHARE;
    if (threads < 1 || most < 1) return 1;
    return (uint64_t)threads < most ? (int)threads : (int)most;
}

/* The flat row-major position of one coordinate row; *ok = 0 when a coordinate is out of its axis. */
static inline uint64_t flat_of(const uint64_t *row, const Shape *s, int *ok) {
    uint64_t flat = 0;
    for (Py_ssize_t axis = 0; axis < s->ndim; axis++) {
        *ok &= row[axis] < s->dims[axis];
        flat = flat * s->dims[axis] + row[axis]; /* < numel while in range: no overflow */
    }
    return flat;
}

/* rows_ok for two axes from row `first` (> 0) on, in the order of the coordinates rather than of
 * their flat positions (the same once each is inside its axis), so that the compiler vectorises it. */
__attribute__((target_clones("avx2", "default"))) static int rows_ok_2d(const uint64_t *c, uint64_t d0,
                                                                         uint64_t d1, Py_ssize_t first,
                                                                         Py_ssize_t last) {
    unsigned bad = 0;
    for (Py_ssize_t i = first; i < last; i++) {
        const uint64_t r0 = c[2 * i], r1 = c[2 * i + 1], p0 = c[2 * i - 2], p1 = c[2 * i - 1];
        bad |= (r0 >= d0) | (r1 >= d1) | (r0 < p0) | ((r0 == p0) & (r1 <= p1));
    }
    return !bad;
}

/* 1 when rows [first, last) are all in range and strictly increase (from row first - 1 on). Coordinates
 * are read as unsigned: a negative one is huge, out of range. */
static int rows_ok(const uint64_t *c, const Shape *s, Py_ssize_t first, Py_ssize_t last) {
    if (first >= last) return 1;
    int ok = 1;
    uint64_t previous = 0;
    Py_ssize_t i = first;
    if (i == 0) {
        previous = flat_of(c, s, &ok);
        i = 1;
    } else {
        previous = flat_of(c + (i - 1) * s->ndim, s, &ok);
    }
    if (s->ndim == 2) /* the common case, without the loop over axes */
        return ok && rows_ok_2d(c, s->dims[0], s->dims[1], i, last);
    for (; ok && i < last; i++) {
        const uint64_t flat = flat_of(c + i * s->ndim, s, &ok);
        ok &= flat > previous;
        previous = flat;
    }
    return ok;
}

/* Elements [lo, hi) of `d` become zero but for the values of rows [first, last), one span at a time built
 * in a buffer that stays in the core's cache and is then copied out. Returns 1 (having stopped) when a
 * row is out of range, out of order or outside [lo, hi): the coordinates changed since check().
 * FLAT(i) is row i's flat position (clearing `ok` when a coordinate is outside its axis); PUT(slot, i)
 * writes value i into the buffer's slot. */
#define WRITE_SPANS(FLAT, PUT)                                                  \
    do {                                                                        \
        for (Py_ssize_t i = first; i < last; i++) {                             \
            PREFETCH(i);                                                        \
            const uint64_t flat = FLAT(i);                                      \
            if (!ok || flat < next || flat >= hi) {                             \
                ok = 0;                                                         \
                break;                                                          \
            }                                                                   \
            next = flat + 1;                                                    \
            while (flat >= end) {                                               \
                memcpy(d + pos * size, buf, (size_t)((end - pos) * size));    \
                pos = end;                                                      \
                end = end + span < hi ? end + span : hi;                        \
                memset(buf, 0, (size_t)((end - pos) * size));                   \
            }                                                                   \
            PUT((flat - pos), i);                                               \
        }                                                                       \
    } while (0)

/* Rows ahead that write() asks the memory for: it waits on them otherwise (a third of its time). */
#define AHEAD 128
#define PREFETCH(i) __builtin_prefetch(c + ((i) + AHEAD) * s->ndim)
#define FLAT_2D(i) (ok &= (c[2 * (i)] < d0) & (c[2 * (i) + 1] < d1), c[2 * (i)] * d1 + c[2 * (i) + 1])
#define FLAT_ND(i) flat_of(c + (i) * s->ndim, s, &ok)
#define PUT_F32(slot, i) (((float *)buf)[slot] = ((const float *)v)[i] + 0.0f)
#define PUT_F64(slot, i) (((double *)buf)[slot] = ((const double *)v)[i] + 0.0)
#define PUT_BYTES(slot, i) memcpy(buf + (slot) * size, v + (i) * size, (size_t)size)

static int write_spans(char *d, uint64_t size, int add_zero, const uint64_t *c, const Shape *s, const char *v,
                       Py_ssize_t first, Py_ssize_t last, uint64_t lo, uint64_t hi) {
    if (lo >= hi) return first != last;
    _Alignas(64) char buf[SPAN_BYTES];
    const uint64_t span = SPAN_BYTES / size;
    const uint64_t d0 = s->dims[0], d1 = s->ndim > 1 ? s->dims[1] : 1;
    uint64_t pos = lo, next = lo, end = (lo / span + 1) * span;
    int ok = 1;
    if (end > hi) end = hi;
    memset(buf, 0, (size_t)((end - pos) * size));
    if (s->ndim == 2 && add_zero && size == 4) {
        WRITE_SPANS(FLAT_2D, PUT_F32);
    } else if (s->ndim == 2 && add_zero) {
        WRITE_SPANS(FLAT_2D, PUT_F64);
    } else if (add_zero && size == 4) {
        WRITE_SPANS(FLAT_ND, PUT_F32);
    } else if (add_zero) {
        WRITE_SPANS(FLAT_ND, PUT_F64);
    } else {
        WRITE_SPANS(FLAT_ND, PUT_BYTES);
    }
    if (!ok) return 1;
    for (;;) { /* the spans after the last value */
        memcpy(d + pos * size, buf, (size_t)((end - pos) * size));
        pos = end;
        if (pos >= hi) break;
        end = end + span < hi ? end + span : hi;
        memset(buf, 0, (size_t)((end - pos) * size));
    }
    return 0;
}

/* The first of rows [0, rows) whose flat position is >= `element` (rows strictly increase). */
static Py_ssize_t first_row_at(const uint64_t *c, const Shape *s, Py_ssize_t rows, uint64_t element) {
    Py_ssize_t low = 0, high = rows;
    while (low < high) {
        Py_ssize_t middle = low + (high - low) / 2;
        int ok = 1;
        if (flat_of(c + middle * s->ndim, s, &ok) < element && ok)
            low = middle + 1;
        else
            high = middle;
    }
    return low;
}

static PyObject *fp_check(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer coords;
    PyObject *shape;
    Py_ssize_t threads;
    Shape s;
    if (!PyArg_ParseTuple(args, "y*On", &coords, &shape, &threads)) return NULL;
    Py_ssize_t rows = -1;
    if (read_shape(shape, &s) == 0) rows = row_count(&coords, s.ndim);
    if (rows < 0) {
        PyBuffer_Release(&coords);
        return NULL;
    }
    const uint64_t *c = (const uint64_t *)coords.buf;
    int ok = 1;
    const int team = thread_count(threads, (uint64_t)rows);
    Py_BEGIN_ALLOW_THREADS
#if defined(_OPENMP)
#pragma omp parallel num_threads(team) reduction(& : ok)
    {
        const Py_ssize_t t = omp_get_thread_num(), n = omp_get_num_threads();
        ok = rows_ok(c, &s, rows * t / n, rows * (t + 1) / n);
    }
#else
    (void)team;
    ok = rows_ok(c, &s, 0, rows);
#endif
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&coords);
    return PyBool_FromLong(ok);
}

static PyObject *fp_write(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer dense, coords, values;
    Py_ssize_t itemsize, threads;
    int add_zero;
    PyObject *shape;
    Shape s;
    if (!PyArg_ParseTuple(args, "w*npy*Oy*n", &dense, &itemsize, &add_zero, &coords, &shape, &values,
                          &threads))
        return NULL;
    Py_ssize_t rows = -1;
    const char *error = NULL;
    if (read_shape(shape, &s) == 0) rows = row_count(&coords, s.ndim);
    if (rows < 0) {
        error = "";
    } else if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8 && itemsize != 16) {
        error = "itemsize must be 1, 2, 4, 8 or 16";
    } else if (add_zero && itemsize != 4 && itemsize != 8) {
        error = "add_zero needs itemsize 4 (float32) or 8 (float64)";
    } else if ((uint64_t)dense.len != s.numel * (uint64_t)itemsize) {
        error = "dense must hold prod(shape) items";
    } else if (values.len % itemsize != 0 || values.len / itemsize != rows) {
        error = "values must hold one item per row of coords";
    }
    if (error != NULL) {
        if (*error) PyErr_SetString(PyExc_ValueError, error);
        PyBuffer_Release(&dense);
        PyBuffer_Release(&coords);
        PyBuffer_Release(&values);
        return NULL;
    }
    const uint64_t *c = (const uint64_t *)coords.buf;
    char *d = (char *)dense.buf;
    const char *v = (const char *)values.buf;
    const uint64_t size = (uint64_t)itemsize, numel = s.numel;
    int changed = 0;
    const int team = thread_count(threads, numel);
    Py_BEGIN_ALLOW_THREADS
#if defined(_OPENMP)
#pragma omp parallel num_threads(team) reduction(| : changed)
    {
        /* Each thread takes a share of the elements, and the rows that fall in it. */
        const uint64_t t = (uint64_t)omp_get_thread_num(), n = (uint64_t)omp_get_num_threads();
        const uint64_t lo = numel * t / n, hi = numel * (t + 1) / n;
        const Py_ssize_t first = t == 0 ? 0 : first_row_at(c, &s, rows, lo);
        const Py_ssize_t last = t + 1 == n ? rows : first_row_at(c, &s, rows, hi);
        changed = write_spans(d, size, add_zero, c, &s, v, first, last, lo, hi);
    }
#else
    (void)team;
    changed = write_spans(d, size, add_zero, c, &s, v, 0, rows, 0, numel);
#endif
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dense);
    PyBuffer_Release(&coords);
    PyBuffer_Release(&values);
    if (changed) {
        PyErr_SetString(PyExc_ValueError, "coordinates out of range or order: changed since they were checked");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"check", fp_check, METH_VARARGS, "check(coords, shape, threads) -> bool"},
    {"write", fp_write, METH_VARARGS, "write(dense, itemsize, add_zero, coords, shape, values, threads) -> None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "paramsel.engine._fastpull",
    "A replace pull of (nnz, ndim) int64 coordinates: a check pass and one write pass (see pull.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastpull(void) { return PyModule_Create(&module); }
