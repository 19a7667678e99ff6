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

Two more loops serve the index's reload, where numpy needs many passes:
- group_sort(codes, words, word, shift, width, counts_out, rows_out, slot_codes|None)
  builds one group's hash table (a stable counting sort of the rows by bucket);
- hash_items(data, offsets, seed, out) hashes ragged items for the id map;
- idmap_insert(table, row_hashes, data, offsets, superseded_out) -> count
  inserts rows 0..n-1 into an empty id map, the newest row of an id winning.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
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

/* Multi-index hashing's table build for one group of bits: a stable counting sort of
   rows 0..n-1 by their bucket key = (codes[i][word] >> shift) & (2^width - 1).
   counts gets each bucket's size, rows_out the rows in bucket order (ascending
   within a bucket), slot_codes (may be NULL) the first code word of each. Two
   sequential passes over the codes: numpy needs two radix argsorts and gathers. */
static int sort_group(const uint64_t *codes, Py_ssize_t n, Py_ssize_t words,
                      int word, int shift, int width, int64_t *counts,
                      int32_t *rows_out, uint64_t *slot_codes) {
    const Py_ssize_t buckets = (Py_ssize_t)1 << width;
    const uint64_t mask = ((uint64_t)1 << width) - 1;
    int64_t *next = malloc(sizeof(int64_t) * buckets);
    if (next == NULL) return 0;
    memset(counts, 0, sizeof(int64_t) * buckets);
    for (Py_ssize_t i = 0; i < n; i++) counts[(codes[i * words + word] >> shift) & mask]++;
    int64_t at = 0;
    for (Py_ssize_t b = 0; b < buckets; b++) {
        next[b] = at;
        at += counts[b];
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t code = codes[i * words + word];
        const int64_t slot = next[(code >> shift) & mask]++;
        rows_out[slot] = (int32_t)i;
        if (slot_codes != NULL) slot_codes[slot] = codes[i * words];
    }
    free(next);
    return 1;
}

static PyObject *group_sort(PyObject *self, PyObject *args) {
    Py_buffer codes, counts, rows;
    Py_buffer slots = {0};
    PyObject *slots_obj;
    Py_ssize_t words;
    int word, shift, width, ok = 1;
    if (!PyArg_ParseTuple(args, "y*niiiw*w*O", &codes, &words, &word, &shift, &width,
                          &counts, &rows, &slots_obj))
        return NULL;
    const char *bad = NULL;
    Py_ssize_t n = words > 0 ? codes.len / (8 * words) : 0;
    if (words < 1 || words > 4 || codes.len % (8 * words))
        bad = "codes must be 1 to 4 uint64 words per row";
    else if (word < 0 || word >= words || width < 1 || width > 30 || shift < 0 ||
             shift + width > 64)
        bad = "the group must lie inside one code word, 1 to 30 bits wide";
    else if (counts.len != 8 * ((Py_ssize_t)1 << width))
        bad = "counts must hold one int64 per bucket";
    else if (rows.len != 4 * n || n > INT32_MAX)
        bad = "rows_out must hold one int32 per row (at most 2^31 rows)";
    if (bad == NULL && slots_obj != Py_None) {
        if (PyObject_GetBuffer(slots_obj, &slots, PyBUF_WRITABLE) < 0) {
            slots.obj = NULL;
            ok = 0;
        } else if (slots.len != 8 * n)
            bad = "slot_codes must hold one uint64 per row";
    }
    if (bad == NULL && ok) {
        Py_BEGIN_ALLOW_THREADS
        ok = sort_group((const uint64_t *)codes.buf, n, words, word, shift, width,
                        (int64_t *)counts.buf, (int32_t *)rows.buf,
                        slots.obj != NULL ? (uint64_t *)slots.buf : NULL);
        Py_END_ALLOW_THREADS
        if (!ok) PyErr_NoMemory();
    }
    if (bad != NULL) PyErr_SetString(PyExc_ValueError, bad);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&rows);
    if (slots.obj != NULL) PyBuffer_Release(&slots);
    if (bad != NULL || !ok) return NULL;
    Py_RETURN_NONE;
}

/* The id map's hash of every item data[offsets[i] : offsets[i + 1]], the function
   copyfree_index.ragged.hash_items computes with numpy: splitmix64's finaliser over
   seed ^ golden ^ length * M2, then over h ^ (word + golden) for each 8-byte
   little-endian word of the item (the last one zero-padded). */
#define M1 0xBF58476D1CE4E5B9ULL
#define M2 0x94D049BB133111EBULL
#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 30;
    x *= M1;
    x ^= x >> 27;
    x *= M2;
    x ^= x >> 31;
    return x;
}

static int hash_all(const uint8_t *data, Py_ssize_t size, const int64_t *offsets,
                    Py_ssize_t n, uint64_t seed, uint64_t *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t start = offsets[i], end = offsets[i + 1];
        if (start < 0 || end < start || end > size) return 0;
        const int64_t length = end - start;
        uint64_t h = mix((seed ^ GOLDEN) ^ ((uint64_t)length * M2));
        for (int64_t at = start; at < end; at += 8) {
            uint64_t w = 0;
            const int64_t take = end - at < 8 ? end - at : 8;
            memcpy(&w, data + at, (size_t)take); /* little-endian x86 */
            h = mix(h ^ (w + GOLDEN));
        }
        out[i] = h;
    }
    return 1;
}

