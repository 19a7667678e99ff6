/* Exact Hamming scans over packed codes: the brute-force side of the index.

Why C: numpy needs three passes per block (xor, popcount, compare) and runs at
~1.2 ns per 64-bit row on the 2-core dev VM, slower than faiss's flat scan; one
fused loop here runs at ~0.6 ns per row (codes in cache) and reaches the memory
bandwidth floor once they are not. copyfree.hamming keeps the numpy scans as the
fallback when this module was not built (no C compiler), and the tests run both.

Both functions take the codes as an (n, W) C-contiguous uint64 buffer, the query as
W words, an optional alive mask (one byte per row, 0 = deleted) and two output
buffers (int64 rows, int32 distances) of the same capacity. They release the GIL.

- within(codes, query, radius, alive, rows_out, dist_out) -> total
  writes the rows with distance <= radius, by row, up to the capacity, and returns
  how many there are (more than the capacity: call again with room for all).
- nearest(codes, query, k, alive, rows_out, dist_out) -> (held, limit)
  one pass with a streaming bound: a row is kept if its distance is <= the k-th
  smallest distance seen so far; `limit` ends as the k-th smallest of all rows
  (64 W if fewer than k). The caller keeps the held rows with distance <= limit:
  every row tied at the k-th is among them. held = -1: more rows are tied within
  the bound than the capacity holds (call again with room for n).
- buckets(entries, len_bits, slot_codes, query, limit, index_out, dist_out) -> total
  multi-index hashing's verification: the slots of the given buckets within limit
  (same capacity rule as within).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Compiled for the plain x86-64 baseline and for newer CPUs (popcnt, AVX2); the
   loader picks the best one the machine supports (GCC/Clang function multi-
   versioning), so one wheel is fast everywhere. */
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "popcnt", "default")))
#endif
#endif
#ifndef CLONES
#define CLONES
#endif

typedef struct {
    Py_buffer codes, query, alive, rows, dist;
    int have_alive;
    Py_ssize_t n, words, cap;
} Args;

static void release(Args *a) {
    PyBuffer_Release(&a->codes);
    PyBuffer_Release(&a->query);
    if (a->have_alive) PyBuffer_Release(&a->alive);
    PyBuffer_Release(&a->rows);
    PyBuffer_Release(&a->dist);
}

/* Parses (codes, query, <int>, alive|None, rows_out, dist_out); 0 on error. */
static int parse(PyObject *args, Args *a, Py_ssize_t *number) {
    PyObject *alive;
    memset(a, 0, sizeof(*a));
    if (!PyArg_ParseTuple(args, "y*y*nOw*w*", &a->codes, &a->query, number, &alive,
                          &a->rows, &a->dist))
        return 0;
    a->words = a->query.len / 8;
    if (a->words < 1 || a->words > 4 || a->query.len % 8 ||
        a->codes.len % (8 * a->words)) {
        PyErr_SetString(PyExc_ValueError,
                        "codes and query must be 1 to 4 uint64 words per row");
        goto fail;
    }
    a->n = a->codes.len / (8 * a->words);
    a->cap = a->rows.len / 8;
    if (a->dist.len / 4 < a->cap) a->cap = a->dist.len / 4;
    if (alive != Py_None) {
        if (PyObject_GetBuffer(alive, &a->alive, PyBUF_SIMPLE) < 0) goto fail;
        a->have_alive = 1;
        if (a->alive.len < a->n) {
            PyErr_SetString(PyExc_ValueError, "alive mask shorter than the codes");
            goto fail;
        }
    }
    return 1;
fail:
    release(a);
    return 0;
}

static inline int distance(const uint64_t *x, const uint64_t *q, Py_ssize_t words) {
    int d = 0;
    for (Py_ssize_t w = 0; w < words; w++) d += __builtin_popcountll(x[w] ^ q[w]);
    return d;
}

