/* The stream's two per-message loops in C: the replication stream's framing (wire.WireConnection.read)
 * and the walk through the TupleData of row changes (columnar._tuple).
 *
 * split(buf, off, size, max_messages, max_bytes, out, tags, positions) -> (off, size, last)
 *   Takes consecutive XLogData frames from buf[off:]: appends each one's pgoutput payload to the list
 *   ``out``, its first byte (the message tag) to the bytearray ``tags`` and, unless ``positions`` is
 *   None, its data start to that list. ``size`` counts the payload bytes taken (passed in and back).
 *   Stops before a frame that is incomplete, is not XLogData, or is malformed (a length under 4, an
 *   XLogData frame without a payload), and once ``out`` holds ``max_messages`` or ``size`` reached
 *   ``max_bytes``: the caller deals with that frame. Returns where it stopped, the size and the
 *   offset of the last frame taken (-1 when none).
 *
 * strings(arr, starts, lengths, valid) -> (offsets, data, validity, nulls)
 *   The buffers of an Arrow large_string array of arr[starts[i]:starts[i] + lengths[i]] where
 *   valid[i], else NULL (columnar.text_array): int64 offsets, the values' bytes, the validity bitmap
 *   (None when nothing is NULL) and the NULL count. ``starts`` and ``lengths`` are int64 and
 *   ``valid`` one byte per item, all of n items, strided or not; a value outside ``arr`` raises.
 *   Both passes over the items run without the GIL.
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
#include <string.h>

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

/* Item i of a strided one-dimensional view, which may not be aligned for its type. */
static inline int64_t at64(const Py_buffer *v, Py_ssize_t i) {
    int64_t x;
    memcpy(&x, (const char *)v->buf + i * v->strides[0], sizeof x);
    return x;
}

static inline uint8_t at8(const Py_buffer *v, Py_ssize_t i) { return *((const uint8_t *)v->buf + i * v->strides[0]); }

/* Whether a buffer's format (native, or with an explicit native or little-endian prefix) is one of ``codes``. */
static int format_is(const Py_buffer *v, const char *codes) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++;
    return f[0] != '\0' && f[1] == '\0' && strchr(codes, f[0]) != NULL;
}

static PyObject *strings(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *arr_obj, *starts_obj, *lengths_obj, *valid_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &arr_obj, &starts_obj, &lengths_obj, &valid_obj)) return NULL;
    Py_buffer arr = {0}, st = {0}, ln = {0}, va = {0};
    PyObject *offsets = NULL, *data = NULL, *validity = NULL, *result = NULL;
    const int flags = PyBUF_STRIDED_RO | PyBUF_FORMAT;
    if (PyObject_GetBuffer(arr_obj, &arr, PyBUF_SIMPLE) < 0 || PyObject_GetBuffer(starts_obj, &st, flags) < 0 ||
        PyObject_GetBuffer(lengths_obj, &ln, flags) < 0 || PyObject_GetBuffer(valid_obj, &va, flags) < 0)
        goto done;
    if (st.ndim != 1 || ln.ndim != 1 || va.ndim != 1 || st.itemsize != 8 || ln.itemsize != 8 || va.itemsize != 1 ||
        !format_is(&st, "lq") || !format_is(&ln, "lq") || !format_is(&va, "B?b") || ln.shape[0] != st.shape[0] ||
        va.shape[0] != st.shape[0] || st.shape[0] > PY_SSIZE_T_MAX / 8 - 1) {
        PyErr_SetString(PyExc_ValueError, "strings: starts and lengths must be int64 and valid one byte, of one length");
        goto done;
    }
    Py_ssize_t n = st.shape[0], nulls = 0, bad = -1;
    int64_t total = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!at8(&va, i)) {
            nulls++;
            continue;
        }
        int64_t start = at64(&st, i), len = at64(&ln, i);
        if (start < 0 || len < 0 || start > arr.len || len > arr.len - start || total > PY_SSIZE_T_MAX - len) {
            bad = i;
            break;
        }
        total += len;
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "strings: value %zd lies outside the buffer", bad);
        goto done;
    }
    offsets = PyBytes_FromStringAndSize(NULL, (n + 1) * 8);
    data = PyBytes_FromStringAndSize(NULL, total);
    if (offsets == NULL || data == NULL) goto done;
    if (nulls) {
        validity = PyBytes_FromStringAndSize(NULL, (n + 7) / 8);
        if (validity == NULL) goto done;
        memset(PyBytes_AS_STRING(validity), 0, (n + 7) / 8);
    }
    {
        int64_t *off = (int64_t *)PyBytes_AS_STRING(offsets);
        char *out = PyBytes_AS_STRING(data);
        uint8_t *bits = validity ? (uint8_t *)PyBytes_AS_STRING(validity) : NULL;
        const char *a = arr.buf;
        int changed = 0;
        Py_BEGIN_ALLOW_THREADS
        int64_t o = 0;
        off[0] = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (at8(&va, i)) {
                /* Checked again: the arrays are read twice, and the first pass sized ``data``. */
                int64_t start = at64(&st, i), len = at64(&ln, i);
                if (start < 0 || len < 0 || start > arr.len || len > arr.len - start || len > total - o) {
                    changed = 1;
                    break;
                }
                memcpy(out + o, a + start, (size_t)len);
                o += len;
                if (bits) bits[i >> 3] |= (uint8_t)(1u << (i & 7));
            }
            off[i + 1] = o;
        }
        if (!changed && o != total) changed = 1;
        Py_END_ALLOW_THREADS
        if (changed) {
            PyErr_SetString(PyExc_ValueError, "strings: the arrays changed while they were read");
            goto done;
        }
    }
    result = Py_BuildValue("OOOn", offsets, data, validity ? validity : Py_None, nulls);