static PyObject *hash_items(PyObject *self, PyObject *args) {
    Py_buffer data, offsets, out;
    unsigned long long seed;
    int ok = 0;
    if (!PyArg_ParseTuple(args, "y*y*Kw*", &data, &offsets, &seed, &out)) return NULL;
    Py_ssize_t n = offsets.len / 8 - 1;
    if (offsets.len % 8 || n < 0 || out.len != 8 * n) {
        PyErr_SetString(PyExc_ValueError, "need n + 1 int64 offsets and n uint64 outputs");
    } else {
        Py_BEGIN_ALLOW_THREADS
        ok = hash_all((const uint8_t *)data.buf, data.len, (const int64_t *)offsets.buf,
                      n, (uint64_t)seed, (uint64_t *)out.buf);
        Py_END_ALLOW_THREADS
        if (!ok) PyErr_SetString(PyExc_ValueError, "an item lies outside the data");
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&out);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* The id map's bulk insert (copyfree_index.idmap): rows 0..n-1, whose ids are
   data[offsets[r] : offsets[r + 1]] with hashes row_hashes[r], into an empty table of
   int32 slots (-1 = empty; a power of two, more slots than rows) by linear probing.
   A slot already holding the same id (equal hash, equal bytes) takes the newer row
   and the older row goes to superseded_out. Returns how many rows were superseded,
   -1 on an inconsistent input. */
static Py_ssize_t insert_rows(int32_t *table, Py_ssize_t slots, const uint64_t *hashes,
                              Py_ssize_t n, const uint8_t *data, Py_ssize_t size,
                              const int64_t *offsets, int64_t *superseded) {
    const uint64_t mask = (uint64_t)slots - 1;
    Py_ssize_t dropped = 0;
    for (Py_ssize_t r = 0; r < n; r++) {
        const int64_t start = offsets[r], length = offsets[r + 1] - start;
        if (start < 0 || length < 0 || offsets[r + 1] > size) return -1;
        uint64_t pos = hashes[r] & mask;
        for (Py_ssize_t probes = 0;; probes++) {
            if (probes == slots) return -1; /* full: the caller sized it wrong */
            const int32_t occ = table[pos];
            if (occ == -1) {
                table[pos] = (int32_t)r;
                break;
            }
            if (occ >= 0 && hashes[occ] == hashes[r] &&
                offsets[occ + 1] - offsets[occ] == length &&
                memcmp(data + offsets[occ], data + start, (size_t)length) == 0) {
                superseded[dropped++] = occ;
                table[pos] = (int32_t)r;
                break;
            }
            pos = (pos + 1) & mask;
        }
    }
    return dropped;
}

static PyObject *idmap_insert(PyObject *self, PyObject *args) {
    Py_buffer table, hashes, data, offsets, superseded;
    Py_ssize_t dropped = -1;
    if (!PyArg_ParseTuple(args, "w*y*y*y*w*", &table, &hashes, &data, &offsets,
                          &superseded))
        return NULL;
    Py_ssize_t slots = table.len / 4, n = offsets.len / 8 - 1;
    if (n < 0 || n > INT32_MAX || hashes.len < 8 * n || superseded.len < 8 * n ||
        slots <= n || (slots & (slots - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError,
                        "need n + 1 offsets, n hashes, room for n rows and a "
                        "power-of-two table larger than n");
    } else {
        Py_BEGIN_ALLOW_THREADS
        dropped = insert_rows((int32_t *)table.buf, slots, (const uint64_t *)hashes.buf,
                              n, (const uint8_t *)data.buf, data.len,
                              (const int64_t *)offsets.buf, (int64_t *)superseded.buf);
        Py_END_ALLOW_THREADS
        if (dropped < 0)
            PyErr_SetString(PyExc_ValueError, "an id lies outside the data or the table is full");
    }
    PyBuffer_Release(&table);
    PyBuffer_Release(&hashes);
    PyBuffer_Release(&data);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&superseded);
    if (dropped < 0) return NULL;
    return PyLong_FromSsize_t(dropped);
}

static PyMethodDef methods[] = {
    {"within", within, METH_VARARGS, "Rows within a Hamming radius (see the module)."},
    {"nearest", nearest, METH_VARARGS, "Streaming k-nearest scan (see the module)."},
    {"buckets", buckets, METH_VARARGS, "Verify the slots of hash buckets (see above)."},
    {"group_sort", group_sort, METH_VARARGS, "Counting sort of one bit group (see above)."},
    {"hash_items", hash_items, METH_VARARGS, "Hash ragged items (see above)."},
    {"idmap_insert", idmap_insert, METH_VARARGS, "Bulk insert into an id map (see above)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "copyfree._scan",
    "Exact Hamming scans over packed uint64 codes, GIL released.", -1, methods,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
