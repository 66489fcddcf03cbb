/* Record I/O of the mesh TLS transport straight on OpenSSL's SSL (tether.proxy.tlstransport).
 *
 * The ssl module's SSLSocket.read and .write cost ~2.5k instructions per call around OpenSSL's own
 * work (argument parsing, releasing and taking back the GIL, the socket timeout checks, a 16 KiB
 * bytes allocated and shrunk for every record), and asking SSL_has_pending through ctypes another
 * ~1.6k. The transport reads every record a readable event offers and writes whole messages on a
 * non-blocking socket, so none of that is needed: these functions call SSL_read_ex, SSL_write_ex
 * and SSL_has_pending on the SSL the SSLSocket built, keeping the GIL (the socket never blocks).
 *
 * No OpenSSL header and no link to libssl: tlsctl passes the addresses of the functions of the
 * libssl the ssl module is linked with (bind), so the SSL objects and these calls always belong to
 * one library. Until bind is called every function raises.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>

#define RECORD 16384 /* TLS's largest plaintext record: the most one SSL_read_ex returns */
#define MAX_CHUNKS 64

/* SSL_get_error's answers (ssl.h) and the parts of an OpenSSL 3 error code (err.h). */
#define E_NONE 0
#define E_SSL 1
#define E_WANT_READ 2
#define E_WANT_WRITE 3
#define E_SYSCALL 5
#define E_ZERO_RETURN 6
#define ERR_SYSTEM_FLAG 0x80000000UL
#define ERR_LIB(e) (((e) >> 23) & 0xFFUL)
#define ERR_REASON(e) ((e) & 0x7FFFFFUL)
#define LIB_SSL 20UL
#define R_UNEXPECTED_EOF 294UL /* SSL_R_UNEXPECTED_EOF_WHILE_READING: a peer closed without close_notify */

/* What read returns besides plain bytes: (data or None, one of these, detail). */
#define ST_MORE 1       /* the per-event bound was reached: OpenSSL may hold more */
#define ST_WANT_WRITE 2 /* OpenSSL must send before it can read on */
#define ST_EOF 3        /* close_notify, or the peer closed its socket */
#define ST_ERROR 4      /* detail: (errno, message) */

typedef int (*io_fn)(void *, void *, size_t, size_t *);
typedef int (*ssl_int_fn)(const void *, int);
typedef int (*ssl_fn)(const void *);
typedef unsigned long (*err_get_fn)(void);
typedef void (*err_clear_fn)(void);
typedef void (*err_string_fn)(unsigned long, char *, size_t);

static io_fn p_read_ex, p_write_ex;
static ssl_int_fn p_get_error;
static ssl_fn p_has_pending;
static err_get_fn p_err_get;
static err_clear_fn p_err_clear;
static err_string_fn p_err_string;

static char buffer[RECORD];

static int
bound(void)
{
    if (p_read_ex == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "tether.proxy._tlsio: bind() was not called");
        return 0;
    }
    return 1;
}

/* A non-null pointer from a Python int (`what` names it in the error). */
static void *
pointer_of(PyObject *arg, const char *what)
{
    void *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && !PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "a null %s", what);
    return p;
}

static PyObject *
tlsio_bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *p[7];
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "bind(read_ex, write_ex, get_error, has_pending, err_get_error, err_clear_error, "
                        "err_error_string_n) takes 7 addresses");
        return NULL;
    }
    for (int i = 0; i < 7; i++) {
        if ((p[i] = pointer_of(args[i], "function address")) == NULL)
            return NULL;
    }
    p_read_ex = (io_fn)p[0];
    p_write_ex = (io_fn)p[1];
    p_get_error = (ssl_int_fn)p[2];
    p_has_pending = (ssl_fn)p[3];
    p_err_get = (err_get_fn)p[4];
    p_err_clear = (err_clear_fn)p[5];
    p_err_string = (err_string_fn)p[6];
    Py_RETURN_NONE;
}

/* The failure of a read or write after SSL_get_error said `kind`: a status and its detail for read
 * (ST_*), with `sys_errno` the errno right after the call. Empties OpenSSL's error queue. */
static int
failure(void *ssl, int kind, int sys_errno, PyObject **detail)
{
    char text[256];
    unsigned long e;

    *detail = NULL;
    switch (kind) {
    case E_WANT_READ:
        return 0;
    case E_WANT_WRITE:
        return ST_WANT_WRITE;
    case E_ZERO_RETURN:
        return ST_EOF;
    case E_SYSCALL:
        e = p_err_get();
        if (e == 0) {
            p_err_clear();
            if (sys_errno == 0)
                return ST_EOF; /* the peer closed its socket without close_notify */
            *detail = Py_BuildValue("(is)", sys_errno, strerror(sys_errno));
            return *detail == NULL ? -1 : ST_ERROR;
        }
        break;
    default:
        e = p_err_get();
        break;
    }
    if (e != 0 && !(e & ERR_SYSTEM_FLAG) && ERR_LIB(e) == LIB_SSL && ERR_REASON(e) == R_UNEXPECTED_EOF) {
        p_err_clear();
        return ST_EOF;
    }
    if (e != 0)
        p_err_string(e, text, sizeof(text));
    else
        snprintf(text, sizeof(text), "TLS failure (SSL_get_error %d)", kind);
    p_err_clear();
    *detail = Py_BuildValue("(is)", 0, text);
    return *detail == NULL ? -1 : ST_ERROR;
}

