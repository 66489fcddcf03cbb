/* Two savings in a full mesh TLS handshake with OpenSSL 3.0 (tether.proxy.tlsctl).
 *
 * 1. The legacy EC key method, offered to OpenSSL through an engine (ec_pkey_meths). OpenSSL 3.0
 *    decodes every received certificate's public key through its provider decoders, which look the
 *    decoders up anew for each key (~2.4M instructions a certificate, four per handshake for the
 *    pair; callgrind). It decodes with the built-in EC_KEY code instead when an engine is
 *    registered for the key type, and then also signs and verifies with that code (the same
 *    arithmetic, without the per-operation provider lookups). The engine hands OpenSSL its own
 *    built-in method (EVP_PKEY_meth_find): nothing here implements cryptography.
 *
 * 2. A cache of verified peer chains (ChainCache, its callback installed with
 *    SSL_CTX_set_cert_verify_callback). Proxies meet the same peers again and again; each full
 *    handshake verified the peer's chain (two ECDSA signatures up to the anchor, ~1.9M instructions
 *    a side). The cache remembers, per SSL_CTX, the exact DER of chains X509_verify_cert accepted
 *    together with everything the verdict depended on, and answers a later identical chain without
 *    the signatures:
 *      - the chain bytes, compared whole (no digest);
 *      - the SSL_CTX's trust store, by construction: one cache belongs to one context, whose store
 *        can only gain anchors (tether makes a new context, with an empty cache, on any change);
 *      - the side (client or server: the purpose checked), the verification flags, depth and
 *        security level, all compared equal; flags for revocation, policies, a fixed check time or
 *        no time check, proxy certificates or ignored critical extensions are never cached;
 *      - the validity of every certificate of the verified chain, anchor included: kept as the
 *        latest notBefore and the earliest notAfter and checked against the clock on each use;
 *      - the name: a cached chain is used only if the leaf matches a host name the verification
 *        asks for now (X509_check_host with the same flags); a request for an e-mail address or an
 *        IP address always goes through the full verification.
 *    Anything else, or any doubt, runs X509_verify_cert as OpenSSL would have.
 *
 * No OpenSSL header and no link to libcrypto: tlsctl passes the functions' addresses (bind) from the
 * libraries the ssl module is linked with. Until bind is called nothing can be installed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NID_EC_PUBLIC_KEY 408 /* NID_X9_62_id_ecPublicKey */
#define X509_V_OK 0

/* X509_V_FLAG_*: a verification asking for any of these is never answered from the cache. */
#define UNCACHEABLE_FLAGS                                                                          \
    (0x2UL        /* USE_CHECK_TIME */                                                             \
     | 0x4UL      /* CRL_CHECK */                                                                  \
     | 0x8UL      /* CRL_CHECK_ALL */                                                              \
     | 0x10UL     /* IGNORE_CRITICAL */                                                            \
     | 0x40UL     /* ALLOW_PROXY_CERTS */                                                          \
     | 0x80UL     /* POLICY_CHECK */                                                               \
     | 0x100UL    /* EXPLICIT_POLICY */                                                            \
     | 0x200UL    /* INHIBIT_ANY */                                                                \
     | 0x400UL    /* INHIBIT_MAP */                                                                \
     | 0x800UL    /* NOTIFY_POLICY */                                                              \
     | 0x1000UL   /* EXTENDED_CRL_SUPPORT */                                                       \
     | 0x2000UL   /* USE_DELTAS */                                                                 \
     | 0x200000UL /* NO_CHECK_TIME */)

typedef void *(*ptr_of_ptr)(void *);
typedef int (*int_of_ptr)(void *);