CLONES
static Py_ssize_t scan_within(const uint64_t *codes, Py_ssize_t n, Py_ssize_t words,
                              const uint64_t *q, int radius, const uint8_t *alive,
                              int64_t *rows, int32_t *dist, Py_ssize_t cap) {
    Py_ssize_t total = 0, i = 0;
    if (words == 1) { /* as in scan_nearest: eight distances, then one test */
        const uint64_t q0 = q[0];
        for (; i + 8 <= n; i += 8) {
            int d[8], near = 0;
            for (int j = 0; j < 8; j++) {
                d[j] = __builtin_popcountll(codes[i + j] ^ q0);
                near |= d[j] <= radius;
            }
            if (!near) continue;
            for (int j = 0; j < 8; j++) {
                if (d[j] > radius || (alive && !alive[i + j])) continue;
                if (total < cap) {
                    rows[total] = i + j;
                    dist[total] = d[j];
                }
                total++;
            }
        }
    }
    for (; i < n; i++) {
        int d = distance(codes + i * words, q, words);
        if (d > radius || (alive && !alive[i])) continue;
        if (total < cap) {
            rows[total] = i;
            dist[total] = d;
        }
        total++;
    }
    return total;
}

/* The streaming top-k. hist[d] counts held rows at distance d (d <= limit when
   held); below counts held rows within limit. The limit drops while the rows
   strictly below it are k or more, so it is always the k-th smallest seen. */
typedef struct {
    Py_ssize_t hist[257];
    Py_ssize_t below, held, k, cap;
    int limit;
    int64_t *rows;
    int32_t *dist;
} TopK;

/* Keep row i at distance d (d <= limit); 0 when the buffer cannot hold it. */
static inline int keep(TopK *t, Py_ssize_t i, int d) {
    if (t->held == t->cap) { /* drop rows the bound has passed, then retry */
        Py_ssize_t j = 0;
        for (Py_ssize_t s = 0; s < t->held; s++) {
            if (t->dist[s] <= t->limit) {
                t->rows[j] = t->rows[s];
                t->dist[j] = t->dist[s];
                j++;
            }
        }
        t->held = j;
        if (j == t->cap) return 0;
    }
    t->rows[t->held] = i;
    t->dist[t->held] = d;
    t->held++;
    t->hist[d]++;
    t->below++;
    while (t->limit > 0 && t->below - t->hist[t->limit] >= t->k) {
        t->below -= t->hist[t->limit];
        t->limit--;
    }
    return 1;
}

CLONES
static int scan_nearest(const uint64_t *codes, Py_ssize_t n, Py_ssize_t words,
                        const uint64_t *q, const uint8_t *alive, TopK *t) {
    Py_ssize_t i = 0;
    if (words == 1) {
        /* eight distances without branches, then one test: far rows are the rule */
        const uint64_t q0 = q[0];
        for (; i + 8 <= n; i += 8) {
            int d[8], near = 0;
            for (int j = 0; j < 8; j++) {
                d[j] = __builtin_popcountll(codes[i + j] ^ q0);
                near |= d[j] <= t->limit;
            }
            if (!near) continue;
            for (int j = 0; j < 8; j++) {
                if (d[j] > t->limit || (alive && !alive[i + j])) continue;
                if (!keep(t, i + j, d[j])) return 0;
            }
        }
    }
    for (; i < n; i++) {
        int d = distance(codes + i * words, q, words);
        if (d > t->limit || (alive && !alive[i])) continue;
        if (!keep(t, i, d)) return 0;
    }
    return 1;
}

/* The verification step of multi-index hashing (copyfree_index.mih): each entry
   is start << len_bits | length of a bucket in the slot arrays, whose codes are
   one word each; writes (slot, distance) of every slot within limit, bucket by
   bucket. The caller read the entries before it took the slot arrays (the tables'
   reader protocol), so every bucket named is inside `codes`; checked anyway. */
