// Which keys each query may see, for every kernel: the CUDA counterpart of cuflash/_mask.py
// (tests/gpu/test_mask.py checks the two against each other tile by tile).
//
// The rule is a band around the aligned diagonal: query i sees key j iff 0 <= j < Sk and
//   i + offset - left  <=  j  <=  i + offset + right
// (offset = Sk - Sq bottom-right, 0 top-left; kUnbounded for an open side). Causal attention is
// right = 0; full attention leaves both sides open. Kernels ask three kinds of question:
//   - which tiles of one operand a tile of the other needs (key_tiles, query_tiles): tiles wholly
//     outside the band are never loaded;
//   - whether a tile pair is wholly inside the band (full): such tiles carry no masking code;
//   - per row of a masked tile, the visible columns as an interval [lo, hi] relative to the tile
//     (keys_of_query for rows that are queries, queries_of_key for rows that are keys, as in the
//     backward's transposed tiles): masking an element is then two compares.
// Every bound is computed in 64 bits and clamped into the tile before it becomes an int.
// Rows past Sq need no masking: their outputs are not stored, and the backward's L2 is +inf there.
#pragma once

#include "seqlen.cuh"

namespace cuflash {

struct TileRange {
    int begin, end;  // tiles [begin, end); empty when end <= begin
    __device__ __forceinline__ int count() const { return end > begin ? end - begin : 0; }
};

struct Mask {
    i64 offset, left, right;
    int seqlen_q, seqlen_k;

    // From the forward's parameters (FwdParamsOf<float> or FwdParamsOf<double>).
    template <typename Params>
    __device__ __forceinline__ static Mask of(const Params& p) {
        return Mask{p.mask_offset, p.window_left, p.window_right, p.seqlen_q, p.seqlen_k};
    }

    // The mask of one sequence (attn/seqlen.cuh): its own lengths, aligned as the batch says.
    template <typename Params>
    __device__ __forceinline__ static Mask of(const Params& p, const Seq& s) {
        if constexpr (!kRagged) {
            return of(p);
        } else {
            // Sk_b - Sq_b fits an int: as one, it costs a register where the kernels hold it.
            const int offset = p.mask_bottom_right ? s.seqlen_k - s.seqlen_q : 0;
            return Mask{offset, p.window_left, p.window_right, s.seqlen_q, s.seqlen_k};
        }
    }

    // Keys of query i lie in [first_key(i), last_key(i)] (before clipping to 0..Sk-1).
    __device__ __forceinline__ i64 first_key(i64 i) const { return i + offset - left; }
    __device__ __forceinline__ i64 last_key(i64 i) const { return i + offset + right; }
    // Queries of key j lie in [first_query(j), last_query(j)] (before clipping to 0..Sq-1).
    __device__ __forceinline__ i64 first_query(i64 j) const { return j - offset - right; }
    __device__ __forceinline__ i64 last_query(i64 j) const { return j - offset + left; }

    // The queries [lo, hi) that see at least one key. Visibility is a band, so the others (the fully
    // masked rows of the contract: out = 0, LSE = -inf, no gradient in or out) are a prefix and a
    // suffix of the rows; the backward loads their Q and dO as zeros so that nothing they hold
    // (a NaN in a row that sees no key) reaches dK and dV through a product with P = 0.
    __device__ __forceinline__ void live_queries(int& lo, int& hi) const {
        lo = static_cast<int>(min64(seqlen_q, max64(0, first_query(0))));
        hi = seqlen_k > 0 ? static_cast<int>(max64(lo, min64(seqlen_q, last_query(seqlen_k - 1) + 1))) : lo;
    }

    // Tiles of BlockN keys that queries [i0, i1) need (i1 <= Sq).
    template <int BlockN>
    __device__ __forceinline__ TileRange key_tiles(int i0, int i1) const {
        const i64 lo = max64(0, first_key(i0));
        const i64 hi = min64(seqlen_k, last_key(i1 - 1) + 1);
        if (i1 <= i0 || hi <= lo) return TileRange{0, 0};
        return TileRange{static_cast<int>(lo / BlockN), static_cast<int>((hi + BlockN - 1) / BlockN)};
    }

    // Tiles of BlockM queries that keys [j0, j1) need (j1 <= Sk).
    template <int BlockM>
    __device__ __forceinline__ TileRange query_tiles(int j0, int j1) const {
        const i64 lo = max64(0, first_query(j0));
        const i64 hi = min64(seqlen_q, last_query(j1 - 1) + 1);
        if (j1 <= j0 || hi <= lo) return TileRange{0, 0};
        return TileRange{static_cast<int>(lo / BlockM), static_cast<int>((hi + BlockM - 1) / BlockM)};
    }

    // Whether every query of [i0, i1) sees every key of [j0, j1): no element of the tile is masked.
    __device__ __forceinline__ bool full(i64 i0, i64 i1, i64 j0, i64 j1) const {
        return j1 <= seqlen_k && j0 >= first_key(i1 - 1) && j1 - 1 <= last_key(i0);
    }

    // The keys [lo, hi) that every query of [i0, i1) sees (lo >= hi: none), clamped to 0..Sk:
    // a tile of keys inside it needs no mask.
    __device__ __forceinline__ void keys_of_all(int i0, int i1, int& lo, int& hi) const {
        lo = static_cast<int>(min64(seqlen_k, max64(0, first_key(i1 - 1))));
        hi = static_cast<int>(max64(0, min64(seqlen_k, last_key(i0) + 1)));
    }

    // The keys of the query rows i0 + d, 0 <= d < 128, held as two ints for a whole CTA: row i0 + d
    // sees [lo0 + d, min(hi0 + d, Sk - 1)]. The bounds are clamped to [-128, Sk], which keeps every
    // comparison with a key in 0..Sk-1 exact after adding d.
    struct RowBand {
        int lo0, hi0;
        __device__ __forceinline__ int first(int d) const { return lo0 + d; }
        __device__ __forceinline__ int last(int d, int seqlen_k) const {
            return hi0 + d < seqlen_k - 1 ? hi0 + d : seqlen_k - 1;
        }
    };

    __device__ __forceinline__ RowBand row_band(i64 i0) const {
        return RowBand{clamp_key(first_key(i0)), clamp_key(last_key(i0))};
    }

    // Visible columns [lo, hi] of query row i in a tile of `cols` keys from key col0, clamped to
    // [-1, cols] (lo > hi: none).
    __device__ __forceinline__ void keys_of_query(i64 i, i64 col0, int cols, int& lo, int& hi) const {
        lo = clamp_col(first_key(i) - col0, cols);
        hi = clamp_col(min64(last_key(i), seqlen_k - 1) - col0, cols);
    }

    // Visible columns [lo, hi] of key row j in a tile of `cols` queries from query col0 (none past Sk).
    __device__ __forceinline__ void queries_of_key(i64 j, i64 col0, int cols, int& lo, int& hi) const {
        lo = clamp_col(first_query(j) - col0, cols);
        hi = j < seqlen_k ? clamp_col(last_query(j) - col0, cols) : -1;
    }

    __device__ __forceinline__ static i64 max64(i64 a, i64 b) { return a > b ? a : b; }
    __device__ __forceinline__ static i64 min64(i64 a, i64 b) { return a < b ? a : b; }
    __device__ __forceinline__ int clamp_key(i64 x) const {
        return static_cast<int>(x < -128 ? -128 : (x > seqlen_k ? seqlen_k : x));
    }
    __device__ __forceinline__ static int clamp_col(i64 x, int cols) {
        return x < -1 ? -1 : (x > cols ? cols : static_cast<int>(x));
    }
};

}  // namespace cuflash
