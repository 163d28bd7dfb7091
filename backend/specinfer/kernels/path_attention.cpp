// Batch-invariant attention on the CPU: each query sums over its own keys in one fixed order.
//
// Query t of row b sees the committed slots [0, prefix[b, t]) and then the npath[b, t] slots
// path[b, t, :] (its tree path, root first, ending at itself): together its "virtual" keys, in the
// order incremental decoding would have cached them. Every number a query's output depends on is
// computed by the same instructions in the same order whatever else is in the call: a score is one
// dot product over the head width (16 lanes, then a fixed halving sum), the softmax's sum runs over
// virtual keys in 16-lane chunks, and the weighted sum over values runs key by key in virtual order.
// So a node of a tree gets, bit for bit, what decoding its path one token at a time gets. Queries of a
// row that share a prefix share its K/V loads, which changes no query's arithmetic.
//
// Built with -ffp-contract=off: an FMA happens only where fma16 asks for one, everywhere alike.
#include "cpu_vectors.h"

static inline float hmax(v16 x) {
    float m = x[0];
    for (int i = 1; i < 16; i++) m = x[i] > m ? x[i] : m;
    return m;
}

// exp(x) for x <= 0 (Cephes' expf polynomial); 0 below -87 (and for -inf).
static inline v16 exp16(v16 x) {
    const v16 lo = splat(-87.0f);
    i16 under = x < lo;
    x = under ? lo : x;
    v16 n = (x * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);  // round to nearest
    v16 r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);
    v16 p = splat(1.9875691500e-4f);
    p = fma16(p, r, splat(1.3981999507e-3f));
    p = fma16(p, r, splat(8.3334519073e-3f));
    p = fma16(p, r, splat(4.1665795894e-2f));
    p = fma16(p, r, splat(1.6666665459e-1f));
    p = fma16(p, r, splat(5.0000001201e-1f));
    p = fma16(p, r * r, r) + splat(1.0f);
    i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
    v16 y = p * (v16)e;
    return under ? v16{} : y;
}

// One K or V row of ND * 16 values, as float32 vectors.
template <int ND>
static inline void load_row(const void* base, int bf16, int64_t at, v16* out) {
    if (bf16) {
        const uint16_t* p = (const uint16_t*)base + at;
        for (int c = 0; c < ND; c++) out[c] = widen16(p + 16 * c);
    } else {
        memcpy(out, (const float*)base + at, sizeof(v16) * ND);
    }
}

// The dot products of q with 16 keys (rows of k; lane r: key r): each a 16-lane FMA chain over the
// head width, then its lanes summed by reduce16, the same tree for every key.
template <int ND>
static inline v16 dot16(const v16* q, const v16* k) {
    v16 a[16];
    for (int r = 0; r < 16; r++) {
        a[r] = q[0] * k[r * ND];
        for (int c = 1; c < ND; c++) a[r] = fma16(q[c], k[r * ND + c], a[r]);
    }
    return reduce16(a);
}

// The first ``full`` keys' values weighted by M queries' rows of ``w`` (``width`` apart), added to
// ``acc``: key by key, each query's sum in key order; the M x ND sums stay in registers.
template <int ND, int M>
static inline void weigh(const void* v, int bf16, int64_t base, int64_t slot_stride, int64_t full, const float* w,
                         int64_t width, v16 (*acc)[ND]) {
    v16 sum[M][ND], row[ND];
    for (int i = 0; i < M; i++)
        for (int c = 0; c < ND; c++) sum[i][c] = acc[i][c];
    for (int64_t x = 0; x < full; x++) {
        load_row<ND>(v, bf16, base + x * slot_stride, row);
        for (int i = 0; i < M; i++) {
            const v16 weight = splat(w[i * width + x]);
            for (int c = 0; c < ND; c++) sum[i][c] = fma16(weight, row[c], sum[i][c]);
        }
    }
    for (int i = 0; i < M; i++)
        for (int c = 0; c < ND; c++) acc[i][c] = sum[i][c];
}

struct Args {
    const float* q; const void* k; const void* v; int bf16;
    const int64_t *rows, *prefix, *npath, *path;
    float* out;
    int64_t T, H, KVH, D, S, P;
    float scale;
};

