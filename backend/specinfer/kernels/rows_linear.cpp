// Batch-invariant linear layer of generated tokens on the CPU, bfloat16:
// out[m, j] = bfloat16(x[m, :] . w[j, :] + bias[j]).
//
// Each output is one chain over the input width in chunks of 32 values into 16 float32 lanes (with
// avx512_bf16 one vdpbf16ps per chunk; without it, two FMAs of the chunk's widened halves), then the
// fixed lane-sum tree, then the bias, then one rounding to bfloat16: the same instructions for an
// output whatever rows share the call. The call's row count only chooses how outputs are tiled
// (weight rows and input rows per tile), which no output's arithmetic sees.
//
// The weight comes twice: row-major (the layer's own, which prompts' GEMMs read) and packed
// (rows_linear.py's pack: [ceil(n / 4)][k / 32][4][32], four output rows interleaved chunk by chunk,
// rows past n zero). 1 and 2 rows stream the row-major weight, 16 outputs' chains per tile, bound
// by memory. From 3 rows a tile of 4 outputs x up to 4 rows (16 chains, 8 loads per 16 products)
// reads one packed block, one contiguous stream that the prefetcher keeps ahead of the arithmetic;
// 4 separate row streams would not be (the demo LLM's linear layers alone on 2 Zen 4 cores, the
// row-major tiles of fa9c62b against packed blocks: 11.0 / 8.5 ms at 4 rows, 13.5 / 11.2 at 8,
// 21.5 / 16.5 at 16, 34.0 / 28.3 at 32; 8.5 ms at 1 row).
// Each block comes from memory once for all the call's rows: a tree's tokens stream the weights
// once, as one token does.
//
// Built with -ffp-contract=off: an FMA happens only where fma16 (or vdpbf16ps) asks for one.
#include "cpu_vectors.h"

#include <vector>

static constexpr int PREFETCH = 4096;  // bytes ahead in the packed weight's stream (2-core EPYC, measured)
static constexpr int BLOCK = 4;        // weight rows per packed block

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

// Outputs j0 .. j0+NB-1 of rows 0 .. MG-1 from the row-major weight, one output's chains over the
// whole input width before the next output's start: the weights stream in memory order.
template <int NB, int MG>
static inline void stream(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                          int64_t k, int64_t n, int64_t j0) {
    v16 acc[16] = {};
    for (int i = 0; i < NB; i++) {
        const uint16_t* wi = w + (j0 + i) * k;
        for (int64_t c = 0; c < k; c += 32) {
            __builtin_prefetch((const char*)(wi + c) + PREFETCH, 0, 3);
            for (int r = 0; r < MG; r++) acc[r * NB + i] = step(acc[r * NB + i], x + r * k + c, wi + c);
        }
    }
    finish<NB, MG>(acc, bias, out, n, 0, j0);
}

// 1 or 2 rows (MG), bound by memory: tiles of 16 / MG outputs of the row-major weight.
template <int MG>
static void few_rows(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t k, int64_t n) {
    constexpr int NB = 16 / MG;
    const int64_t tiles = n / NB;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) stream<NB, MG>(x, w, bias, out, k, n, t * NB);
    for (int64_t j = tiles * NB; j < n; j++) stream<1, MG>(x, w, bias, out, k, n, j);
}

static inline void fetch(const uint16_t* chunk) {  // one chunk of a block: 4 cache lines, PREFETCH ahead
    for (int l = 0; l < BLOCK; l++) __builtin_prefetch((const char*)chunk + PREFETCH + 64 * l, 0, 3);
}

