/* CPU kernels of qfv-brevitas: nearest-level search, the squared-distance regularizer and its
 * device-aware (stuck bits / per-cell variability) form, each one pass over the weights.
 *
 * Plain C (no Python or torch headers): loaded with ctypes by qfv_brevitas/core/kernels.py,
 * which keeps a pure-torch fallback for machines where this file could not be compiled.
 *
 * Work is cut into chunks (a piece of one row of the (G, M) weight array) that threads take
 * from a shared counter: a thread that the OS deschedules (other processes on the cores) holds
 * up one chunk, not the whole call, and the others take the rest of the work. Sums are kept per
 * chunk and added in chunk order at the end, so results do not depend on the thread count or
 * on which thread took which chunk.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(_WIN32)
#define QFV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define QFV_CLONES
#endif

#define QFV_MAX_THREADS 256
/* Weights per inner step (on the stack), and the most thresholds that are counted rather
 * than looked up. */
#define SUB 256
#define COUNT_MAX 31

int64_t qfv_abi_version(void) { return 2; }

/* ------------------------------------------------------------------ chunked parallel loop */

typedef void (*chunk_fn)(void *ctx, int64_t chunk);

typedef struct {
    chunk_fn fn;
    void *ctx;
    int64_t n;
    int64_t next;
} pool_t;

static void *pool_worker(void *arg) {
    pool_t *p = (pool_t *)arg;
    for (;;) {
        int64_t k = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        if (k >= p->n) break;
        p->fn(p->ctx, k);
    }
    return NULL;
}

static void run_chunks(chunk_fn fn, void *ctx, int64_t n, int64_t threads) {
    pool_t p = {fn, ctx, n, 0};
    pthread_t th[QFV_MAX_THREADS];
    int64_t started = 0, i;
    if (threads > n) threads = n;
    if (threads > QFV_MAX_THREADS) threads = QFV_MAX_THREADS;
    for (i = 1; i < threads; i++)
        if (pthread_create(&th[started], NULL, pool_worker, &p) == 0) started++;
    pool_worker(&p); /* the calling thread works too */
    for (i = 0; i < started; i++) pthread_join(th[i], NULL);
}

/* Chunk k of a (G, M) array cut into `per_row` pieces of `block` columns per row. */
typedef struct {
    int64_t G, M, block, per_row;
} tiling_t;

static tiling_t make_tiling(int64_t G, int64_t M, int64_t block) {
    tiling_t t;
    t.G = G;
    t.M = M;
    t.block = block < 1 ? 1 : block;
    t.per_row = M == 0 ? 1 : (M + t.block - 1) / t.block;
    return t;
}

static void chunk_range(const tiling_t *t, int64_t k, int64_t *g, int64_t *c0, int64_t *c1) {
    *g = k / t->per_row;
    *c0 = (k % t->per_row) * t->block;
    *c1 = *c0 + t->block < t->M ? *c0 + t->block : t->M;
}

/* Residual sums per code (four interleaved bins of 256, added bin 0 + 1 and 2 + 3 first) to
 * the per-bit sums of r and c: pr[i] += the sum over the codes with bit i set (i < N), pr[N] +=
 * the sum over all L codes. */
static void bins_to_bit_sums(double (*bins)[256], int64_t L, int64_t N, double *pr) {
    int64_t s, i;
    for (s = 0; s < L; s++) {
        double v = (bins[0][s] + bins[1][s]) + (bins[2][s] + bins[3][s]);
        pr[N] += v;
        for (i = 0; i < N; i++)
            if ((s >> i) & 1) pr[i] += v;
    }
}

/* Per-row sums (G x width doubles) from per-chunk ones (n chunks of width each, chunk k on row
 * k / per_row), added in chunk order: the result does not depend on the thread count. */
static void add_chunk_rows(double *sums, const double *part, int64_t G, int64_t n,
                           int64_t per_row, int64_t width) {
    int64_t k, i;
    memset(sums, 0, sizeof(double) * (size_t)(G * width));
    for (k = 0; k < n; k++)
        for (i = 0; i < width; i++) sums[(k / per_row) * width + i] += part[k * width + i];
}

/* The fields a deployed pass and a fused pass both set in their contexts, as designated
 * initializers: the (G, M) weights cut into chunks of `block` columns, the level table (G x L,
 * L = 2^N), r (G x N), the per-cell factors (G x M x N, NULL: ideal) and N (1..8, checked by
 * the caller before the shift). */
#define LAYER_FIELDS(w_, G, M, N_, levels_, r_, lrs_, hrs_, block)                               \
    .t = make_tiling(G, M, block), .w = (w_), .levels = (levels_), .r = (r_), .lrs = (lrs_),     \
    .hrs = (hrs_), .N = (N_), .L = (int64_t)1 << (N_)

/* ---------------------------------------------------------- lookup table of the thresholds */

/* Per group: cell of x = floor((x - t0) * inv_h) clamped to [0, cells); base[cell] = number of
 * thresholds whose cell is below it. The search starts there and walks to the exact index, so
 * the table only has to be a good guess: the result never depends on its rounding. */
typedef struct {
    int64_t cells;
    double *t0, *inv_h;
    int32_t *base; /* G x cells */
} lut_t;

static inline int64_t cell_of(double x, double t0, double inv_h, int64_t cells) {
    double f = (x - t0) * inv_h;
    if (!(f > 0)) return 0; /* also NaN */
    if (f >= (double)(cells - 1)) return cells - 1;
    return (int64_t)f;
}

#define DEFINE_LUT(SUF, T)                                                                       \
    static int lut_build_##SUF(lut_t *lt, const T *thr, int64_t G, int64_t nt) {                 \
        int64_t g, k, cells = 8 * (nt + 1);                                                      \
        if (cells < 16) cells = 16;                                                              \
        if (cells * G > ((int64_t)1 << 22)) cells = ((int64_t)1 << 22) / (G > 0 ? G : 1);        \
        if (cells < 1) cells = 1;                                                                \
        lt->cells = cells;                                                                       \
        lt->t0 = (double *)malloc(sizeof(double) * (G > 0 ? G : 1));                              \
        lt->inv_h = (double *)malloc(sizeof(double) * (G > 0 ? G : 1));                           \
        lt->base = (int32_t *)calloc((size_t)(cells * (G > 0 ? G : 1)), sizeof(int32_t));         \
        if (!lt->t0 || !lt->inv_h || !lt->base) return -1;                                       \
        for (g = 0; g < G; g++) {                                                                \
            const T *tg = thr + g * nt;                                                          \
            int32_t *b = lt->base + g * cells;                                                   \
            double t0 = nt ? (double)tg[0] : 0.0, span = nt ? (double)tg[nt - 1] - t0 : 0.0;      \
            double inv = (span > 0 && isfinite(span)) ? (double)cells / span : 0.0;               \
            lt->t0[g] = isfinite(t0) ? t0 : 0.0;                                                 \
            lt->inv_h[g] = inv;                                                                  \
            for (k = 0; k < nt; k++) {                                                           \
                int64_t c = cell_of((double)tg[k], lt->t0[g], inv, cells);                       \
                if (c + 1 < cells) b[c + 1] += 1;                                                \
            }                                                                                    \
            for (k = 1; k < cells; k++) b[k] += b[k - 1];                                        \
        }                                                                                        \
        return 0;                                                                                \
    }