CLONES
static Py_ssize_t scan_buckets(const int64_t *entries, Py_ssize_t n_entries,
                               int len_bits, const uint64_t *codes,
                               Py_ssize_t n_codes, uint64_t q, int limit,
                               int64_t *index, int32_t *dist, Py_ssize_t cap) {
    const int64_t mask = ((int64_t)1 << len_bits) - 1;
    Py_ssize_t total = 0;
    for (Py_ssize_t b = 0; b < n_entries; b++) {
        int64_t start = entries[b] >> len_bits, end = start + (entries[b] & mask);
        if (start < 0 || end > n_codes) return -1;
        for (int64_t s = start; s < end; s++) {
            int d = __builtin_popcountll(codes[s] ^ q);
            if (d > limit) continue;
            if (total < cap) {
                index[total] = s;
                dist[total] = d;
            }
            total++;
        }
    }
    return total;
}

static PyObject *buckets(PyObject *self, PyObject *args) {
    Py_buffer entries, codes, index, dist;
    unsigned long long q;
    int len_bits, limit;
    Py_ssize_t total;
    if (!PyArg_ParseTuple(args, "y*iy*Kiw*w*", &entries, &len_bits, &codes, &q,
                          &limit, &index, &dist))
        return NULL;
    Py_ssize_t cap = index.len / 8 < dist.len / 4 ? index.len / 8 : dist.len / 4;
    Py_BEGIN_ALLOW_THREADS
    total = scan_buckets((const int64_t *)entries.buf, entries.len / 8, len_bits,
                         (const uint64_t *)codes.buf, codes.len / 8, (uint64_t)q,
                         limit, (int64_t *)index.buf, (int32_t *)dist.buf, cap);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&entries);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&index);
    PyBuffer_Release(&dist);
    if (total < 0) {
        PyErr_SetString(PyExc_ValueError, "a bucket entry points past the slots");
        return NULL;
    }
    return PyLong_FromSsize_t(total);
}

static PyObject *within(PyObject *self, PyObject *args) {
    Args a;
    Py_ssize_t radius, total;
    if (!parse(args, &a, &radius)) return NULL;
    int r = radius < 0 ? -1 : (radius > 64 * a.words ? (int)(64 * a.words) : (int)radius);
    Py_BEGIN_ALLOW_THREADS
    total = r < 0 ? 0
                  : scan_within((const uint64_t *)a.codes.buf, a.n, a.words,
                                (const uint64_t *)a.query.buf, r,
                                a.have_alive ? (const uint8_t *)a.alive.buf : NULL,
                                (int64_t *)a.rows.buf, (int32_t *)a.dist.buf, a.cap);
    Py_END_ALLOW_THREADS
    release(&a);
    return PyLong_FromSsize_t(total);
}

static PyObject *nearest(PyObject *self, PyObject *args) {
    Args a;
    Py_ssize_t k;
    int ok = 1;
    if (!parse(args, &a, &k)) return NULL;
    if (k < 1) {
        release(&a);
        PyErr_SetString(PyExc_ValueError, "k must be at least 1");
        return NULL;
    }
    TopK *t = PyMem_Calloc(1, sizeof(TopK));
    if (t == NULL) {
        release(&a);
        return PyErr_NoMemory();
    }
    t->k = k;
    t->cap = a.cap;
    t->limit = (int)(64 * a.words);
    t->rows = (int64_t *)a.rows.buf;
    t->dist = (int32_t *)a.dist.buf;
    Py_BEGIN_ALLOW_THREADS
    ok = scan_nearest((const uint64_t *)a.codes.buf, a.n, a.words,
                      (const uint64_t *)a.query.buf,
                      a.have_alive ? (const uint8_t *)a.alive.buf : NULL, t);
    Py_END_ALLOW_THREADS
    Py_ssize_t held = ok ? t->held : -1;
    int limit = t->limit;
    PyMem_Free(t);
    release(&a);
    return Py_BuildValue("ni", held, limit);
}

static PyMethodDef methods[] = {
    {"within", within, METH_VARARGS, "Rows within a Hamming radius (see the module)."},
    {"nearest", nearest, METH_VARARGS, "Streaming k-nearest scan (see the module)."},
    {"buckets", buckets, METH_VARARGS, "Verify the slots of hash buckets (see above)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "copyfree._scan",
    "Exact Hamming scans over packed uint64 codes, GIL released.", -1, methods,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