/* The functions this module calls, in bind()'s order (tlsctl._VERIFY_FUNCTIONS names them). */
static struct {
    void *(*meth_find)(int);                           /* EVP_PKEY_meth_find */
    int_of_ptr verify_cert;                            /* X509_verify_cert */
    ptr_of_ptr get0_cert;                              /* X509_STORE_CTX_get0_cert */
    ptr_of_ptr get0_untrusted;                         /* X509_STORE_CTX_get0_untrusted */
    ptr_of_ptr get0_chain;                             /* X509_STORE_CTX_get0_chain */
    ptr_of_ptr get0_param;                             /* X509_STORE_CTX_get0_param */
    int_of_ptr get_error;                              /* X509_STORE_CTX_get_error */
    void (*set_error)(void *, int);                    /* X509_STORE_CTX_set_error */
    void *(*get_ex_data)(void *, int);                 /* X509_STORE_CTX_get_ex_data */
    int (*sk_num)(const void *);                       /* OPENSSL_sk_num */
    void *(*sk_value)(const void *, int);              /* OPENSSL_sk_value */
    int (*i2d)(void *, unsigned char **);              /* i2d_X509 */
    ptr_of_ptr not_before;                             /* X509_get0_notBefore */
    ptr_of_ptr not_after;                              /* X509_get0_notAfter */
    int (*time_to_tm)(void *, struct tm *);            /* ASN1_TIME_to_tm */
    unsigned long (*param_flags)(void *);              /* X509_VERIFY_PARAM_get_flags */
    int_of_ptr param_depth;                            /* X509_VERIFY_PARAM_get_depth */
    int_of_ptr param_auth_level;                       /* X509_VERIFY_PARAM_get_auth_level */
    unsigned int (*param_hostflags)(void *);           /* X509_VERIFY_PARAM_get_hostflags */
    char *(*param_host)(void *, int);                  /* X509_VERIFY_PARAM_get0_host */
    ptr_of_ptr param_email;                            /* X509_VERIFY_PARAM_get0_email */
    ptr_of_ptr param_ip;                               /* X509_VERIFY_PARAM_get1_ip_asc */
    void (*crypto_free)(void *, const char *, int);    /* CRYPTO_free */
    int (*check_host)(void *, const char *, size_t, unsigned int, char **); /* X509_check_host */
    int (*ssl_ex_index)(void);                         /* SSL_get_ex_data_X509_STORE_CTX_idx */
    int_of_ptr ssl_is_server;                          /* SSL_is_server */
    int (*err_set_mark)(void);                         /* ERR_set_mark */
    int (*err_pop_to_mark)(void);                      /* ERR_pop_to_mark */
} fn;
#define N_FUNCTIONS (sizeof(fn) / sizeof(void *))

static void *ec_method; /* OpenSSL's built-in EC EVP_PKEY_METHOD, once bound */
static const int ec_nids[] = {NID_EC_PUBLIC_KEY};

static int
bound(void)
{
    if (fn.verify_cert == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "tether.proxy._tlsverify: bind() was not called");
        return 0;
    }
    return 1;
}

static PyObject *
tlsverify_bind(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *p[N_FUNCTIONS];
    if ((size_t)nargs != N_FUNCTIONS) {
        PyErr_Format(PyExc_TypeError, "bind() takes %d function addresses", (int)N_FUNCTIONS);
        return NULL;
    }
    for (size_t i = 0; i < N_FUNCTIONS; i++) {
        p[i] = PyLong_AsVoidPtr(args[i]);
        if (p[i] == NULL && i == 0 && !PyErr_Occurred())
            continue; /* EVP_PKEY_meth_find is absent from OpenSSL builds without deprecated APIs */
        if (p[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "function address %d is null", (int)i);
            return NULL;
        }
    }
    memcpy(&fn, p, sizeof(fn));
    ec_method = fn.meth_find == NULL ? NULL : fn.meth_find(NID_EC_PUBLIC_KEY);
    Py_RETURN_NONE;
}

/* ENGINE_PKEY_METHS_PTR: the key types offered (with `method` NULL), or the method for `nid`. */
static int
ec_pkey_meths(void *engine, void **method, const int **nids, int nid)
{
    (void)engine;
    if (method == NULL) {
        *nids = ec_nids;
        return 1;
    }
    if (nid == NID_EC_PUBLIC_KEY && ec_method != NULL) {
        *method = ec_method;
        return 1;
    }
    *method = NULL;
    return 0;
}

/* ec_engine_callback() -> the address of ec_pkey_meths, for ENGINE_set_pkey_meths; 0 when OpenSSL has
 * no built-in EC method to offer. */
static PyObject *
tlsverify_ec_engine_callback(PyObject *self, PyObject *unused)
{
    if (!bound())
        return NULL;
    if (ec_method == NULL)
        return PyLong_FromLong(0);
    return PyLong_FromVoidPtr((void *)ec_pkey_meths);
}

/* -- the verified-chain cache ------------------------------------------------------------------ */

typedef struct {
    unsigned char *der; /* the peer's chain as sent: each certificate's DER, one after the other */
    size_t len;
    time_t not_before, not_after; /* the verified chain's common validity */
    unsigned long flags;
    int depth, auth_level, server;
    unsigned long long used; /* for replacement: the least recently used goes first */
} entry;

typedef struct {
    pthread_mutex_t lock;
    entry *entries;
    int capacity, count;
    unsigned long long clock;
    unsigned long long hits, misses, stored;
} chain_cache;

typedef struct {
    PyObject_HEAD chain_cache cache;
} ChainCacheObject;

