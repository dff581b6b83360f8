/* Decode the output of COPY ... TO STDOUT (FORMAT binary) into column buffers Arrow can wrap.
 *
 * The initial load reads each span of a table as one binary COPY (cdc/snapshot.py). Its rows have
 * no separators: an Int16 field count, then per field an Int32 length (-1: NULL) and the bytes.
 * Finding each row therefore takes a walk through every length, which only compiled code does at
 * the speed the server sends rows; cdc/copybinary.py wraps this module and builds the Arrow arrays.
 *
 * decode(buf, kinds, scales) -> (rows, columns) or None
 *   buf     the whole COPY output (header, rows, trailer), as bytes (immutable: the second pass
 *           trusts the first pass's checks)
 *   kinds   one byte per field: 'h' int2, 'i' int4, 'l' int8, 'o' oid, 'f' float4, 'd' float8,
 *           'b' bool, 'D' date, 't' timestamp(tz), 'n' numeric, 'T' text (anything sent as text)
 *   scales  one byte per field: a numeric's scale (0-38) and, in the high bits, nothing else
 *   columns per field: (values, validity) or, for 'T', (offsets, data, validity); validity is None
 *           when no value is NULL, else one byte per row (1: a value).
 * Values come out little-endian as Arrow lays them out: int16/int32/int64/uint32, float32/64, one
 * byte per bool, date32 (days since 1970), int64 microseconds since 1970, decimal128 (16 bytes),
 * and large_string offsets (int64) with their data.
 *
 * None means "copy this span as text instead": malformed output, a field of another width, a date
 * or timestamp outside years 1-9999 (the text path's typed parse refuses those too), NaN or
 * infinity in a numeric, or a numeric that does not fit 18 digits at its scale.
 * The walks run without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HEADER 19
#define PG_EPOCH_DAYS 10957LL
#define DAY_US 86400000000LL
#define FIRST_DAY (-730119LL) /* 0001-01-01, days from 2000-01-01 */
#define LAST_DAY 2921939LL    /* 9999-12-31 */
#define MAX_FIELDS 1664       /* PostgreSQL's limit of columns in a result */

static const char SIGNATURE[11] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', '\xff', '\r', '\n', '\0'};

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return ((uint64_t)be32(p) << 32) | be32(p + 4); }

static int width_of(char kind) {
    switch (kind) {
    case 'h': return 2;
    case 'i': case 'o': case 'f': case 'D': return 4;
    case 'l': case 'd': case 't': return 8;
    case 'b': return 1;
    case 'n': return 16; /* out: decimal128 */
    default: return 0;
    }
}

/* Pass 1: count the rows, the text bytes of each field and whether any value is NULL. */
static int count(const uint8_t *buf, Py_ssize_t n, int ncols, Py_ssize_t *rows, int64_t *text_bytes,
                 char *nulls) {
    Py_ssize_t off = HEADER, r = 0;
    for (;;) {
        if (off + 2 > n) return 0;
        uint16_t cnt = be16(buf + off);
        off += 2;
        if (cnt == 0xFFFF) break;
        if (cnt != ncols) return 0;
        for (int c = 0; c < ncols; c++) {
            if (off + 4 > n) return 0;
            int32_t len = (int32_t)be32(buf + off);
            off += 4;
            if (len == -1) {
                nulls[c] = 1;
                continue;
            }
            if (len < 0 || len > n - off) return 0;
            text_bytes[c] += len;
            off += len;
        }
        r++;
    }
    if (off != n) return 0;
    *rows = r;
    return 1;
}