static void lut_free(lut_t *lt) {
    free(lt->t0);
    free(lt->inv_h);
    free(lt->base);
}

/* Free a pass's per-chunk buffers and its lookup table (any of them NULL or empty). */
static void free_chunk_buffers(double *part, int64_t *bad, double *psums, lut_t *lut) {
    free(part);
    free(bad);
    free(psums);
    lut_free(lut);
}

/* Sorted index of x's nearest level: the number of thresholds <= x. */
#define SEARCH(T, x, tg, nt, b, t0, inv, cells, out)                                             \
    do {                                                                                         \
        int64_t k_ = (b)[cell_of((double)(x), (t0), (inv), (cells))];                            \
        while (k_ < (nt) && (x) >= (tg)[k_]) k_++;                                               \
        while (k_ > 0 && !((x) >= (tg)[k_ - 1])) k_--;                                           \
        (out) = k_;                                                                              \
    } while (0)

/* Sorted index of each of the nj weights x among the nt sorted thresholds tg of row g (the
 * number of thresholds <= x): counted, vectorised over the weights, for a few thresholds, else
 * found through the row's lookup table. The nearest-level and the fused passes both use it. */
#define DEFINE_SORTED_INDEX(SUF, T)                                                              \
    static inline __attribute__((always_inline)) void                                            \
    sorted_index_##SUF(const T *x, int64_t nj, const T *tg, int64_t nt, const lut_t *lut,        \
                       int64_t g, int32_t *cnt) {                                                \
        int64_t q, t;                                                                            \
        if (nt <= COUNT_MAX) {                                                                   \
            for (q = 0; q < nj; q++) cnt[q] = 0;                                                 \
            for (t = 0; t < nt; t++) {                                                           \
                T th = tg[t];                                                                    \
                for (q = 0; q < nj; q++) cnt[q] += x[q] >= th;                                   \
            }                                                                                    \
        } else {                                                                                 \
            const int32_t *b = lut->base + g * lut->cells;                                       \
            double t0 = lut->t0[g], inv = lut->inv_h[g];                                         \
            int64_t cells = lut->cells;                                                          \
            for (q = 0; q < nj; q++) {                                                           \
                int64_t i;                                                                       \
                SEARCH(T, x[q], tg, nt, b, t0, inv, cells, i);                                   \
                cnt[q] = (int32_t)i;                                                             \
            }                                                                                    \
        }                                                                                        \
    }

/* ------------------------------------------------- nearest level and the squared distance */