/* The peer's chain as one buffer (malloc'd), or NULL. */
static unsigned char *
chain_der(void *chain, size_t *len)
{
    int n = fn.sk_num(chain);
    size_t total = 0;
    unsigned char *buf, *at;

    if (n <= 0 || n > 10)
        return NULL;
    for (int i = 0; i < n; i++) {
        int l = fn.i2d(fn.sk_value(chain, i), NULL);
        if (l <= 0)
            return NULL;
        total += (size_t)l;
    }
    buf = malloc(total);
    if (buf == NULL)
        return NULL;
    at = buf;
    for (int i = 0; i < n; i++) {
        unsigned char *p = at;
        int l = fn.i2d(fn.sk_value(chain, i), &p);
        if (l <= 0 || (size_t)(at - buf) + (size_t)l > total) {
            free(buf);
            return NULL;
        }
        at += l;
    }
    *len = (size_t)(at - buf);
    return buf;
}

static int
asn1_seconds(void *asn1_time, time_t *out)
{
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    if (asn1_time == NULL || fn.time_to_tm(asn1_time, &tm) != 1)
        return 0;
    *out = timegm(&tm);
    return 1;
}

/* The latest notBefore and earliest notAfter over the verified chain (anchor included). */
static int
chain_validity(void *verified, time_t *not_before, time_t *not_after)
{
    int n = verified == NULL ? 0 : fn.sk_num(verified);
    if (n <= 0)
        return 0;
    for (int i = 0; i < n; i++) {
        void *cert = fn.sk_value(verified, i);
        time_t nb, na;
        if (!asn1_seconds(fn.not_before(cert), &nb) || !asn1_seconds(fn.not_after(cert), &na))
            return 0;
        if (i == 0 || nb > *not_before)
            *not_before = nb;
        if (i == 0 || na < *not_after)
            *not_after = na;
    }
    return 1;
}

/* 1 if the leaf answers the host names the verification asks for (or none is asked for), 0 if not
 * or if it asks for something else (an e-mail address, an IP address). */
static int
names_match(void *param, void *leaf)
{
    char *ip;
    const char *host;
    unsigned int hostflags;

    if (fn.param_email(param) != NULL)
        return 0;
    fn.err_set_mark(); /* with no IP address asked for, OpenSSL queues an error ("passed a null parameter") */
    ip = fn.param_ip(param);
    fn.err_pop_to_mark();
    if (ip != NULL) {
        fn.crypto_free(ip, __FILE__, __LINE__);
        return 0;
    }
    host = fn.param_host(param, 0);
    if (host == NULL)
        return 1;
    hostflags = fn.param_hostflags(param);
    for (int i = 0; (host = fn.param_host(param, i)) != NULL; i++) {
        if (fn.check_host(leaf, host, strlen(host), hostflags, NULL) == 1)
            return 1;
    }
    return 0;
}

/* SSL_CTX_set_cert_verify_callback's callback; `arg` is the context's chain_cache. */
static int
verify_callback(void *sctx, void *arg)
{
    chain_cache *cache = arg;
    void *param = fn.get0_param(sctx), *peer = fn.get0_untrusted(sctx), *leaf = fn.get0_cert(sctx);
    void *ssl = fn.get_ex_data(sctx, fn.ssl_ex_index());
    unsigned char *der = NULL;
    size_t len = 0;
    unsigned long flags;
    int depth, auth_level, server, ok, hit;
    time_t now;

    if (param == NULL || peer == NULL || leaf == NULL || ssl == NULL || fn.sk_value(peer, 0) != leaf)
        return fn.verify_cert(sctx);
    flags = fn.param_flags(param);
    if (flags & UNCACHEABLE_FLAGS)
        return fn.verify_cert(sctx);
    depth = fn.param_depth(param);
    auth_level = fn.param_auth_level(param);
    server = fn.ssl_is_server(ssl);
    der = chain_der(peer, &len);
    if (der == NULL)
        return fn.verify_cert(sctx);
    now = time(NULL);

    hit = 0;
    pthread_mutex_lock(&cache->lock);
    for (int i = 0; i < cache->count; i++) {
        entry *e = &cache->entries[i];
        if (e->len != len || e->flags != flags || e->depth != depth || e->auth_level != auth_level ||
            e->server != server || memcmp(e->der, der, len) != 0)
            continue;
        /* Out of its validity (expired, or not yet valid): the full verification says why. */
        if (now >= e->not_before && now < e->not_after) {
            e->used = ++cache->clock;
            hit = 1;
        }
        break;
    }
    pthread_mutex_unlock(&cache->lock);
    if (hit && names_match(param, leaf)) {
        free(der);
        __atomic_add_fetch(&cache->hits, 1, __ATOMIC_RELAXED);
        fn.set_error(sctx, X509_V_OK);
        return 1;
    }
    __atomic_add_fetch(&cache->misses, 1, __ATOMIC_RELAXED);
    ok = fn.verify_cert(sctx);
    if (ok == 1 && fn.get_error(sctx) == X509_V_OK && names_match(param, leaf)) {
        time_t nb, na;
        if (chain_validity(fn.get0_chain(sctx), &nb, &na) && cache->capacity > 0) {
            entry *slot = NULL;
            pthread_mutex_lock(&cache->lock);
            for (int i = 0; i < cache->count; i++) {
                entry *e = &cache->entries[i];
                if (e->len == len && memcmp(e->der, der, len) == 0 && e->flags == flags && e->depth == depth &&
                    e->auth_level == auth_level && e->server == server) {
                    slot = e; /* the same chain, verified again (expired entry, another name) */
                    break;
                }
            }
            if (slot == NULL && cache->count < cache->capacity)
                slot = &cache->entries[cache->count++];
            if (slot == NULL) {
                slot = &cache->entries[0];
                for (int i = 1; i < cache->count; i++)
                    if (cache->entries[i].used < slot->used)
                        slot = &cache->entries[i];
            }
            free(slot->der);
            slot->der = der;
            slot->len = len;
            slot->not_before = nb;
            slot->not_after = na;
            slot->flags = flags;
            slot->depth = depth;
            slot->auth_level = auth_level;
            slot->server = server;
            slot->used = ++cache->clock;
            cache->stored++;
            der = NULL;
            pthread_mutex_unlock(&cache->lock);
        }
    }
    free(der);
    return ok;
}