static int numeric(const uint8_t *p, int32_t len, int scale, uint8_t *out) {
    static const int64_t P10[19] = {1LL, 10LL, 100LL, 1000LL, 10000LL, 100000LL, 1000000LL, 10000000LL,
                                    100000000LL, 1000000000LL, 10000000000LL, 100000000000LL,
                                    1000000000000LL, 10000000000000LL, 100000000000000LL,
                                    1000000000000000LL, 10000000000000000LL, 100000000000000000LL,
                                    1000000000000000000LL};
    if (len < 8) return 0;
    int ndigits = be16(p), weight = (int16_t)be16(p + 2), sign = be16(p + 4);
    if ((sign != 0x0000 && sign != 0x4000) || len != 8 + 2 * ndigits) return 0;
    int64_t v = 0;
    for (int k = 0; k < ndigits; k++) {
        int64_t d = be16(p + 8 + 2 * k);
        if (d > 9999) return 0;
        int e = 4 * (weight - k) + scale;
        if (e >= 0) {
            if (e > 18 || (d && d > (P10[18] - v) / P10[e])) return 0; /* beyond 18 digits */
            v += d * P10[e];
        } else {
            if (e < -4 || d % P10[-e]) return 0; /* more decimals than the scale */
            v += d / P10[-e];
        }
    }
    if (v >= P10[18]) return 0;
    if (sign == 0x4000) v = -v;
    int64_t hi = v < 0 ? -1 : 0;
    memcpy(out, &v, 8);
    memcpy(out + 8, &hi, 8);
    return 1;
}

/* Pass 2: fill the buffers. */
static int fill(const uint8_t *buf, int ncols, const char *kinds, const uint8_t *scales, uint8_t **values,
                int64_t **offsets, uint8_t **validity) {
    Py_ssize_t off = HEADER, r = 0;
    int64_t used[MAX_FIELDS];
    memset(used, 0, sizeof(int64_t) * (size_t)ncols);
    for (;;) {
        uint16_t cnt = be16(buf + off);
        off += 2;
        if (cnt == 0xFFFF) return 1;
        for (int c = 0; c < ncols; c++) {
            int32_t len = (int32_t)be32(buf + off);
            const uint8_t *p = buf + off + 4;
            off += 4 + (len > 0 ? len : 0);
            char kind = kinds[c];
            if (validity[c]) validity[c][r] = len != -1;
            if (kind == 'T') {
                if (len > 0) {
                    memcpy(values[c] + used[c], p, (size_t)len);
                    used[c] += len;
                }
                offsets[c][r + 1] = used[c];
                continue;
            }
            int w = width_of(kind);
            uint8_t *out = values[c] + (Py_ssize_t)w * r;
            if (len == -1) {
                memset(out, 0, (size_t)w);
                continue;
            }
            if (kind == 'n') {
                if (!numeric(p, len, scales[c], out)) return 0;
                continue;
            }
            if (len != w) return 0;
            switch (kind) {
            case 'h': { int16_t v = (int16_t)be16(p); memcpy(out, &v, 2); break; }
            case 'i': case 'o': case 'f': { uint32_t v = be32(p); memcpy(out, &v, 4); break; }
            case 'l': case 'd': { uint64_t v = be64(p); memcpy(out, &v, 8); break; }
            case 'b': out[0] = p[0] != 0; break;
            case 'D': {
                int32_t d = (int32_t)be32(p);
                if (d < FIRST_DAY || d > LAST_DAY) return 0;
                d += (int32_t)PG_EPOCH_DAYS;
                memcpy(out, &d, 4);
                break;
            }
            case 't': {
                int64_t us = (int64_t)be64(p);
                if (us < FIRST_DAY * DAY_US || us >= (LAST_DAY + 1) * DAY_US) return 0;
                us += PG_EPOCH_DAYS * DAY_US;
                memcpy(out, &us, 8);
                break;
            }
            default: return 0;
            }
        }
        r++;
    }
}