#define DEFINE_NEAREST(SUF, T)                                                                   \
    DEFINE_LUT(SUF, T)                                                                           \
    DEFINE_SORTED_INDEX(SUF, T)                                                                  \
    typedef struct {                                                                             \
        tiling_t t;                                                                              \
        const T *w, *thr, *vals;                                                                 \
        int64_t nt;                                                                              \
        lut_t lut;                                                                               \
        uint8_t *idx;                                                                            \
        const uint8_t *perm; /* G x (nt + 1): code of each sorted level (NULL: sorted index) */  \
        double *part; /* per chunk: sum of d^2 (NULL: search only) */                            \
        int64_t *bad; /* per chunk: non-finite weights */                                        \
    } nearest_ctx_##SUF;                                                                         \
                                                                                                 \
    QFV_CLONES static void nearest_chunk_##SUF(void *vctx, int64_t k) {                          \
        nearest_ctx_##SUF *c = (nearest_ctx_##SUF *)vctx;                                        \
        int64_t g, c0, c1, j, q, bad = 0;                                                        \
        double acc[4] = {0, 0, 0, 0};                                                            \
        chunk_range(&c->t, k, &g, &c0, &c1);                                                     \
        {                                                                                        \
            const T *tg = c->thr + g * c->nt, *vg = c->vals + g * (c->nt + 1);                   \
            int64_t nt = c->nt;                                                                  \
            const T *w = c->w + g * c->t.M;                                                      \
            uint8_t *out = c->idx + g * c->t.M;                                                  \
            int32_t cnt[SUB];                                                                    \
            double dd[SUB];                                                                      \
            for (j = c0; j < c1; j += SUB) {                                                     \
                int64_t nj = c1 - j < SUB ? c1 - j : SUB;                                        \
                const T *x = w + j;                                                              \
                sorted_index_##SUF(x, nj, tg, nt, &c->lut, g, cnt);                              \
                if (c->perm) {                                                                   \
                    const uint8_t *pg = c->perm + g * (nt + 1);                                  \
                    for (q = 0; q < nj; q++) out[j + q] = pg[cnt[q]];                            \
                } else {                                                                         \
                    for (q = 0; q < nj; q++) out[j + q] = (uint8_t)cnt[q];                       \
                }                                                                                \
                if (c->part) {                                                                   \
                    for (q = 0; q < nj; q++) {                                                   \
                        T d = x[q] - vg[cnt[q]];                                                 \
                        dd[q] = (double)d * (double)d;                                           \
                    }                                                                            \
                    for (q = 0; q + 3 < nj; q += 4) {                                            \
                        acc[0] += dd[q];                                                         \
                        acc[1] += dd[q + 1];                                                     \
                        acc[2] += dd[q + 2];                                                     \
                        acc[3] += dd[q + 3];                                                     \
                    }                                                                            \
                    for (; q < nj; q++) acc[0] += dd[q];                                         \
                } else {                                                                         \
                    for (q = 0; q < nj; q++) bad += !(x[q] - x[q] == 0);                         \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        if (c->part) c->part[k] = (acc[0] + acc[1]) + (acc[2] + acc[3]);                         \
        c->bad[k] = bad;                                                                         \
    }                                                                                            \
                                                                                                 \
    /* Returns the number of non-finite weights, or -1 when out of memory. *total (if given)   \
     * receives sum_i (w_i - nearest level)^2, summed in double in a fixed order. */              \
    int64_t qfv_nearest_##SUF(const T *w, int64_t G, int64_t M, const T *thr, int64_t nt,        \
                              const T *vals, const uint8_t *perm, uint8_t *idx, double *total,   \
                              int64_t block, int64_t threads) {                                  \
        nearest_ctx_##SUF c;                                                                     \
        int64_t n, k, bad = 0;                                                                   \
        c = (nearest_ctx_##SUF){.t = make_tiling(G, M, block), .w = w, .thr = thr, .vals = vals, \
                                .nt = nt, .idx = idx, .perm = perm};                             \
        n = G * c.t.per_row;                                                                     \
        if (lut_build_##SUF(&c.lut, thr, G, nt)) {                                               \
            lut_free(&c.lut);                                                                    \
            return -1;                                                                           \
        }                                                                                        \
        c.bad = (int64_t *)calloc((size_t)(n > 0 ? n : 1), sizeof(int64_t));                      \
        c.part = total ? (double *)calloc((size_t)(n > 0 ? n : 1), sizeof(double)) : NULL;        \
        if (!c.bad || (total && !c.part)) {                                                      \
            free_chunk_buffers(c.part, c.bad, NULL, &c.lut);                                     \
            return -1;                                                                           \
        }                                                                                        \
        run_chunks(nearest_chunk_##SUF, &c, n, threads);                                         \
        if (total) {                                                                             \
            double s = 0.0;                                                                      \
            for (k = 0; k < n; k++) s += c.part[k];                                              \
            *total = s;                                                                          \
        }                                                                                        \
        for (k = 0; k < n; k++) bad += c.bad[k];                                                 \
        free_chunk_buffers(c.part, c.bad, NULL, &c.lut);                                         \
        return bad;                                                                              \
    }                                                                                            \
                                                                                                 \
    typedef struct {                                                                             \
        tiling_t t;                                                                              \
        const T *w, *vals;                                                                       \
        const uint8_t *idx;                                                                      \
        int64_t L;                                                                               \
        T gw;                                                                                    \
        T *grad_w;                                                                               \
        double *part; /* per chunk: L sums of (w - q) over the weights at each sorted level */  \
    } nearest_bwd_ctx_##SUF;                                                                     \
                                                                                                 \
    QFV_CLONES static void nearest_bwd_chunk_##SUF(void *vctx, int64_t k) {                      \
        nearest_bwd_ctx_##SUF *c = (nearest_bwd_ctx_##SUF *)vctx;                                \
        int64_t g, c0, c1, j, l, L = c->L;                                                       \
        chunk_range(&c->t, k, &g, &c0, &c1);                                                     \
        {                                                                                        \
            const T *w = c->w + g * c->t.M, *vg = c->vals + g * L;                               \
            const uint8_t *ix = c->idx + g * c->t.M;                                             \
            T *gwp = c->grad_w ? c->grad_w + g * c->t.M : NULL;                                  \
            if (gwp)                                                                             \
                for (j = c0; j < c1; j++) gwp[j] = (w[j] - vg[ix[j]]) * c->gw;                   \
            if (c->part) {                                                                       \
                /* Four sets of bins taken in turn: consecutive weights at one level do not   \
                 * wait for each other's addition. */                                           \
                double s4[4][256];                                                               \
                double *s = c->part + k * L;                                                     \
                memset(s4, 0, sizeof(double) * 4 * 256);                                         \
                for (j = c0; j + 3 < c1; j += 4) {                                               \
                    s4[0][ix[j]] += (double)(w[j] - vg[ix[j]]);                                  \
                    s4[1][ix[j + 1]] += (double)(w[j + 1] - vg[ix[j + 1]]);                      \
                    s4[2][ix[j + 2]] += (double)(w[j + 2] - vg[ix[j + 2]]);                      \
                    s4[3][ix[j + 3]] += (double)(w[j + 3] - vg[ix[j + 3]]);                      \
                }                                                                                \
                for (; j < c1; j++) s4[0][ix[j]] += (double)(w[j] - vg[ix[j]]);                  \
                for (l = 0; l < L; l++) s[l] = (s4[0][l] + s4[1][l]) + (s4[2][l] + s4[3][l]);    \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* grad_w = gw * (w - q) (if grad_w), sums[g, l] = sum over the weights of row g at sorted \
     * level l of (w - q) (if sums, G x L doubles). Returns 0, or -1 when out of memory. */     \
    int64_t qfv_nearest_bwd_##SUF(const T *w, const uint8_t *idx, int64_t G, int64_t M,         \
                                  const T *vals, int64_t L, double gw, T *grad_w, double *sums,  \
                                  int64_t block, int64_t threads) {                              \
        nearest_bwd_ctx_##SUF c;                                                                 \
        int64_t n;                                                                               \
        c = (nearest_bwd_ctx_##SUF){.t = make_tiling(G, M, block), .w = w, .vals = vals,         \
                                    .idx = idx, .L = L, .gw = (T)gw, .grad_w = grad_w};          \
        n = G * c.t.per_row;                                                                     \
        if (sums) {                                                                              \
            c.part = (double *)calloc((size_t)((n > 0 ? n : 1) * L), sizeof(double));             \
            if (!c.part) return -1;                                                              \
        }                                                                                        \
        run_chunks(nearest_bwd_chunk_##SUF, &c, n, threads);                                     \
        if (sums) {                                                                              \
            add_chunk_rows(sums, c.part, G, n, c.t.per_row, L);                                  \
            free(c.part);                                                                        \
        }                                                                                        \
        return 0;                                                                                \
    }

DEFINE_NEAREST(f32, float)
DEFINE_NEAREST(f64, double)

/* ------------------------------------- distance to the deployed values of given codes */

/* Deployed value of code S for one weight: level[S] + sum_i r_i (S_i (lrs_i - 1) + (1 - S_i)
 * hrs_i). qfv_deployed: sum (w - v)^2 over given (forced) codes and its backward pass
 * (device.deployed_sq_distance); the regularizer's own search-and-distance pass is below. */
#define DEFINE_DEPLOYED(SUF, T)                                                                  \
    typedef struct {                                                                             \
        tiling_t t;                                                                              \
        const T *w, *levels, *r, *lrs, *hrs;                                                     \
        const uint8_t *codes;                                                                    \
        int64_t N, L;                                                                            \
        T gw;                                                                                    \
        T *grad_w;                                                                               \
        double *part; /* forward: 1 per chunk; backward: N + 1 per chunk (r_0..r_N-1, c) */     \
        int backward;                                                                            \
    } deployed_ctx_##SUF;                                                                        \
                                                                                                 \
    /* Backward over chunk k (row g, columns c0..c1) on ideal cells: residuals summed per code,  \
     * r and c follow through the bits. */                                                       \
    static inline __attribute__((always_inline)) void                                            \
    deployed_ideal_bwd_##SUF(deployed_ctx_##SUF *c, int64_t k, int64_t g, int64_t c0,            \
                             int64_t c1) {                                                       \
        int64_t j, q, i, N = c->N, L = c->L;                                                     \
        double s4[4][256], pr[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};                                  \
        const T *lv = c->levels + g * L;                                                         \
        const uint8_t *cd = c->codes + g * c->t.M;                                               \
        const T *w = c->w + g * c->t.M;                                                          \
        memset(s4, 0, sizeof(double) * 4 * 256);                                                 \
        if (c->grad_w)                                                                           \
            for (j = c0; j < c1; j++) c->grad_w[g * c->t.M + j] = (w[j] - lv[cd[j]]) * c->gw;    \
        for (j = c0; j + 3 < c1; j += 4)                                                         \
            for (q = 0; q < 4; q++) s4[q][cd[j + q]] += (double)(w[j + q] - lv[cd[j + q]]);      \
        for (; j < c1; j++) s4[0][cd[j]] += (double)(w[j] - lv[cd[j]]);                          \
        bins_to_bit_sums(s4, L, N, pr);                                                          \
        for (i = 0; i <= N; i++) c->part[k * (N + 1) + i] = pr[i];                               \
    }                                                                                            \
                                                                                                 \
    QFV_CLONES static void deployed_chunk_##SUF(void *vctx, int64_t k) {                         \
        deployed_ctx_##SUF *c = (deployed_ctx_##SUF *)vctx;                                      \
        int64_t g, c0, c1, j0, i, q, N = c->N, L = c->L;                                         \
        const T *lv, *rg;                                                                        \
        double acc[4] = {0, 0, 0, 0}, pr[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};                      \
        T dv[SUB];                                                                               \
        chunk_range(&c->t, k, &g, &c0, &c1);                                                     \
        lv = c->levels + g * L;                                                                  \
        rg = c->r + g * N;                                                                       \
        if (!c->lrs && !c->hrs && c->backward && c->part) {                                      \
            deployed_ideal_bwd_##SUF(c, k, g, c0, c1);                                           \
            return;                                                                              \
        }                                                                                        \
        for (j0 = c0; j0 < c1; j0 += SUB) {                                                      \
            int64_t nj = c1 - j0 < SUB ? c1 - j0 : SUB;                                          \
            int64_t p0 = g * c->t.M + j0;                                                        \
            const uint8_t *cd = c->codes + p0;                                                   \
            const T *w = c->w + p0;                                                              \
            /* d = w - (level + deviation): the deployed value as deployed_values computes it, \
             * so that a weight on its deployed value has distance 0 exactly. */               \
            for (q = 0; q < nj; q++) dv[q] = 0;                                                  \
            if (c->lrs && c->hrs) {                                                              \
                const T *a = c->lrs + p0 * N, *h = c->hrs + p0 * N;                              \
                for (q = 0; q < nj; q++) {                                                       \
                    T dev = 0;                                                                   \
                    for (i = 0; i < N; i++) {                                                    \
                        T bit = (T)((cd[q] >> i) & 1);                                           \
                        dev += (bit * (a[q * N + i] - 1) + (1 - bit) * h[q * N + i]) * rg[i];   \
                    }                                                                            \
                    dv[q] = dev;                                                                 \
                }                                                                                \
            } else if (c->lrs || c->hrs) {                                                       \
                const T *a = c->lrs ? c->lrs + p0 * N : c->hrs + p0 * N;                         \
                T one = c->lrs ? (T)1 : (T)0;                                                    \
                for (q = 0; q < nj; q++) {                                                       \
                    T dev = 0;                                                                   \
                    for (i = 0; i < N; i++) {                                                    \
                        T bit = (T)((cd[q] >> i) & 1);                                           \
                        T sel = c->lrs ? bit : 1 - bit;                                          \
                        dev += sel * (a[q * N + i] - one) * rg[i];                               \
                    }                                                                            \
                    dv[q] = dev;                                                                 \
                }                                                                                \
            }                                                                                    \
            for (q = 0; q < nj; q++) dv[q] = w[q] - (lv[cd[q]] + dv[q]);                         \
            if (!c->backward) {                                                                  \
                for (q = 0; q + 3 < nj; q += 4) {                                                \
                    acc[0] += (double)dv[q] * (double)dv[q];                                     \
                    acc[1] += (double)dv[q + 1] * (double)dv[q + 1];                             \
                    acc[2] += (double)dv[q + 2] * (double)dv[q + 2];                             \
                    acc[3] += (double)dv[q + 3] * (double)dv[q + 3];                             \
                }                                                                                \
                for (; q < nj; q++) acc[0] += (double)dv[q] * (double)dv[q];                     \
                continue;                                                                        \
            }                                                                                    \
            if (c->grad_w)                                                                       \
                for (q = 0; q < nj; q++) c->grad_w[p0 + q] = dv[q] * c->gw;                      \
            if (c->part) {                                                                       \
                for (q = 0; q < nj; q++) {                                                       \
                    double d = (double)dv[q];                                                    \
                    pr[N] += d;                                                                  \
                    for (i = 0; i < N; i++) {                                                    \
                        int64_t p = (p0 + q) * N + i;                                            \
                        T bit = (T)((cd[q] >> i) & 1);                                           \
                        T coef = c->lrs ? bit * c->lrs[p] : bit;                                 \
                        if (c->hrs) coef += (1 - bit) * c->hrs[p];                               \
                        pr[i] += d * (double)coef;                                               \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        if (!c->backward) {                                                                      \
            c->part[k] = (acc[0] + acc[1]) + (acc[2] + acc[3]);                                  \
        } else if (c->part) {                                                                    \
            for (i = 0; i <= N; i++) c->part[k * (N + 1) + i] = pr[i];                           \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* Forward (sums == NULL and grad_w == NULL): *total = sum (w - v)^2 with v the deployed  \
     * value of the (forced) codes. Backward: grad_w = gw (w - v) (if grad_w) and sums (G x     \
     * (N + 1) doubles, if given): per row sum (w - v) coef_i for i < N, then sum (w - v). */    \
    int64_t qfv_deployed_##SUF(const T *w, int64_t G, int64_t M, int64_t N, const T *levels,     \
                               const T *r, const uint8_t *codes, const T *lrs, const T *hrs,     \
                               int backward, double gw, T *grad_w, double *sums, double *total,  \
                               int64_t block, int64_t threads) {                                 \
        deployed_ctx_##SUF c;                                                                    \
        int64_t n, k, width;                                                                     \
        if (N < 1 || N > 8) return -2;                                                           \
        c = (deployed_ctx_##SUF){LAYER_FIELDS(w, G, M, N, levels, r, lrs, hrs, block),           \
                                 .codes = codes, .gw = (T)gw, .grad_w = grad_w,                  \
                                 .backward = backward};                                          \
        n = G * c.t.per_row;                                                                     \
        width = backward ? N + 1 : 1;                                                            \
        if (!backward || sums) {                                                                 \
            c.part = (double *)calloc((size_t)((n > 0 ? n : 1) * width), sizeof(double));        \
            if (!c.part) return -1;                                                              \
        }                                                                                        \
        run_chunks(deployed_chunk_##SUF, &c, n, threads);                                        \
        if (!backward) {                                                                         \
            double s = 0.0;                                                                      \
            for (k = 0; k < n; k++) s += c.part[k];                                              \
            *total = s;                                                                          \
        } else if (sums) {                                                                       \
            add_chunk_rows(sums, c.part, G, n, c.t.per_row, width);                              \
        }                                                                                        \
        free(c.part);                                                                            \
        return 0;                                                                                \
    }

/* ------------------------- device-aware regularizer: search, distance and backward fused */

/* One pass over the weights and their per-cell data (stuck-bit masks, cell factors): each
 * weight's nearest deployable code, the squared distance to that code's deployed value (as
 * qfv_deployed computes it), and what the backward pass needs: the residual w - v per weight,
 * and per row the sums of (w - v) coef_i and of (w - v). The per-cell data are read once per
 * regularizer step; device.aware_codes runs the same pass and keeps the codes. */
#define FU_J 64
/* Independent groups of vector lanes that a search carries through the candidates at once. */
#define KV 4

#define DEFINE_FUSED(SUF, T, IT)                                                                 \
    typedef struct {                                                                             \
        tiling_t t;                                                                              \
        const T *w, *levels, *r, *lrs, *hrs, *thr;                                               \
        const uint8_t *sa0, *sa1, *perm;                                                         \
        int64_t N, L, nt;                                                                        \
        lut_t lut;                                                                               \
        uint8_t *codes;                                                                          \
        T *resid;                                                                                \
        double *part;  /* per chunk: sum of d^2 */                                               \
        double *psums; /* per chunk: N + 1 sums (NULL: not wanted) */                            \
        int64_t *bad;  /* per chunk: non-finite weights */                                       \
    } fused_ctx_##SUF;                                                                           \
                                                                                                 \
    /* Explicit vectors (GCC vector extensions, 32 bytes; split in two where AVX2 is absent):    \
     * the searches keep a group of weights' running values, best distances and codes in         \
     * registers across all candidate codes. vi is the comparison-mask type of vt. */            \
    typedef T vt_##SUF __attribute__((vector_size(32)));                                         \
    typedef IT vi_##SUF __attribute__((vector_size(32)));                                        \
                                                                                                 \
    /* Per chunk: lanes of the sums (one per weight position of a sub-block, added up at the end \
     * of the chunk in a fixed order), so that the loops over the weights vectorise. */          \
    typedef struct {                                                                             \
        double d2[FU_J];                                                                         \
        double s[9][FU_J];                                                                       \
        int64_t bad;                                                                             \
    } lanes_##SUF;                                                                               \
                                                                                                 \
    /* The end of every sub-block: non-finite count, sum of d^2, chosen codes and residuals. */  \
    static inline __attribute__((always_inline)) void                                            \
    fused_store_##SUF(fused_ctx_##SUF *c, lanes_##SUF *ln, int64_t p0, int64_t nj, const T *x,   \
                      const T *dv, const int32_t *cd) {                                          \
        int64_t q;                                                                               \
        for (q = 0; q < nj; q++) ln->bad += !(x[q] - x[q] == 0);                                 \
        for (q = 0; q < nj; q++) ln->d2[q] += (double)dv[q] * (double)dv[q];                     \
        if (c->codes)                                                                            \
            for (q = 0; q < nj; q++) c->codes[p0 + q] = (uint8_t)cd[q];                          \
        if (c->resid)                                                                            \
            for (q = 0; q < nj; q++) c->resid[p0 + q] = dv[q];                                   \
    }                                                                                            \
                                                                                                 \
    /* One sub-block's factors of one kind (LRS or HRS), one row per bit cell: map's (nj weights \
     * x N cells from weight p0), or `ideal` (1 for LRS, 0 for HRS) without a map and in the     \
     * padded tail. */                                                                           \
    static inline __attribute__((always_inline)) void                                            \
    cell_rows_##SUF(T (*rows)[FU_J], const T *map, int64_t p0, int64_t nj, const int64_t N,      \
                    T ideal) {                                                                   \
        int64_t q, i;                                                                            \
        if (map) {                                                                               \
            const T *src = map + p0 * N;                                                         \
            for (q = 0; q < nj; q++)                                                             \
                for (i = 0; i < N; i++) rows[i][q] = src[q * N + i];                             \
            for (; q < FU_J; q++)                                                                \
                for (i = 0; i < N; i++) rows[i][q] = ideal;                                      \
        } else {                                                                                 \
            for (i = 0; i < N; i++)                                                              \
                for (q = 0; q < FU_J; q++) rows[i][q] = ideal;                                   \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* The nearest deployable code (as T, in bestf) of each of the nj weights of a sub-block:    \
     * xb the weights less their HRS current, e[i] the step of cell i, s0/s1 the stuck masks     \
     * (looked at with flt), lv the row's L levels. KV groups of VL weights at a time            \
     * (independent chains of compare-and-select); codes in ascending order, P[S] = P[S without  \
     * its lowest bit] + e_(lowest bit), and a strict comparison keeps the lowest of equally     \
     * near codes. */                                                                            \
    static inline __attribute__((always_inline)) void                                            \
    fused_var_search_##SUF(const T *xb, const IT *s0, const IT *s1, T (*e)[FU_J], const T *lv,   \
                           const int64_t L, int flt, int64_t nj, T *bestf) {                     \
        const int64_t VL = (int64_t)(32 / sizeof(T));                                            \
        const vi_##SUF sgn = (vi_##SUF){0} + (IT)((uint64_t)1 << (8 * sizeof(IT) - 1));          \
        int64_t q0, s;                                                                           \
        for (q0 = 0; q0 < nj; q0 += KV * VL) {                                                   \
            vt_##SUF xv[KV], best[KV], bd[KV], P[256][KV];                                       \
            vi_##SUF m0[KV], m1[KV];                                                             \
            int64_t kk;                                                                          \
            for (kk = 0; kk < KV; kk++) {                                                        \
                memcpy(&xv[kk], xb + q0 + kk * VL, sizeof(xv[kk]));                              \
                memcpy(&m0[kk], s0 + q0 + kk * VL, sizeof(m0[kk]));                              \
                memcpy(&m1[kk], s1 + q0 + kk * VL, sizeof(m1[kk]));                              \
                P[0][kk] = (vt_##SUF){0};                                                        \
                best[kk] = (vt_##SUF){0};                                                        \
                bd[kk] = (vt_##SUF){0} + (T)INFINITY;                                            \
            }                                                                                    \
            for (s = 0; s < L; s++) {                                                            \
                IT code = (IT)s;                                                                 \
                vt_##SUF cf = (vt_##SUF){0} + (T)s;                                              \
                T lvs = lv[s];                                                                   \
                if (s) {                                                                         \
                    int b = __builtin_ctzll((unsigned long long)s);                              \
                    int64_t par = s & (s - 1);                                                   \
                    for (kk = 0; kk < KV; kk++) {                                                \
                        vt_##SUF ek;                                                             \
                        memcpy(&ek, e[b] + q0 + kk * VL, sizeof(ek));                            \
                        P[s][kk] = P[par][kk] + ek;                                              \
                    }                                                                            \
                }                                                                                \
                for (kk = 0; kk < KV; kk++) {                                                    \
                    vt_##SUF d = (vt_##SUF)((vi_##SUF)(xv[kk] - (lvs + P[s][kk])) & ~sgn);       \
                    vi_##SUF upd = d < bd[kk];                                                   \
                    if (flt) upd &= ((code & m0[kk]) | (~code & m1[kk])) == 0;                   \
                    bd[kk] = (vt_##SUF)((upd & (vi_##SUF)d) | (~upd & (vi_##SUF)bd[kk]));        \
                    best[kk] =                                                                   \
                        (vt_##SUF)((upd & (vi_##SUF)cf) | (~upd & (vi_##SUF)best[kk]));          \
                }                                                                                \
            }                                                                                    \
            for (kk = 0; kk < KV; kk++)                                                          \
                memcpy(bestf + q0 + kk * VL, &best[kk], sizeof(best[kk]));                       \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* Variability (with or without stuck bits): every code's deployed value level[S] + sum_i    \
     * r_i hrs_i + sum_i S_i e_i, e_i = r_i (lrs_i - 1 - hrs_i); among equally near values       \
     * the lowest code wins (as torch's argmin over codes). N is a constant at each call site    \
     * (a switch below), so the loops over the cells unroll. */                                  \
    static inline __attribute__((always_inline)) void                                            \
    fused_var_##SUF(fused_ctx_##SUF *c, lanes_##SUF *ln, int64_t g, int64_t c0, int64_t c1,      \
                    const int64_t N) {                                                           \
        const int64_t L = (int64_t)1 << N;                                                       \
        const T *lv = c->levels + g * L, *rg = c->r + g * N;                                     \
        int flt = c->sa0 || c->sa1, sums = c->psums != NULL;                                     \
        int64_t j, i, q;                                                                         \
        T rr[8];                                                                                 \
        for (i = 0; i < N; i++) rr[i] = rg[i];                                                   \
        for (j = c0; j < c1; j += FU_J) {                                                        \
            int64_t nj = c1 - j < FU_J ? c1 - j : FU_J, p0 = g * c->t.M + j;                     \
            const T *x = c->w + p0;                                                              \
            T A[8][FU_J], H[8][FU_J], e[8][FU_J], base[FU_J], xs[FU_J], xb[FU_J], bestf[FU_J];   \
            T dv[FU_J], dev[FU_J];                                                               \
            IT s0[FU_J], s1[FU_J];                                                               \
            int32_t cd[FU_J];                                                                    \
            /* The cells' factors, one row per cell (an absent map: its ideal value); the tail   \
             * of a short sub-block is padded with harmless values. */                           \
            for (q = 0; q < FU_J; q++) xs[q] = q < nj ? x[q] : 0;                                \
            cell_rows_##SUF(A, c->lrs, p0, nj, N, 1);                                            \
            cell_rows_##SUF(H, c->hrs, p0, nj, N, 0);                                            \
            for (q = 0; q < FU_J; q++) {                                                         \
                base[q] = 0;                                                                     \
                s0[q] = c->sa0 && q < nj ? c->sa0[p0 + q] : 0;                                   \
                s1[q] = c->sa1 && q < nj ? c->sa1[p0 + q] : 0;                                   \
            }                                                                                    \
            for (i = 0; i < N; i++)                                                              \
                for (q = 0; q < FU_J; q++) {                                                     \
                    e[i][q] = rr[i] * (A[i][q] - 1 - H[i][q]);                                   \
                    base[q] += rr[i] * H[i][q];                                                  \
                }                                                                                \
            /* Candidate S is compared as |(x - sum_i r_i hrs_i) - (level[S] + sum_i S_i e_i)|:  \
             * on an ideal device exactly |x - level[S]|. */                                     \
            for (q = 0; q < FU_J; q++) xb[q] = xs[q] - base[q];                                  \
            fused_var_search_##SUF(xb, s0, s1, e, lv, L, flt, nj, bestf);                        \
            /* The chosen code's deployed value as deployed_values computes it (a weight on it   \
             * has distance 0 exactly): level + sum_i (S_i (lrs_i - 1) + (1 - S_i) hrs_i) r_i.   \
             */                                                                                  \
            for (q = 0; q < nj; q++) {                                                           \
                cd[q] = (int32_t)bestf[q];                                                       \
                dev[q] = 0;                                                                      \
            }                                                                                    \
            for (i = 0; i < N; i++)                                                              \
                for (q = 0; q < nj; q++) {                                                       \
                    T bit = (T)((cd[q] >> i) & 1);                                               \
                    dev[q] += (bit * (A[i][q] - 1) + (1 - bit) * H[i][q]) * rr[i];               \
                }                                                                                \
            for (q = 0; q < nj; q++) dv[q] = x[q] - (lv[cd[q]] + dev[q]);                        \
            if (sums) {                                                                          \
                for (q = 0; q < nj; q++) ln->s[N][q] += (double)dv[q];                           \
                for (i = 0; i < N; i++)                                                          \
                    for (q = 0; q < nj; q++) {                                                   \
                        T bit = (T)((cd[q] >> i) & 1);                                           \
                        T coef = bit * A[i][q] + (1 - bit) * H[i][q];                            \
                        ln->s[i][q] += (double)dv[q] * (double)coef;                             \
                    }                                                                            \
            }                                                                                    \
            fused_store_##SUF(c, ln, p0, nj, x, dv, cd);                                         \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* No variability: the nearest ideal level through the sorted thresholds; a weight with a    \
     * stuck bit takes its nearest reachable level (codes in ascending order, the lowest wins a  \
     * tie). Residuals are summed per code; r and c follow through the code's bits at the end.   \
     */                                                                                          \
    static inline __attribute__((always_inline)) void                                            \
    fused_ideal_##SUF(fused_ctx_##SUF *c, lanes_##SUF *ln, double (*bins)[256], int64_t g,       \
                      int64_t c0, int64_t c1) {                                                  \
        const int64_t L = c->L, nt = c->nt, VL = (int64_t)(32 / sizeof(T));                      \
        const vi_##SUF sgn = (vi_##SUF){0} + (IT)((uint64_t)1 << (8 * sizeof(IT) - 1));          \
        const T *lv = c->levels + g * L, *tg = c->thr + g * nt;                                  \
        const uint8_t *pg = c->perm + g * L;                                                     \
        int flt = c->sa0 || c->sa1, sums = c->psums != NULL;                                     \
        int64_t j, q, s;                                                                         \
        for (j = c0; j < c1; j += FU_J) {                                                        \
            int64_t nj = c1 - j < FU_J ? c1 - j : FU_J, p0 = g * c->t.M + j;                     \
            const T *x = c->w + p0;                                                              \
            T dv[FU_J];                                                                          \
            int32_t cnt[FU_J], cd[FU_J];                                                         \
            sorted_index_##SUF(x, nj, tg, nt, &c->lut, g, cnt);                                  \
            for (q = 0; q < nj; q++) cd[q] = pg[cnt[q]];                                         \
            if (flt) {                                                                           \
                /* The weights with a stuck bit, gathered without branches; a padded tail. */    \
                T fx[FU_J + 8], fb[FU_J + 8];                                                    \
                IT f0[FU_J + 8], f1[FU_J + 8];                                                   \
                int32_t fi[FU_J + 8];                                                            \
                int64_t nf = 0, f;                                                               \
                for (q = 0; q < nj; q++) {                                                       \
                    IT a0 = c->sa0 ? c->sa0[p0 + q] : 0, a1 = c->sa1 ? c->sa1[p0 + q] : 0;       \
                    fi[nf] = (int32_t)q;                                                         \
                    fx[nf] = x[q];                                                               \
                    f0[nf] = a0;                                                                 \
                    f1[nf] = a1;                                                                 \
                    nf += (a0 | a1) != 0;                                                        \
                }                                                                                \
                for (f = nf; f < nf + VL; f++) {                                                 \
                    fx[f] = 0;                                                                   \
                    f0[f] = f1[f] = 0;                                                           \
                }                                                                                \
                for (f = 0; f < nf; f += VL) {                                                   \
                    vt_##SUF xv, best = {0}, bd = (vt_##SUF){0} + (T)INFINITY;                   \
                    vi_##SUF m0, m1;                                                             \
                    memcpy(&xv, fx + f, sizeof(xv));                                             \
                    memcpy(&m0, f0 + f, sizeof(m0));                                             \
                    memcpy(&m1, f1 + f, sizeof(m1));                                             \
                    for (s = 0; s < L; s++) {                                                    \
                        IT code = (IT)s;                                                         \
                        vt_##SUF d = (vt_##SUF)((vi_##SUF)(xv - lv[s]) & ~sgn);                  \
                        vt_##SUF cf = (vt_##SUF){0} + (T)code;                                   \
                        vi_##SUF upd = (d < bd) & (((code & m0) | (~code & m1)) == 0);           \
                        bd = (vt_##SUF)((upd & (vi_##SUF)d) | (~upd & (vi_##SUF)bd));            \
                        best = (vt_##SUF)((upd & (vi_##SUF)cf) | (~upd & (vi_##SUF)best));       \
                    }                                                                            \
                    memcpy(fb + f, &best, sizeof(best));                                         \
                }                                                                                \
                for (f = 0; f < nf; f++) cd[fi[f]] = (int32_t)fb[f];                             \
            }                                                                                    \
            for (q = 0; q < nj; q++) dv[q] = x[q] - lv[cd[q]];                                   \
            if (sums)                                                                            \
                for (q = 0; q < nj; q++) bins[q & 3][cd[q]] += (double)dv[q];                    \
            fused_store_##SUF(c, ln, p0, nj, x, dv, cd);                                         \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    QFV_CLONES static void fused_chunk_##SUF(void *vctx, int64_t k) {                            \
        fused_ctx_##SUF *c = (fused_ctx_##SUF *)vctx;                                            \
        int64_t g, c0, c1, i, q, N = c->N, L = c->L;                                             \
        int var = c->lrs || c->hrs, sums = c->psums != NULL;                                     \
        double pr[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, tot = 0;                                     \
        double bins[4][256];                                                                     \
        lanes_##SUF ln;                                                                          \
        chunk_range(&c->t, k, &g, &c0, &c1);                                                     \
        memset(&ln, 0, sizeof(ln));                                                              \
        if (!var) {                                                                              \
            if (sums) memset(bins, 0, sizeof(bins));                                             \
            fused_ideal_##SUF(c, &ln, bins, g, c0, c1);                                          \
            if (sums) bins_to_bit_sums(bins, L, N, pr);                                          \
        } else {                                                                                 \
            switch (N) {                                                                         \
            case 1: fused_var_##SUF(c, &ln, g, c0, c1, 1); break;                                \
            case 2: fused_var_##SUF(c, &ln, g, c0, c1, 2); break;                                \
            case 3: fused_var_##SUF(c, &ln, g, c0, c1, 3); break;                                \
            case 4: fused_var_##SUF(c, &ln, g, c0, c1, 4); break;                                \
            case 5: fused_var_##SUF(c, &ln, g, c0, c1, 5); break;                                \
            case 6: fused_var_##SUF(c, &ln, g, c0, c1, 6); break;                                \
            case 7: fused_var_##SUF(c, &ln, g, c0, c1, 7); break;                                \
            default: fused_var_##SUF(c, &ln, g, c0, c1, 8); break;                               \
            }                                                                                    \
            if (sums)                                                                            \
                for (i = 0; i <= N; i++)                                                         \
                    for (q = 0; q < FU_J; q++) pr[i] += ln.s[i][q];                              \
        }                                                                                        \
        for (q = 0; q < FU_J; q++) tot += ln.d2[q];                                              \
        c->part[k] = tot;                                                                        \
        if (sums)                                                                                \
            for (i = 0; i <= N; i++) c->psums[k * (N + 1) + i] = pr[i];                          \
        c->bad[k] = ln.bad;                                                                      \
    }                                                                                            \
                                                                                                 \
    /* *total = sum (w - v)^2 over each weight's nearest deployable value v (summed in double in \
     * a fixed order); codes (uint8, if given) the chosen codes; resid (if given) w - v; sums    \
     * (if given, G x (N + 1) doubles) per row sum (w - v) coef_i for i < N, then sum (w - v),   \
     * with coef_i = S_i lrs_i + (1 - S_i) hrs_i. Without variability, thr (G x (L - 1)) and     \
     * perm (G x L) are the sorted thresholds and the code of each sorted level                  \
     * (levels.sort_levels). Returns the number of non-finite weights, -1 when out of memory, -2 \
     * for bad arguments. */                                                                     \
    int64_t qfv_aware_fused_##SUF(const T *w, int64_t G, int64_t M, int64_t N, const T *levels,  \
                                  const T *r, const T *thr, const uint8_t *perm,                 \
                                  const uint8_t *sa0, const uint8_t *sa1, const T *lrs,          \
                                  const T *hrs, uint8_t *codes,                                  \
                                  T *resid, double *sums, double *total, int64_t block,          \
                                  int64_t threads) {                                             \
        fused_ctx_##SUF c;                                                                       \
        int64_t n, k, bad = 0, width = N + 1;                                                    \
        int var = lrs || hrs;                                                                    \
        if (N < 1 || N > 8 || (!var && (!thr || !perm))) return -2;                              \
        c = (fused_ctx_##SUF){LAYER_FIELDS(w, G, M, N, levels, r, lrs, hrs, block), .thr = thr,  \
                              .perm = perm, .sa0 = sa0, .sa1 = sa1,                              \
                              .nt = ((int64_t)1 << N) - 1, .codes = codes, .resid = resid};      \
        n = G * c.t.per_row;                                                                     \
        if (!var && c.nt > COUNT_MAX && lut_build_##SUF(&c.lut, thr, G, c.nt)) {                 \
            lut_free(&c.lut);                                                                    \
            return -1;                                                                           \
        }                                                                                        \
        c.part = (double *)calloc((size_t)(n > 0 ? n : 1), sizeof(double));                      \
        c.bad = (int64_t *)calloc((size_t)(n > 0 ? n : 1), sizeof(int64_t));                     \
        c.psums = sums ? (double *)calloc((size_t)((n > 0 ? n : 1) * width), sizeof(double))     \
                       : NULL;                                                                   \
        if (!c.part || !c.bad || (sums && !c.psums)) {                                           \
            free_chunk_buffers(c.part, c.bad, c.psums, &c.lut);                                  \
            return -1;                                                                           \
        }                                                                                        \
        run_chunks(fused_chunk_##SUF, &c, n, threads);                                           \
        {                                                                                        \
            double s = 0.0;                                                                      \
            for (k = 0; k < n; k++) s += c.part[k];                                              \
            if (total) *total = s;                                                               \
        }                                                                                        \
        for (k = 0; k < n; k++) bad += c.bad[k];                                                 \
        if (sums) add_chunk_rows(sums, c.psums, G, n, c.t.per_row, width);                       \
        free_chunk_buffers(c.part, c.bad, c.psums, &c.lut);                                      \
        return bad;                                                                              \
    }                                                                                            \
                                                                                                 \
    typedef struct {                                                                             \
        tiling_t t;                                                                              \
        const T *x;                                                                              \
        T s;                                                                                     \
        T *out;                                                                                  \
    } scale_ctx_##SUF;                                                                           \
                                                                                                 \
    QFV_CLONES static void scale_chunk_##SUF(void *vctx, int64_t k) {                            \
        scale_ctx_##SUF *c = (scale_ctx_##SUF *)vctx;                                            \
        int64_t g, c0, c1, j;                                                                    \
        const T *x;                                                                              \
        T *o, s = c->s;                                                                          \
        chunk_range(&c->t, k, &g, &c0, &c1);                                                     \
        x = c->x + g * c->t.M;                                                                   \
        o = c->out + g * c->t.M;                                                                 \
        for (j = c0; j < c1; j++) o[j] = x[j] * s;                                               \
    }                                                                                            \
                                                                                                 \
    /* out = x * (T)s over n elements (the regularizer's d/dw from its saved residuals). */      \
    int64_t qfv_scale_##SUF(const T *x, int64_t n, double s, T *out, int64_t block,              \
                            int64_t threads) {                                                   \
        scale_ctx_##SUF c;                                                                       \
        c = (scale_ctx_##SUF){.t = make_tiling(1, n, block), .x = x, .s = (T)s, .out = out};     \
        run_chunks(scale_chunk_##SUF, &c, c.t.per_row, threads);                                 \
        return 0;                                                                                \
    }

DEFINE_DEPLOYED(f32, float)
DEFINE_DEPLOYED(f64, double)
DEFINE_FUSED(f32, float, int32_t)
DEFINE_FUSED(f64, double, int64_t)
