/* The field lines of a simple HTTP/1.1 head, scanned in C (tether.core.http.h1.parse_fields).
 *
 * The same function as h1.parse_fields, byte for byte: that one is the reference (and what runs
 * where this is not built); tests/unit/test_h1scan.py compares the two on generated heads. Only a
 * subset of what llhttp accepts is taken here (see h1.py): anything else returns -1 and the head
 * goes to llhttp. Compiled by mypyc, the Python loop costs ~14 instructions a byte and a call per
 * field name; here a byte costs two or three.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define NAME_MAX_LEN 20 /* h1._NAME_MAX: the longest spelling in the table of common names */

static unsigned char tchar[256];
static unsigned char field_value[256];
/* h1._FIELD_NAMES: by length, a list of (spelling, lower-case name) tuples. */
static PyObject *names_by_length = NULL;

static void
fill(unsigned char *table, const char *allowed)
{
    for (const unsigned char *p = (const unsigned char *)allowed; *p; p++)
        table[*p] = 1;
}

static void
init_tables(void)
{
    /* RFC 9110 5.6.2: tchar. */
    fill(tchar, "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz");
    /* A field value as llhttp reads it: HTAB, SP, visible ASCII, obs-text. */
    field_value['\t'] = 1;
    for (int c = 0x20; c < 0x7F; c++)
        field_value[c] = 1;
    for (int c = 0x80; c < 0x100; c++)
        field_value[c] = 1;
}

static PyObject *
h1scan_bind(PyObject *self, PyObject *table)
{
    if (!PyList_Check(table) || PyList_GET_SIZE(table) != NAME_MAX_LEN + 1) {
        PyErr_SetString(PyExc_TypeError, "bind(names): a list of 21 lists of (spelling, name) tuples");
        return NULL;
    }
    for (Py_ssize_t n = 0; n <= NAME_MAX_LEN; n++) {
        PyObject *row = PyList_GET_ITEM(table, n);
        if (!PyList_Check(row)) {
            PyErr_SetString(PyExc_TypeError, "bind(names): each length's entry is a list");
            return NULL;
        }
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(row); k++) {
            PyObject *pair = PyList_GET_ITEM(row, k);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
                || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1)) || PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0)) != n) {
                PyErr_SetString(PyExc_TypeError, "bind(names): (spelling, name) bytes, by the spelling's length");
                return NULL;
            }
        }
    }
    Py_INCREF(table);
    Py_XSETREF(names_by_length, table);
    Py_RETURN_NONE;
}

/* h1.field_name: the common name's shared object, or a new lower-case copy. */
static PyObject *
field_name(const char *raw, Py_ssize_t n)
{
    PyObject *out;
    char *p;

    if (n <= NAME_MAX_LEN) {
        PyObject *row = PyList_GET_ITEM(names_by_length, n);
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(row); k++) {
            PyObject *pair = PyList_GET_ITEM(row, k);
            if (memcmp(PyBytes_AS_STRING(PyTuple_GET_ITEM(pair, 0)), raw, (size_t)n) == 0) {
                out = PyTuple_GET_ITEM(pair, 1);
                Py_INCREF(out);
                return out;
            }
        }
    }
    out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    p = PyBytes_AS_STRING(out);
    for (Py_ssize_t k = 0; k < n; k++) {
        unsigned char c = (unsigned char)raw[k];
        p[k] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c); /* bytes.lower(): ASCII only */
    }
    return out;
}

/* h1._refusable: could this lower-case name be one of the fields llhttp acts on? */
static int
refusable(PyObject *name)
{
    Py_ssize_t n = PyBytes_GET_SIZE(name);
    char c = PyBytes_AS_STRING(name)[0];
    return (c == 'c' && (n == 10 || n == 14)) || (c == 'p' && n == 16) || (c == 't' && n == 17)
           || (c == 'u' && n == 7);
}

/* parse_fields(data, start, out, refused) -> int: see h1.parse_fields. */
static PyObject *
h1scan_parse_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *data, *out, *refused;
    const unsigned char *d;
    Py_ssize_t n, i;

    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "parse_fields(data, start, out, refused) takes 4 arguments");
        return NULL;
    }
    data = args[0];
    out = args[2];
    refused = args[3];
    if (!PyBytes_Check(data) || !PyList_Check(out) || !PyAnySet_Check(refused)) {
        PyErr_SetString(PyExc_TypeError, "parse_fields(bytes, int, list, frozenset)");
        return NULL;
    }
    if (names_by_length == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "tether.core.http._h1scan: bind() was not called");
        return NULL;
    }
    i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "parse_fields: a negative start");
        return NULL;
    }
    d = (const unsigned char *)PyBytes_AS_STRING(data);
    n = PyBytes_GET_SIZE(data);
    while (i + 1 < n) {
        Py_ssize_t j = i, v;
        PyObject *name, *value, *pair;
        int found;

        if (d[i] == '\r')
            return PyLong_FromSsize_t(d[i + 1] == '\n' ? i + 2 : -1);
        while (j < n && tchar[d[j]])
            j++;
        if (j == i || j >= n || d[j] != ':')
            return PyLong_FromLong(-1);
        name = field_name((const char *)d + i, j - i);
        if (name == NULL)
            return NULL;
        if (refusable(name)) {
            found = PySet_Contains(refused, name);
            if (found != 0) {
                Py_DECREF(name);
                return found < 0 ? NULL : PyLong_FromLong(-1);
            }
        }
        j++;
        while (j < n && (d[j] == ' ' || d[j] == '\t'))
            j++;
        v = j;
        while (j < n && field_value[d[j]])
            j++;
        if (j + 1 >= n || d[j] != '\r' || d[j + 1] != '\n') {
            Py_DECREF(name);
            return PyLong_FromLong(-1);
        }
        value = PyBytes_FromStringAndSize((const char *)d + v, j - v);
        if (value == NULL) {
            Py_DECREF(name);
            return NULL;
        }
        pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(name);
            Py_DECREF(value);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, 0, name);
        PyTuple_SET_ITEM(pair, 1, value);
        if (PyList_Append(out, pair) < 0) {
            Py_DECREF(pair);
            return NULL;
        }
        Py_DECREF(pair);
        i = j + 2;
    }
    return PyLong_FromLong(-1);
}

static PyMethodDef methods[] = {
    {"bind", h1scan_bind, METH_O, "Bind h1._FIELD_NAMES, the common names by length."},
    {"parse_fields", (PyCFunction)(void (*)(void))h1scan_parse_fields, METH_FASTCALL,
     "h1.parse_fields, in C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tether.core.http._h1scan", "HTTP/1.1 field lines scanned in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__h1scan(void)
{
    init_tables();
    return PyModule_Create(&module);
}