static PyObject *
ChainCache_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    int capacity;
    ChainCacheObject *self;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &capacity))
        return NULL;
    if (capacity < 1 || capacity > 65536) {
        PyErr_SetString(PyExc_ValueError, "capacity must be between 1 and 65536");
        return NULL;
    }
    self = (ChainCacheObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->cache.entries = calloc((size_t)capacity, sizeof(entry));
    if (self->cache.entries == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->cache.capacity = capacity;
    pthread_mutex_init(&self->cache.lock, NULL);
    return (PyObject *)self;
}

static void
ChainCache_dealloc(ChainCacheObject *self)
{
    if (self->cache.entries != NULL) {
        for (int i = 0; i < self->cache.count; i++)
            free(self->cache.entries[i].der);
        free(self->cache.entries);
        pthread_mutex_destroy(&self->cache.lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* (callback address, argument address) for SSL_CTX_set_cert_verify_callback. The caller keeps this
 * object alive as long as the SSL_CTX it is installed on. */
static PyObject *
ChainCache_callback(ChainCacheObject *self, PyObject *unused)
{
    if (!bound())
        return NULL;
    return Py_BuildValue("(NN)", PyLong_FromVoidPtr((void *)verify_callback), PyLong_FromVoidPtr(&self->cache));
}

/* {"entries", "capacity", "hits", "misses", "stored"} */
static PyObject *
ChainCache_stats(ChainCacheObject *self, PyObject *unused)
{
    chain_cache *c = &self->cache;
    unsigned long long hits = __atomic_load_n(&c->hits, __ATOMIC_RELAXED);
    unsigned long long misses = __atomic_load_n(&c->misses, __ATOMIC_RELAXED);
    int count, capacity = c->capacity;
    unsigned long long stored;

    pthread_mutex_lock(&c->lock);
    count = c->count;
    stored = c->stored;
    pthread_mutex_unlock(&c->lock);
    return Py_BuildValue("{s:i,s:i,s:K,s:K,s:K}", "entries", count, "capacity", capacity, "hits", hits, "misses",
                         misses, "stored", stored);
}

static PyMethodDef ChainCache_methods[] = {
    {"callback", (PyCFunction)ChainCache_callback, METH_NOARGS, "(callback, arg) addresses."},
    {"stats", (PyCFunction)ChainCache_stats, METH_NOARGS, "Entries, capacity, hits, misses, stored."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChainCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tether.proxy._tlsverify.ChainCache",
    .tp_basicsize = sizeof(ChainCacheObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Verified peer chains of one SSL_CTX.",
    .tp_new = ChainCache_new,
    .tp_dealloc = (destructor)ChainCache_dealloc,
    .tp_methods = ChainCache_methods,
};

static PyMethodDef methods[] = {
    {"bind", (PyCFunction)(void (*)(void))tlsverify_bind, METH_FASTCALL, "Bind libcrypto's and libssl's functions."},
    {"ec_engine_callback", tlsverify_ec_engine_callback, METH_NOARGS, "ENGINE_PKEY_METHS_PTR for the EC method."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tether.proxy._tlsverify", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__tlsverify(void)
{
    PyObject *m;
    if (PyType_Ready(&ChainCacheType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ChainCacheType);
    if (PyModule_AddObject(m, "ChainCache", (PyObject *)&ChainCacheType) < 0) {
        Py_DECREF(&ChainCacheType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
