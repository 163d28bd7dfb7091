// Batch-invariant linear layer of generated tokens on the CPU, bfloat16:
// out[m, j] = bfloat16(x[m, :] . w[j, :] + bias[j]).
//
// Each output is one chain over the input width in chunks of 32 values into 16 float32 lanes (with
// avx512_bf16 one vdpbf16ps per chunk; without it, two FMAs of the chunk's widened halves), then the
// fixed lane-sum tree, then the bias, then one rounding to bfloat16: the same instructions for an
// output whatever rows share the call. The call's row count only chooses how outputs are tiled
// (weight rows and input rows per tile), which no output's arithmetic sees. Every tile reads its
// weight rows once for all its input rows, so a forward of a 10-token tree streams the weights
// from memory as a forward of one token does: the cost a memory-bound decoder pays per step.
//
// Built with -ffp-contract=off: an FMA happens only where fma16 (or vdpbf16ps) asks for one.
#include "cpu_vectors.h"

static constexpr int PREFETCH = 4096;  // bytes ahead in each weight row's stream (2-core EPYC, measured)

static inline uint16_t to_bf16(float f) {  // round to nearest even, NaN kept quiet (no DAZ/FTZ)
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline v16 step(v16 acc, const uint16_t* x, const uint16_t* w) {
#if defined(__AVX512BF16__)
    __m512i a, b;
    memcpy(&a, x, sizeof a);
    memcpy(&b, w, sizeof b);
    return (v16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
#else
    acc = fma16(widen16(x), widen16(w), acc);
    return fma16(widen16(x + 16), widen16(w + 16), acc);
#endif
}

#define ORDER 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15  // where each accumulator's sum lands

// The lane sums of 16 accumulators at once: lane l of the result is hsum(acc[l]), by the same
// additions in the same association (x[i] + x[i+8], then + 4 apart, then (0 + 2) + (1 + 3)).
static inline v16 reduce16(const v16* acc) {
    v16 a[8], b[4], c[2];
    for (int p = 0; p < 8; p++)  // lanes 0-7: acc[2p]'s halves summed, 8-15: acc[2p+1]'s
        a[p] = __builtin_shufflevector(acc[2 * p], acc[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + __builtin_shufflevector(acc[2 * p], acc[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int p = 0; p < 4; p++)  // 4-lane groups: acc 4p, 4p+2, 4p+1, 4p+3
        b[p] = __builtin_shufflevector(a[2 * p], a[2 * p + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
             + __builtin_shufflevector(a[2 * p], a[2 * p + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int p = 0; p < 2; p++)  // lane pairs: (0 + 2, 1 + 3) of each group
        c[p] = __builtin_shufflevector(b[2 * p], b[2 * p + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
             + __builtin_shufflevector(b[2 * p], b[2 * p + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    v16 d = __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
          + __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    return __builtin_shufflevector(d, d, ORDER);
}

static inline h16 to_bf16(v16 x) {  // to_bf16 lane by lane
    u16 u = (u16)x;
    u16 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = ((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r;
    return __builtin_convertvector(r, h16);
}

// Outputs j0 .. j0+NB-1 of rows m0 .. m0+MG-1: NB = 1 sums each output on its own (memory-bound
// calls), NB * MG <= 16 sums the tile's outputs together (reduce16), the same arithmetic.
template <int NB, int MG, bool FETCH>
static inline void tile(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                        int64_t k, int64_t n, int64_t m0, int64_t j0) {
    v16 acc[NB * MG > 1 ? 16 : 1] = {};
    for (int64_t c = 0; c < k; c += 32) {
        if (FETCH)
            for (int i = 0; i < NB; i++) __builtin_prefetch((const char*)(w + (j0 + i) * k + c) + PREFETCH, 0, 3);
        for (int r = 0; r < MG; r++)
            for (int i = 0; i < NB; i++) acc[r * NB + i] = step(acc[r * NB + i], x + (m0 + r) * k + c, w + (j0 + i) * k + c);
    }
    if (NB == 1) {
        float b = 0.0f;
        if (bias) {
            uint32_t u = (uint32_t)bias[j0] << 16;
            memcpy(&b, &u, 4);
        }
        for (int r = 0; r < MG; r++) out[(m0 + r) * n + j0] = to_bf16(hsum(acc[r]) + b);
        return;
    }
    v16 sums = reduce16(acc);
    if (bias) {
        uint16_t lanes[16] = {};
        for (int r = 0; r < MG; r++) memcpy(lanes + r * NB, bias + j0, NB * sizeof(uint16_t));
        sums = sums + widen16(lanes);
    }
    h16 rounded = to_bf16(sums);
    for (int r = 0; r < MG; r++) memcpy(out + (m0 + r) * n + j0, (const uint16_t*)&rounded + r * NB, NB * sizeof(uint16_t));
}

// Every row of outputs j0 .. j0+NB-1, in tiles of up to MG rows; the first tile fetches ahead.
template <int NB, int MG>
static inline void outputs(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                           int64_t m, int64_t k, int64_t n, int64_t j0) {
    int64_t m0 = 0;
    for (; m0 + MG <= m; m0 += MG) {
        if (m0 == 0) tile<NB, MG, true>(x, w, bias, out, k, n, m0, j0);
        else tile<NB, MG, false>(x, w, bias, out, k, n, m0, j0);
    }
    bool first = m0 == 0;
    switch (m - m0) {
        case 3: first ? tile<NB, 3, true>(x, w, bias, out, k, n, m0, j0) : tile<NB, 3, false>(x, w, bias, out, k, n, m0, j0); break;
        case 2: first ? tile<NB, 2, true>(x, w, bias, out, k, n, m0, j0) : tile<NB, 2, false>(x, w, bias, out, k, n, m0, j0); break;
        case 1: first ? tile<NB, 1, true>(x, w, bias, out, k, n, m0, j0) : tile<NB, 1, false>(x, w, bias, out, k, n, m0, j0); break;
    }
}

// x [m, k], w [n, k], bias [n] or null, out [m, n]: contiguous bfloat16. Returns 2 where k is not a
// multiple of 32.
extern "C" int rows_linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                           int64_t m, int64_t k, int64_t n) {
    if (k % 32) return 2;
    if (m <= 4) {  // memory-bound: one weight row per tile, every row at once
        #pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < n; j++) outputs<1, 4>(x, w, bias, out, m, k, n, j);
        return 0;
    }
    int64_t blocks = n / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) outputs<4, 4>(x, w, bias, out, m, k, n, b * 4);
    for (int64_t j = blocks * 4; j < n; j++) outputs<1, 4>(x, w, bias, out, m, k, n, j);
    return 0;
}