static PyObject *decode(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer in, kinds_in, scales_in;
    PyObject *source;
    /* bytes only: the second pass trusts the first one's checks, so the buffer must not change */
    if (!PyArg_ParseTuple(args, "O!y*y*", &PyBytes_Type, &source, &kinds_in, &scales_in)) return NULL;
    if (PyObject_GetBuffer(source, &in, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&kinds_in);
        PyBuffer_Release(&scales_in);
        return NULL;
    }
    PyObject *result = NULL, *columns = NULL;
    PyObject **vals = NULL, **offs = NULL, **valid = NULL;
    uint8_t **vp = NULL, **validp = NULL;
    int64_t **op = NULL, *text_bytes = NULL;
    char *nulls = NULL;
    const uint8_t *buf = in.buf;
    const char *kinds = kinds_in.buf;
    Py_ssize_t n = in.len, rows = 0;
    int ncols = (int)kinds_in.len, ok;
    if (ncols < 1 || ncols > MAX_FIELDS || scales_in.len != ncols) {
        PyErr_SetString(PyExc_ValueError, "kinds and scales must name 1 to 1664 fields alike");
        goto done;
    }
    if (n < HEADER + 2 ||
        memcmp(buf, SIGNATURE, 11) != 0 || be32(buf + 11) != 0 || be32(buf + 15) != 0) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    for (int c = 0; c < ncols; c++) {
        if (kinds[c] != 'T' && !width_of(kinds[c])) {
            PyErr_Format(PyExc_ValueError, "unknown field kind %c", kinds[c]);
            goto done;
        }
    }
    text_bytes = PyMem_Calloc((size_t)ncols, sizeof(int64_t));
    nulls = PyMem_Calloc((size_t)ncols, 1);
    vals = PyMem_Calloc((size_t)ncols, sizeof(PyObject *));
    offs = PyMem_Calloc((size_t)ncols, sizeof(PyObject *));
    valid = PyMem_Calloc((size_t)ncols, sizeof(PyObject *));
    vp = PyMem_Calloc((size_t)ncols, sizeof(uint8_t *));
    validp = PyMem_Calloc((size_t)ncols, sizeof(uint8_t *));
    op = PyMem_Calloc((size_t)ncols, sizeof(int64_t *));
    if (!text_bytes || !nulls || !vals || !offs || !valid || !vp || !validp || !op) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = count(buf, n, ncols, &rows, text_bytes, nulls);
    Py_END_ALLOW_THREADS
    if (!ok) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    for (int c = 0; c < ncols; c++) {
        Py_ssize_t size = kinds[c] == 'T' ? (Py_ssize_t)text_bytes[c] : width_of(kinds[c]) * rows;
        if (!(vals[c] = PyBytes_FromStringAndSize(NULL, size))) goto done;
        vp[c] = (uint8_t *)PyBytes_AS_STRING(vals[c]);
        if (kinds[c] == 'T') {
            if (!(offs[c] = PyBytes_FromStringAndSize(NULL, (rows + 1) * (Py_ssize_t)sizeof(int64_t)))) goto done;
            op[c] = (int64_t *)PyBytes_AS_STRING(offs[c]);
            op[c][0] = 0;
        }
        if (nulls[c]) {
            if (!(valid[c] = PyBytes_FromStringAndSize(NULL, rows))) goto done;
            validp[c] = (uint8_t *)PyBytes_AS_STRING(valid[c]);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    ok = fill(buf, ncols, kinds, scales_in.buf, vp, op, validp);
    Py_END_ALLOW_THREADS
    if (!ok) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (!(columns = PyList_New(ncols))) goto done;
    for (int c = 0; c < ncols; c++) {
        PyObject *v = valid[c] ? valid[c] : Py_None;
        PyObject *item = kinds[c] == 'T' ? PyTuple_Pack(3, offs[c], vals[c], v) : PyTuple_Pack(2, vals[c], v);
        if (!item) goto done;
        PyList_SET_ITEM(columns, c, item);
    }
    result = Py_BuildValue("(nO)", rows, columns);
done:
    Py_XDECREF(columns);
    for (int c = 0; vals && c < ncols; c++) {
        Py_XDECREF(vals[c]);
        Py_XDECREF(offs[c]);
        Py_XDECREF(valid[c]);
    }
    PyMem_Free(text_bytes);
    PyMem_Free(nulls);
    PyMem_Free(vals);
    PyMem_Free(offs);
    PyMem_Free(valid);
    PyMem_Free(vp);
    PyMem_Free(validp);
    PyMem_Free(op);
    PyBuffer_Release(&in);
    PyBuffer_Release(&kinds_in);
    PyBuffer_Release(&scales_in);
    return result;
}

static PyMethodDef METHODS[] = {
    {"decode", decode, METH_VARARGS, "Decode a binary COPY output into column buffers (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_copybin", NULL, -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__copybin(void) { return PyModule_Create(&MODULE); }