done:
    Py_XDECREF(offsets);
    Py_XDECREF(data);
    Py_XDECREF(validity);
    if (arr.obj) PyBuffer_Release(&arr);
    if (st.obj) PyBuffer_Release(&st);
    if (ln.obj) PyBuffer_Release(&ln);
    if (va.obj) PyBuffer_Release(&va);
    return result;
}

static PyObject *split(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer buf;
    Py_ssize_t off, size, max_messages, max_bytes;
    PyObject *out, *tags, *positions;
    if (!PyArg_ParseTuple(args, "y*nnnnO!O!O", &buf, &off, &size, &max_messages, &max_bytes, &PyList_Type, &out,
                          &PyByteArray_Type, &tags, &positions))
        return NULL;
    PyObject *result = NULL;
    const uint8_t *a = buf.buf;
    Py_ssize_t n = buf.len, last = -1, taken = 0, have = PyList_GET_SIZE(out);
    Py_ssize_t left = max_messages > have ? max_messages - have : 0;
    char *tagged = NULL;
    if (off < 0 || size < 0 || (positions != Py_None && !PyList_Check(positions))) {
        PyErr_SetString(PyExc_ValueError, "split: a negative offset or size, or positions neither a list nor None");
        goto done;
    }
    /* A frame with a payload is at least 31 bytes: no more tags than that can be taken. */
    if (n > off && left > (n - off) / 31 + 1) left = (n - off) / 31 + 1;
    tagged = PyMem_Malloc(left ? (size_t)left : 1);
    if (tagged == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    while (taken < left && n - off >= 5 && size < max_bytes) {
        uint32_t length = (uint32_t)a[off + 1] << 24 | (uint32_t)a[off + 2] << 16 | (uint32_t)a[off + 3] << 8 | a[off + 4];
        if ((uint64_t)length >= (uint64_t)(n - off) || a[off] != 'd' || length < 30 || a[off + 5] != 'w') break;
        Py_ssize_t end = off + 1 + (Py_ssize_t)length;
        PyObject *payload = PyBytes_FromStringAndSize((const char *)a + off + 30, end - off - 30);
        if (payload == NULL || PyList_Append(out, payload) < 0) {
            Py_XDECREF(payload);
            goto done;
        }
        Py_DECREF(payload);
        if (positions != Py_None) {
            const uint8_t *p = a + off + 6;
            uint64_t start = 0;
            for (int i = 0; i < 8; i++) start = start << 8 | p[i];
            PyObject *value = PyLong_FromUnsignedLongLong(start);
            if (value == NULL || PyList_Append(positions, value) < 0) {
                Py_XDECREF(value);
                goto done;
            }
            Py_DECREF(value);
        }
        tagged[taken++] = (char)a[off + 30];
        size += end - off - 30;
        last = off;
        off = end;
    }
    if (taken) {
        Py_ssize_t tag0 = PyByteArray_GET_SIZE(tags);
        if (PyByteArray_Resize(tags, tag0 + taken) < 0) goto done;
        memcpy(PyByteArray_AS_STRING(tags) + tag0, tagged, (size_t)taken);
    }
    result = Py_BuildValue("nnn", off, size, last);
done:
    PyMem_Free(tagged);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef METHODS[] = {
    {"split", split, METH_VARARGS, "Take the XLogData frames of a replication stream's buffer (see the module source)."},
    {"strings", strings, METH_VARARGS, "The buffers of an Arrow large_string array cut out of a buffer (see the module source)."},
    {"walk", walk, METH_VARARGS, "Walk the TupleData of many pgoutput messages (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_rowwalk", NULL, -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rowwalk(void) { return PyModule_Create(&MODULE); }