// Block b (outputs 4 b .. 4 b + 3) of rows m0 .. m0+MG-1 (up to 16 chains), row group g of the
// call's G: one stream, prefetched ahead. Alone (SHARED false, up to 8 rows) the first group fetches
// every chunk and the others find the block in cache. SHARED, each group prefetches every G-th
// chunk, group g from chunk (G - g) % G, so every chunk is fetched once and the stream runs through
// all the groups' arithmetic (one group fetching it all leaves memory idle while the others
// compute: 16 rows 17.2 against 21.0 ms).
template <int MG, bool SHARED>
static inline void tile(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out,
                        int64_t k, int64_t n, int64_t m0, int64_t b, int g, int G) {
    v16 acc[16] = {};
    const uint16_t* block = w + b * BLOCK * k;
    const bool fetching = g == 0;
    int phase = g;
    for (int64_t c = 0; c < k; c += 32) {
        const uint16_t* chunk = block + c * BLOCK;
        if constexpr (SHARED) {
            if (phase == 0) fetch(chunk);
            if (++phase == G) phase = 0;
        } else if (fetching) {
            fetch(chunk);
        }
        for (int r = 0; r < MG; r++)
            for (int i = 0; i < BLOCK; i++) acc[r * BLOCK + i] = step(acc[r * BLOCK + i], x + (m0 + r) * k + c, chunk + i * 32);
    }
    finish<BLOCK, MG>(acc, bias, out, n, m0, b * BLOCK);
}

// Rows m0 .. m0+rows-1 (at most 4) of block b, group g of the call's G.
template <bool SHARED>
static inline void group(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t k,
                         int64_t n, int64_t m0, int64_t rows, int64_t b, int g, int G) {
    switch (rows) {
        case 1: tile<1, SHARED>(x, w, bias, out, k, n, m0, b, g, G); break;
        case 2: tile<2, SHARED>(x, w, bias, out, k, n, m0, b, g, G); break;
        case 3: tile<3, SHARED>(x, w, bias, out, k, n, m0, b, g, G); break;
        default: tile<4, SHARED>(x, w, bias, out, k, n, m0, b, g, G); break;
    }
}

// Every block, in groups of 4 rows (SHARED: the groups share the fetching).
template <bool SHARED>
static void groups(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t m, int64_t k,
                   int64_t n, int64_t count) {
    const int G = (int)((m + 3) / 4);
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < count; b++) {
        int g = 0;
        for (; 4 * g + 4 <= m; g++) group<SHARED>(x, w, bias, out, k, n, 4 * g, 4, b, g, G);
        if (m > 4 * g) group<SHARED>(x, w, bias, out, k, n, 4 * g, m - 4 * g, b, g, G);
    }
}

// The first `count` blocks (outputs 0 .. 4 count - 1) of every row, in groups of 4 rows (the block
// stays in cache for the later groups).
static void blocks(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* out, int64_t m, int64_t k,
                   int64_t n, int64_t count) {
    if (m <= 8) groups<false>(x, w, bias, out, m, k, n, count);
    else groups<true>(x, w, bias, out, m, k, n, count);
}

// x [m, k], w [n, k] row-major and packed ([ceil(n / 4)][k / 32][4][32]), bias [n] or null, out
// [m, n]: contiguous bfloat16. Returns 2 where k is not a multiple of 32. The row count picks the
// tiling, never an output's arithmetic. 1 and 2 rows stream the row-major weight (in a whole forward
// on 2 Zen 4 cores about 1 ms faster than the packed blocks at 1 row, 0.5 at 2); more rows read the
// packed blocks, outputs past the last whole block through a 4-wide scratch.
extern "C" int rows_linear(const uint16_t* x, const uint16_t* w, const uint16_t* packed, const uint16_t* bias,
                           uint16_t* out, int64_t m, int64_t k, int64_t n) {
    if (k % 32) return 2;
    if (m == 0) return 0;
    if (m <= 2) {
        if (m == 1) few_rows<1>(x, w, bias, out, k, n);
        else few_rows<2>(x, w, bias, out, k, n);
        return 0;
    }
    const int64_t whole = n / BLOCK, tail = n % BLOCK;
    blocks(x, packed, bias, out, m, k, n, whole);
    if (tail) {
        uint16_t lanes[BLOCK] = {};
        if (bias) memcpy(lanes, bias + whole * BLOCK, tail * sizeof(uint16_t));
        std::vector<uint16_t> scratch(m * BLOCK);
        blocks(x, packed + whole * BLOCK * k, bias ? lanes : nullptr, scratch.data(), m, k, BLOCK, 1);
        for (int64_t r = 0; r < m; r++) memcpy(out + r * n + whole * BLOCK, scratch.data() + r * BLOCK, tail * sizeof(uint16_t));
    }
    return 0;
}
