/* Walk the TupleData of many pgoutput row-change messages: the compiled form of columnar._tuple.
 *
 * walk(arr, off, limit, kinds, starts, lengths) -> bool
 *   arr      the message buffer followed by zero bytes (columnar.decode_rows pads it with 8),
 *            so a read at most 4 bytes past ``limit`` stays inside it
 *   off      int64[n], in/out: where each message's TupleData starts; on return, where it ends
 *   limit    len(buffer) + 1: an offset is never taken past it (a value running past the buffer
 *            lands in the padding, never on a message end)
 *   kinds    uint8[n, ncols], starts and lengths int64[n, ncols]: filled as columnar.TupleColumns
 *            holds them (0 for a NULL or unchanged column)
 * False when a message's column count differs from ncols or a column kind is unknown: the caller
 * then decodes those messages one by one. Runs without the GIL. The arrays must be C-contiguous of
 * the dtypes named (columnar._tuple makes them so); only their byte sizes are checked here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int walk_all(const uint8_t *a, int64_t *offs, Py_ssize_t n, Py_ssize_t ncols, int64_t limit, uint8_t *kinds,
                    int64_t *starts, int64_t *lengths) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t o = offs[i];
        if (o < 0) return 0;
        if (o > limit) o = limit;
        if (((Py_ssize_t)a[o] << 8 | a[o + 1]) != ncols) return 0;
        o += 2;
        for (Py_ssize_t c = 0; c < ncols; c++) {
            Py_ssize_t at = i * ncols + c;
            if (o > limit) o = limit;
            uint8_t kind = a[o];
            kinds[at] = kind;
            if (kind == 't' || kind == 'b') {
                int64_t len = ((int64_t)a[o + 1] << 24) | ((int64_t)a[o + 2] << 16) | ((int64_t)a[o + 3] << 8) | a[o + 4];
                starts[at] = o + 5;
                lengths[at] = len;
                o += 5 + len;
            } else if (kind == 'n' || kind == 'u') {
                starts[at] = 0;
                lengths[at] = 0;
                o += 1;
            } else {
                return 0;
            }
        }
        offs[i] = o > limit ? limit : o;
    }
    return 1;
}

static PyObject *walk(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer arr, off, kinds, starts, lengths;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*w*nw*w*w*", &arr, &off, &limit, &kinds, &starts, &lengths)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = off.len / 8, ncols = n ? kinds.len / n : 0;
    int ok;
    if (off.len % 8 || (n && kinds.len % n) || starts.len != kinds.len * 8 || lengths.len != kinds.len * 8 ||
        limit < 0 || limit > arr.len - 5 || ncols > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "walk: arrays of mismatched sizes, or a buffer without its padding");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = walk_all(arr.buf, off.buf, n, ncols, limit, kinds.buf, starts.buf, lengths.buf);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(ok);
done:
    PyBuffer_Release(&arr);
    PyBuffer_Release(&off);
    PyBuffer_Release(&kinds);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&lengths);
    return result;
}

static PyMethodDef METHODS[] = {
    {"walk", walk, METH_VARARGS, "Walk the TupleData of many pgoutput messages (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_rowwalk", NULL, -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rowwalk(void) { return PyModule_Create(&MODULE); }