/* read(ssl, limit) -> bytes | (bytes | None, status, detail)
 *
 * Reads records until the socket has nothing more (a short record with nothing held, or OpenSSL
 * wants to read), or `limit` bytes. Plain bytes (b"" when nothing came) when it stopped for the
 * socket; otherwise a tuple with what was read before the stop and why it stopped. */
static PyObject *
tlsio_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *chunks[MAX_CHUNKS];
    PyObject *data = NULL, *detail = NULL, *out;
    Py_ssize_t count = 0, total = 0, limit;
    int status = 0;
    void *ssl;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "read(ssl, limit) takes 2 arguments");
        return NULL;
    }
    if (!bound() || (ssl = pointer_of(args[0], "SSL pointer")) == NULL)
        return NULL;
    limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    /* OpenSSL's error queue is left empty by every failure handled here (and by the ssl module's):
     * as in the ssl module, it is not cleared before each call (~400 instructions). */
    for (;;) {
        size_t n = 0;
        int ok;

        if (total >= limit || count == MAX_CHUNKS) {
            status = ST_MORE;
            break;
        }
        errno = 0;
        ok = p_read_ex(ssl, buffer, RECORD, &n);
        if (ok != 1) {
            int sys_errno = errno;
            status = failure(ssl, p_get_error(ssl, 0), sys_errno, &detail);
            if (status < 0)
                goto fail;
            break;
        }
        chunks[count] = PyBytes_FromStringAndSize(buffer, (Py_ssize_t)n);
        if (chunks[count] == NULL)
            goto fail;
        count++;
        total += (Py_ssize_t)n;
        /* A short record usually ends what the peer sent; OpenSSL may still hold further records it
         * read ahead, which the socket will not signal again. */
        if (n < RECORD && !p_has_pending(ssl))
            break;
    }
    if (count == 1) {
        data = chunks[0];
        count = 0;
    } else if (count > 1) {
        char *at;
        data = PyBytes_FromStringAndSize(NULL, total);
        if (data == NULL)
            goto fail;
        at = PyBytes_AS_STRING(data);
        for (Py_ssize_t i = 0; i < count; i++) {
            Py_ssize_t len = PyBytes_GET_SIZE(chunks[i]);
            memcpy(at, PyBytes_AS_STRING(chunks[i]), (size_t)len);
            at += len;
            Py_DECREF(chunks[i]);
        }
        count = 0;
    }
    if (status == 0) {
        if (data == NULL)
            return PyBytes_FromStringAndSize(NULL, 0);
        return data;
    }
    out = PyTuple_New(3);
    if (out == NULL)
        goto fail;
    if (data == NULL) {
        data = Py_None;
        Py_INCREF(data);
    }
    if (detail == NULL) {
        detail = Py_None;
        Py_INCREF(detail);
    }
    PyTuple_SET_ITEM(out, 0, data);
    PyTuple_SET_ITEM(out, 1, PyLong_FromLong(status));
    PyTuple_SET_ITEM(out, 2, detail);
    if (PyTuple_GET_ITEM(out, 1) == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
fail:
    for (Py_ssize_t i = 0; i < count; i++)
        Py_DECREF(chunks[i]);
    Py_XDECREF(data);
    Py_XDECREF(detail);
    return NULL;
}

/* write(ssl, data) -> int | (errno, message)
 *
 * Writes all of `data` (the ssl module's SSLs do not accept partial writes): len(data), or 0 when
 * OpenSSL must wait for the socket (retry later with the same bytes), or the error. */
static PyObject *
tlsio_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    PyObject *detail = NULL;
    size_t n = 0;
    void *ssl;
    int ok, sys_errno, status;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write(ssl, data) takes 2 arguments");
        return NULL;
    }
    if (!bound() || (ssl = pointer_of(args[0], "SSL pointer")) == NULL)
        return NULL;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len == 0) {
        PyBuffer_Release(&view);
        return PyLong_FromLong(0);
    }
    errno = 0;
    ok = p_write_ex(ssl, view.buf, (size_t)view.len, &n);
    sys_errno = errno;
    PyBuffer_Release(&view);
    if (ok == 1)
        return PyLong_FromSize_t(n);
    status = failure(ssl, p_get_error(ssl, 0), sys_errno, &detail);
    if (status < 0)
        return NULL;
    if (status == 0 || status == ST_WANT_WRITE)
        return PyLong_FromLong(0); /* wants the socket (or the peer's data first): retry */
    if (detail == NULL) /* end of stream while writing: the peer is gone */
        return Py_BuildValue("(is)", EPIPE, strerror(EPIPE));
    return detail;
}

/* has_pending(ssl) -> bool: whether OpenSSL holds bytes (a record, or part of one) it read ahead. */
static PyObject *
tlsio_has_pending(PyObject *self, PyObject *arg)
{
    void *ssl;
    if (!bound() || (ssl = pointer_of(arg, "SSL pointer")) == NULL)
        return NULL;
    return PyBool_FromLong(p_has_pending(ssl));
}

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)(void (*)(void))tlsio_bind, METH_FASTCALL, "Bind libssl's functions by address."},
    {"read", (PyCFunction)(void (*)(void))tlsio_read, METH_FASTCALL, "Read what the socket offers."},
    {"write", (PyCFunction)(void (*)(void))tlsio_write, METH_FASTCALL, "Write one message whole."},
    {"has_pending", tlsio_has_pending, METH_O, "SSL_has_pending."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tether.proxy._tlsio", "Record I/O on OpenSSL's SSL for the mesh TLS transport.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tlsio(void)
{
    return PyModule_Create(&module);
}