// Row b, query head h: its T queries (one per node). Scores in blocks of 16 virtual keys; keys below
// ``shared`` (the prefix every query with a prefix sees) are loaded once for all of them.
template <int ND>
static int attend_one(const Args& a, int64_t b, int64_t h) {
    constexpr int GROUP = ND <= 4 ? 4 : 2;  // queries whose accumulators stay in registers
    const int64_t T = a.T, kvh = h / (a.H / a.KVH);
    const int64_t* prefix = a.prefix + b * T;
    const int64_t* npath = a.npath + b * T;
    int64_t shared = -1, most = 0;
    for (int64_t t = 0; t < T; t++) {
        if (prefix[t] > 0 && (shared < 0 || prefix[t] < shared)) shared = prefix[t];
        most = prefix[t] + npath[t] > most ? prefix[t] + npath[t] : most;
    }
    if (shared < 0) shared = 0;
    const int64_t width = (most + 15) / 16 * 16, full = shared / 16 * 16;
    v16* qv = (v16*)aligned_alloc(64, sizeof(v16) * (T * ND + 16 * ND));
    float* s = (float*)aligned_alloc(64, sizeof(float) * T * width);
    float* total = (float*)malloc(sizeof(float) * T);
    if (!qv || !s || !total) { free(qv); free(s); free(total); return 1; }
    v16* kb = qv + T * ND;
    const int64_t slot_stride = a.KVH * a.D, base = a.rows[b] * a.S * slot_stride + kvh * a.D;
    for (int64_t t = 0; t < T; t++) memcpy(qv + t * ND, a.q + ((b * T + t) * a.H + h) * a.D, sizeof(v16) * ND);
    auto slot = [&](int64_t t, int64_t x) { return x < prefix[t] ? x : a.path[(b * T + t) * a.P + (x - prefix[t])]; };
    auto from = [&](int64_t t) { return prefix[t] >= shared ? full : 0; };  // where a query's own keys start
    const v16 scale = splat(a.scale);
    for (int64_t x = 0; x < full; x += 16) {
        for (int r = 0; r < 16; r++) load_row<ND>(a.k, a.bf16, base + (x + r) * slot_stride, kb + r * ND);
        for (int64_t t = 0; t < T; t++)
            if (from(t) == full) {
                v16 y = dot16<ND>(qv + t * ND, kb) * scale;
                memcpy(s + t * width + x, &y, sizeof y);
            }
    }
    for (int64_t t = 0; t < T; t++) {
        const int64_t n = prefix[t] + npath[t];
        for (int64_t x = from(t); x < n; x += 16) {
            for (int r = 0; r < 16; r++) {
                if (x + r < n) load_row<ND>(a.k, a.bf16, base + slot(t, x + r) * slot_stride, kb + r * ND);
                else for (int c = 0; c < ND; c++) kb[r * ND + c] = v16{};
            }
            v16 y = dot16<ND>(qv + t * ND, kb) * scale;
            memcpy(s + t * width + x, &y, sizeof y);
        }
    }
    // softmax weights (unnormalised) and their sums, in 16-lane chunks of virtual keys
    for (int64_t t = 0; t < T; t++) {
        const int64_t n = prefix[t] + npath[t];
        float* st = s + t * width;
        for (int64_t x = n; x < width; x++) st[x] = -__builtin_inff();
        v16 m = splat(-__builtin_inff()), sum = v16{};
        for (int64_t x = 0; x < width; x += 16) {
            v16 y;
            memcpy(&y, st + x, sizeof y);
            m = y > m ? y : m;
        }
        const v16 mx = splat(hmax(m));
        for (int64_t x = 0; x < width; x += 16) {
            v16 y;
            memcpy(&y, st + x, sizeof y);
            y = exp16(y - mx);
            memcpy(st + x, &y, sizeof y);
            sum += y;
        }
        total[t] = hsum(sum);
    }
    // the weighted sum of values, key by key in virtual order
    for (int64_t t0 = 0; t0 < T; t0 += GROUP) {
        v16 acc[GROUP][ND] = {}, row[ND];
        const int64_t m = T - t0 < GROUP ? T - t0 : GROUP;
        bool together = true;
        for (int64_t i = 0; i < m; i++) together &= from(t0 + i) == full;
        if (together) {
            const float* w = s + t0 * width;
            switch (m) {
                case 1: weigh<ND, 1>(a.v, a.bf16, base, slot_stride, full, w, width, acc); break;
                case 2: weigh<ND, 2>(a.v, a.bf16, base, slot_stride, full, w, width, acc); break;
                case 3: weigh<ND, 3>(a.v, a.bf16, base, slot_stride, full, w, width, acc); break;
                default: weigh<ND, GROUP>(a.v, a.bf16, base, slot_stride, full, w, width, acc);
            }
        }
        for (int64_t i = 0; i < m; i++) {
            const int64_t t = t0 + i, n = prefix[t] + npath[t];
            for (int64_t x = together ? full : 0; x < n; x++) {
                load_row<ND>(a.v, a.bf16, base + slot(t, x) * slot_stride, row);
                const v16 w = splat(s[t * width + x]);
                for (int c = 0; c < ND; c++) acc[i][c] = fma16(w, row[c], acc[i][c]);
            }
            const v16 z = splat(total[t]);
            float* o = a.out + ((b * T + t) * a.H + h) * a.D;
            for (int c = 0; c < ND; c++) {
                v16 y = acc[i][c] / z;
                memcpy(o + 16 * c, &y, sizeof y);
            }
        }
    }
    free(qv); free(s); free(total);
    return 0;
}

template <int ND>
static int attend_all(const Args& a, int64_t B) {
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) reduction(|: failed)
    for (int64_t task = 0; task < B * a.H; task++) failed |= attend_one<ND>(a, task / a.H, task % a.H);
    return failed;
}

extern "C" int path_attention(const float* q, const void* k, const void* v, int bf16, const int64_t* rows,
                              const int64_t* prefix, const int64_t* npath, const int64_t* path, float* out,
                              int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t D, int64_t S, int64_t P,
                              float scale) {
    Args a{q, k, v, bf16, rows, prefix, npath, path, out, T, H, KVH, D, S, P, scale};
    switch (D) {
        case 16: return attend_all<1>(a, B);
        case 32: return attend_all<2>(a, B);
        case 48: return attend_all<3>(a, B);
        case 64: return attend_all<4>(a, B);
        case 80: return attend_all<5>(a, B);
        case 96: return attend_all<6>(a, B);
        case 112: return attend_all<7>(a, B);
        case 128: return attend_all<8>(a, B);
        default: return 2;
    }
}
