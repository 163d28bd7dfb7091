// Batch-invariant linear layer of generated tokens on the CPU, bfloat16:
// out[m, j] = bfloat16(x[m, :] . w[j, :] + bias[j]).
//
// Each output is one chain over the input width in chunks of 32 values into 16 float32 lanes (with
// avx512_bf16 one vdpbf16ps per chunk; without it, two FMAs of the chunk's widened halves), then the
// fixed lane-sum tree, then the bias, then one rounding to bfloat16: the same instructions for an
// output whatever rows share the call. The call's row count only chooses how outputs are tiled
// (weight rows and input rows per tile), which no output's arithmetic sees. Each weight row comes
// from memory once for all the call's rows, so a tree's tokens stream the weights once, as one
// token does; past a few rows the arithmetic costs more than the memory (the demo LLM's linear
// layers on 2 Zen 4 cores: 9.0 ms for 1 row, 15.2 for 10, 21.3 for 16).
//
// Built with -ffp-contract=off: an FMA happens only where fma16 (or vdpbf16ps) asks for one.
#include "cpu_vectors.h"

static constexpr int PREFETCH = 4096;  // bytes ahead in each weight row's stream (2-core EPYC, measured)

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

static inline h16 to_bf16(v16 x) {  // round to nearest even, NaN kept quiet (no DAZ/FTZ)
    u16 u = (u16)x;
    u16 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = ((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r;
    return __builtin_convertvector(r, h16);
}

// The tile's sums (acc[r * NB + i]: row m0 + r, output j0 + i) plus the bias, rounded once, stored.
template <int NB, int MG>
static inline void finish(const v16* acc, const uint16_t* bias, uint16_t* out, int64_t n, int64_t m0, int64_t j0) {
    v16 sums = reduce16(acc);
    if (bias) {
        uint16_t lanes[16] = {};
        for (int r = 0; r < MG; r++) memcpy(lanes + r * NB, bias + j0, NB * sizeof(uint16_t));
        sums = sums + widen16(lanes);
    }
    h16 rounded = to_bf16(sums);
    for (int r = 0; r < MG; r++) memcpy(out + (m0 + r) * n + j0, (const uint16_t*)&rounded + r * NB, NB * sizeof(uint16_t));
}

// Outputs j0 .. j0+NB-1 of rows m0 .. m0+MG-1 (NB * MG <= 16), all chains advancing chunk by chunk
// together: up to 16 independent chains, for calls bound by arithmetic (over 16 rows). The first row
// group fetches the weights ahead; the later ones find them in cache.
template <int NB, int MG, bool FETCH>
static inline void tile(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                        int64_t k, int64_t n, int64_t m0, int64_t j0) {
    v16 acc[16] = {};
    for (int64_t c = 0; c < k; c += 32) {
        if (FETCH)
            for (int i = 0; i < NB; i++) __builtin_prefetch((const char*)(w + (j0 + i) * k + c) + PREFETCH, 0, 3);
        for (int r = 0; r < MG; r++)
            for (int i = 0; i < NB; i++) acc[r * NB + i] = step(acc[r * NB + i], x + (m0 + r) * k + c, w + (j0 + i) * k + c);
    }
    finish<NB, MG>(acc, bias, out, n, m0, j0);
}

// The same tile with one output's chains run over the whole input width before the next output's
// start: the weights stream in memory order while the arithmetic runs on them (up to 16 rows).
template <int NB, int MG>
static inline void stream(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                          int64_t k, int64_t n, int64_t m0, int64_t j0) {
    v16 acc[16] = {};
    for (int i = 0; i < NB; i++) {
        const uint16_t* wi = w + (j0 + i) * k;
        for (int64_t c = 0; c < k; c += 32) {
            __builtin_prefetch((const char*)(wi + c) + PREFETCH, 0, 3);
            for (int r = 0; r < MG; r++) acc[r * NB + i] = step(acc[r * NB + i], x + (m0 + r) * k + c, wi + c);
        }
    }
    finish<NB, MG>(acc, bias, out, n, m0, j0);
}

// Rows m0 .. m0+count-1 (count <= MG) of output j, streamed.
template <int MG>
static inline void rows_of(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t k,
                           int64_t n, int64_t m0, int64_t count, int64_t j) {
    if constexpr (MG > 1) {
        if (count < MG) return rows_of<MG - 1>(x, w, bias, out, k, n, m0, count, j);
    }
    stream<1, MG>(x, w, bias, out, k, n, m0, j);
}

// Up to 4 rows: tiles of 16 / MG outputs, streamed (memory-bound: fewer, larger stores).
template <int MG>
static void few_rows(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t k, int64_t n) {
    constexpr int NB = MG == 1 ? 16 : MG == 2 ? 8 : 4;
    int64_t blocks = n / NB;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) stream<NB, MG>(x, w, bias, out, k, n, 0, b * NB);
    for (int64_t j = blocks * NB; j < n; j++) stream<1, MG>(x, w, bias, out, k, n, 0, j);
}

// Every row of outputs j0 .. j0+3 in 4 x 4 tiles (the remainder's rows in a narrower one).
template <int MG>
static inline void rest(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                        int64_t k, int64_t n, int64_t m0, int64_t j0) {
    if (m0 == 0) tile<4, MG, true>(x, w, bias, out, k, n, m0, j0);
    else tile<4, MG, false>(x, w, bias, out, k, n, m0, j0);
}

// x [m, k], w [n, k], bias [n] or null, out [m, n]: contiguous bfloat16. Returns 2 where k is not a
// multiple of 32. The row count picks the tiling, never an output's arithmetic: up to 16 rows one
// streamed pass over the weights (memory and arithmetic overlap); past that 4 x 4 tiles, whose 16
// chains per 8 loads suit a call bound by arithmetic.
extern "C" int rows_linear(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                           int64_t m, int64_t k, int64_t n) {
    if (k % 32) return 2;
    switch (m) {
        case 0: return 0;
        case 1: few_rows<1>(x, w, bias, out, k, n); return 0;
        case 2: few_rows<2>(x, w, bias, out, k, n); return 0;
        case 3: few_rows<3>(x, w, bias, out, k, n); return 0;
        case 4: few_rows<4>(x, w, bias, out, k, n); return 0;
    }
    if (m <= 16) {
        #pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < n; j++) rows_of<16>(x, w, bias, out, k, n, 0, m, j);
        return 0;
    }
    int64_t blocks = n / 4;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= m; m0 += 4) rest<4>(x, w, bias, out, k, n, m0, b * 4);
        switch (m - m0) {
            case 3: rest<3>(x, w, bias, out, k, n, m0, b * 4); break;
            case 2: rest<2>(x, w, bias, out, k, n, m0, b * 4); break;
            case 1: rest<1>(x, w, bias, out, k, n, m0, b * 4); break;
        }
    }
    for (int64_t j = blocks * 4; j < n; j++)
        for (int64_t m0 = 0; m0 < m; m0 += 16) rows_of<16>(x, w, bias, out, k, n, m0, m - m0 < 16 ? m - m0 : 16, j);
    return 0;
}
