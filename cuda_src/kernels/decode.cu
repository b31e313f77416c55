// Decoding against a key/value cache (split-KV, FlashDecoding): q (B, Sq, Hq, D) against the first
// Sk_b = cache_seqlens[b] + S_new keys of sequence b's cache, dense or paged (core/params.cuh's
// DecodeParams). Decoding is bound by reading K and V, so the kernel is built around that read:
//   - the Sq * group query rows of one (batch, kv head), the query heads of its GQA group packed
//     t-major (row r = t * group + g is query t of head h_kv * group + g), form one m16 tile Q_i,
//     so each key and value is read once per group rather than once per query head;
//   - a CTA takes one (batch, kv head, row tile, split) and streams its split's share of the key
//     tiles the mask lets the rows see, STAGES - 1 tiles of K_j/V_j in flight through cp.async;
//   - within a tile, warp w owns keys [w * kWarpN, (w + 1) * kWarpN): each warp keeps its own
//     online-softmax state and O_i over all rows, and the warps' states are merged at the end;
//   - splits = 1 writes out and lse; otherwise each split writes its normalized O and its LSE in
//     float32 to the workspace, and kernels/combine.cu merges them.
// Each sequence's mask is attn/mask.cuh's Mask with that sequence's lengths (bottom-right:
// offset Sk_b - Sq); softcap and ALiBi are attn/score_mod.cuh's ScoreMod of each row's head.
//
// Configuration (#defines from the variant table, cuflash/_cuda/variants.py):
//   HEAD_DIM    bucket of max(D, Dv), a multiple of 32; smaller D/Dv are zero-padded on load
//   BLOCK_N     keys per K_j/V_j tile (NUM_WARPS slices of a multiple of 16 keys)
//   NUM_WARPS   warps per CTA          STAGES   K_j/V_j tiles in the cp.async ring
//   MIN_BLOCKS  CTAs per SM promised to the register allocator
//   VEC_LOAD    1: rows of q and of the caches 16-byte aligned with unit stride along the head dim
//               (16-byte cp.async); 0: element loads with any strides
//   DTYPE       1 float16, 2 bfloat16      SCORE_MODS  bits 1 softcap, 2 ALiBi
//   SMEM_BYTES  the launcher's dynamic shared memory, checked against the layout below
#include "../attn/mask.cuh"
#include "../attn/score_mod.cuh"
#include "../attn/softmax.cuh"
#include "../core/elem.cuh"
#include "../core/tile_io.cuh"

#if !defined(HEAD_DIM) || !defined(BLOCK_N) || !defined(NUM_WARPS) || !defined(STAGES) || !defined(MIN_BLOCKS) || \
    !defined(VEC_LOAD) || !defined(SMEM_BYTES)
#error "decode.cu needs HEAD_DIM, BLOCK_N, NUM_WARPS, STAGES, MIN_BLOCKS, VEC_LOAD, SMEM_BYTES"
#endif

namespace cuflash {
namespace decode {

constexpr bool kVec = VEC_LOAD != 0;
constexpr int kHeadDim = HEAD_DIM;
constexpr int kBlockM = 16;                          // packed query rows per CTA: one m16 fragment
constexpr int kBlockN = BLOCK_N;
constexpr int kWarps = NUM_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpN = kBlockN / kWarps;             // keys of a tile each warp owns
constexpr int kStages = STAGES;
constexpr int kChunkElems = 16 / kElemBytes;
constexpr int kRowChunks = kHeadDim / kChunkElems;
// One 16-byte pad per row keeps the 8 row addresses of an ldmatrix on distinct bank groups.
constexpr int kRowBytes = (kHeadDim + kChunkElems) * kElemBytes;
constexpr int kNTiles = kWarpN / 8;                  // n8 fragments of S per warp
constexpr int kDTiles = kHeadDim / 8;                // n8 fragments of O
constexpr int kQBytes = kBlockM * kRowBytes;
constexpr int kKVTileBytes = kBlockN * kRowBytes;
constexpr int kKVBytes = 2 * kStages * kKVTileBytes;
// The merge of the warps' states after the loop reuses the K/V ring: per warp O_i as kBlockM rows
// of floats padded by 8 (the float2 stores of a half-warp then hit 32 distinct banks), then every
// warp's m_i and l_i.
constexpr int kORowFloats = kHeadDim + 8;
constexpr int kMergeOBytes = kWarps * kBlockM * kORowFloats * 4;
constexpr int kMergeBytes = kMergeOBytes + 2 * kWarps * kBlockM * 4;
constexpr int kSmemBytes = kQBytes + (kKVBytes > kMergeBytes ? kKVBytes : kMergeBytes);

static_assert(!kIsF32 && !kIsF64, "decode.cu is the 16-bit kernel (DTYPE 1 or 2)");
static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(kWarps >= 1 && kWarps <= 8, "NUM_WARPS must be in 1..8");
static_assert(kBlockN % (16 * kWarps) == 0, "BLOCK_N must give each warp a multiple of 16 keys (k16 steps of P V)");
static_assert(kStages >= 2 && kStages <= 8, "STAGES must be in 2..8");
static_assert(kThreads >= kRowChunks, "a CTA needs at least one thread per 16-byte chunk of a row");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES,
              "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");
static_assert((kRowBytes / 4) % 32 == 4 || (kRowBytes / 4) % 32 == 20,
              "row stride must keep ldmatrix rows on distinct bank groups");

using Softmax = SoftmaxState<1, kNTiles, kDTiles>;

// The rows of one kv head of a sequence's cache: key j starts at row(j). Dense: base is element
// (b, 0, h, 0); paged: element (page 0, slot 0, h, 0), and key j lies in page pages[j / page_size]
// at slot j % page_size. Only keys j < Sk_b <= capacity are ever asked for, so j / page_size is a
// column of block_table; a page index outside the cache (possible only where the caller left the
// table unchecked on the device) is clamped into it: a wrong result, never a stray read.
struct CacheRows {
    const char* base;
    const int* pages;  // the sequence's row of block_table; null for a dense cache
    i64 stride_page, stride_s;
    int page_size;
    i64 num_pages;

    __device__ __forceinline__ const char* row(int j) const {
        if (pages == nullptr) return base + static_cast<i64>(j) * stride_s * kElemBytes;
        const int n = j / page_size;
        const i64 page = min(max(static_cast<i64>(__ldg(pages + n)), i64{0}), num_pages - 1);
        return base + (page * stride_page + static_cast<i64>(j - n * page_size) * stride_s) * kElemBytes;
    }
};

// Loads Rows rows x cols [0, kHeadDim) into a padded shared tile: row rr (< nrows) starts at
// row_addr(rr), with stride_d elements between head-dim entries (1 on the vector path); rows
// >= nrows and cols >= ncols become 0, which keeps them out of every product. Thread tid copies
// chunk tid % kRowChunks of rows tid / kRowChunks + k * (kThreads / kRowChunks). `fallback` is a
// valid address for the zero-filling copies that read nothing.
template <int Rows, typename RowAddr>
__device__ __forceinline__ void load_rows(u32 smem, RowAddr row_addr, int nrows, int ncols, i64 stride_d,
                                          const void* fallback, int tid) {
    constexpr int kRowsPerPass = kThreads / kRowChunks;
    constexpr int kPasses = (Rows + kRowsPerPass - 1) / kRowsPerPass;
    const int r = tid / kRowChunks, chunk = tid % kRowChunks;
    if (r >= kRowsPerPass) return;
    const int col0 = chunk * kChunkElems;
    int cols = ncols - col0;
    cols = cols < 0 ? 0 : (cols > kChunkElems ? kChunkElems : cols);
    // The element path stays rolled: unrolled, every pass's loads are issued at once and their
    // values and addresses do not fit beside O_i.
#pragma unroll(kVec ? kPasses : 1)
    for (int k = 0; k < kPasses; ++k) {
        const int rr = r + k * kRowsPerPass;
        if (kPasses * kRowsPerPass != Rows && rr >= Rows) break;
        const u32 dst = smem + rr * kRowBytes + chunk * 16;
        const int valid = rr < nrows ? cols : 0;
        if constexpr (kVec) {
            cp_async_16(dst, valid > 0 ? row_addr(rr) + col0 * kElemBytes : fallback, valid * kElemBytes);
        } else {
            u32 w[4] = {0u, 0u, 0u, 0u};
            if (valid > 0) {
                const char* src = row_addr(rr) + col0 * stride_d * kElemBytes;
#pragma unroll
                for (int e = 0; e < kChunkElems; ++e)
                    if (e < valid) {
                        const u32 h = *reinterpret_cast<const u16*>(src + e * stride_d * kElemBytes);
                        w[e / 2] |= h << (16 * (e % 2));
                    }
            }
            sts_128(dst, w[0], w[1], w[2], w[3]);
        }
    }
}

// S += Q_i K_j^T over this warp's keys: ldmatrix fragments of Q_i (row-major A) and of the warp's
// kWarpN rows of K_j (exactly the "col" B layout), one m16n8k16 per (n, k) step.
__device__ __forceinline__ void qk_product(float (&s)[kNTiles][4], u32 sQ, u32 sK_warp, int lane) {
    const u32 q_lane = sQ + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
    const u32 k_lane = sK_warp + ((lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        u32 a[4];
        ldmatrix_x4(a, q_lane + kk * 32);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            u32 b[4];
            ldmatrix_x4(b, k_lane + np * 16 * kRowBytes + kk * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
            mma_m16n8k16<Elem>(s[2 * np], a, b0);
            mma_m16n8k16<Elem>(s[2 * np + 1], a, b1);
        }
    }
}

// O_i += P V_j over this warp's keys: P stays in registers (the C layout of two n8 tiles is one k16
// A fragment); V_j is row-major [key][dim], so ldmatrix.trans yields the B fragments.
__device__ __forceinline__ void pv_product(float (&acc_o)[1][kDTiles][4], const float (&p)[1][kNTiles][4],
                                           u32 sV_warp, int lane) {
    const u32 v_lane = sV_warp + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
#pragma unroll
    for (int kk = 0; kk < kWarpN / 16; ++kk) {
        u32 a[4];
        a[0] = pack2<Elem>(p[0][2 * kk][0], p[0][2 * kk][1]);
        a[1] = pack2<Elem>(p[0][2 * kk][2], p[0][2 * kk][3]);
        a[2] = pack2<Elem>(p[0][2 * kk + 1][0], p[0][2 * kk + 1][1]);
        a[3] = pack2<Elem>(p[0][2 * kk + 1][2], p[0][2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
            u32 b[4];
            ldmatrix_x4_trans(b, v_lane + kk * 16 * kRowBytes + dp * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
            mma_m16n8k16<Elem>(acc_o[0][2 * dp], a, b0);
            mma_m16n8k16<Elem>(acc_o[0][2 * dp + 1], a, b1);
        }
    }
}

// This thread's two rows of the tile (g and g + 8 of the m16 fragment): the query index t of each
// (its position among the Sq new queries) and the score modifier of its head.
struct Rows2 {
    int t[2];
    ScoreMod mod[2];
};

// Everything a tile step needs besides the state.
struct Loop {
    u32 sQ, sK, sV;     // Q_i, the K stages, the V stages
    CacheRows tk, tv;
    int key_begin;      // first key of the CTA's first tile
    int seqlen_k, head_dim, head_dim_v, tid, warp, lane;
    i64 stride_dk, stride_dv;
    const void* fallback_k;
    const void* fallback_v;
};

__device__ __forceinline__ void load_kv(const Loop& c, int stage, int tile) {
    const int key0 = c.key_begin + tile * kBlockN;
    const CacheRows tk = c.tk, tv = c.tv;
    load_rows<kBlockN>(c.sK + stage * kKVTileBytes, [&](int rr) { return tk.row(key0 + rr); }, c.seqlen_k - key0,
                       c.head_dim, c.stride_dk, c.fallback_k, c.tid);
    load_rows<kBlockN>(c.sV + stage * kKVTileBytes, [&](int rr) { return tv.row(key0 + rr); }, c.seqlen_k - key0,
                       c.head_dim_v, c.stride_dv, c.fallback_v, c.tid);
}

// One K_j/V_j tile: wait for it, refill the stage freed by the previous step, then S = Q_i K_j^T,
// logits, online softmax and O_i += P V_j on this warp's keys. MASKED tiles (the sequence's last
// keys, the band's edges) compare every key with each row's visible interval; the others carry no
// masking code.
template <bool MASKED>
__device__ __forceinline__ void tile_step(const Loop& c, const Mask& mask, const Rows2& rows, int it, int n_tiles,
                                          int& stage, Softmax& state, float (&acc_o)[1][kDTiles][4]) {
    cp_async_wait<kStages - 2>();
    // Tile `it` (and Q_i) has landed for every thread, and every warp is done with tile it - 1,
    // whose stage the load below refills.
    __syncthreads();
    const int nxt = it + kStages - 1;
    if (nxt < n_tiles) load_kv(c, stage == 0 ? kStages - 1 : stage - 1, nxt);
    cp_async_commit();  // one group per step, empty or not, so wait_group counts stay uniform

    float s[1][kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;
    const u32 warp_off = c.warp * kWarpN * kRowBytes;
    qk_product(s[0], c.sQ, c.sK + stage * kKVTileBytes + warp_off, c.lane);

    // This lane's columns are keys j0 + nt * 8 + e, e in {0, 1}.
    const int j0 = c.key_begin + it * kBlockN + c.warp * kWarpN + 2 * (c.lane & 3);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        if constexpr (kScoreMods) {
            // ALiBi distance i + offset - j (exact as a float up to 2^24).
            const float dist0 = static_cast<float>(rows.t[hh] + mask.offset - j0);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = s[0][nt][2 * hh + e];
                    x = rows.mod[hh].logit2(x, dist0 - static_cast<float>(nt * 8 + e));
                }
        } else if constexpr (MASKED) {
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) s[0][nt][2 * hh + e] *= rows.mod[hh].scale_log2;
        }
        if constexpr (MASKED) {
            int lo, hi;
            mask.keys_of_query(rows.t[hh], j0, kWarpN, lo, hi);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (nt * 8 + e < lo || nt * 8 + e > hi) s[0][nt][2 * hh + e] = neg_inf();
        }
    }

    state.update<MASKED || kScoreMods>(s, acc_o, rows.mod[0].scale_log2);
    pv_product(acc_o, s, c.sV + stage * kKVTileBytes + warp_off, c.lane);
    stage = stage + 1 == kStages ? 0 : stage + 1;
}

}  // namespace decode
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::decode;

// Grid: blockIdx.x = ((b * Hkv + h_kv) * row_tiles + row_tile) * splits + split: the CTAs reading
// the same keys (splits of one sequence, row tiles of one group) are launched together.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS)
    flash_decode(const __grid_constant__ DecodeParams p) {
    extern __shared__ __align__(128) char smem[];
    const FwdParams& f = p.fwd;
    const u32 sQ = smem_addr(smem);
    const u32 sK = sQ + kQBytes;
    const u32 sV = sK + kStages * kKVTileBytes;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

    const int split = static_cast<int>(blockIdx.x % p.splits);
    i64 rest = blockIdx.x / p.splits;
    const int row_tile = static_cast<int>(rest % p.row_tiles);
    rest /= p.row_tiles;
    const int h_kv = static_cast<int>(rest % f.heads_kv);
    const i64 b = rest / f.heads_kv;

    const int group = f.group, seqlen_q = f.seqlen_q;
    const int r0 = row_tile * kBlockM;                       // first packed row of this CTA
    const int n_rows = min(kBlockM, seqlen_q * group - r0);  // its rows that are queries
    // Sk_b, clamped into the cache (a no-op for lengths the host checked; see CacheRows).
    const int seqlen_k = static_cast<int>(
        min(max(static_cast<i64>(__ldg(p.cache_seqlens + b)), i64{0}) + p.seqlen_new, static_cast<i64>(p.capacity)));
    const Mask mask{static_cast<i64>(seqlen_k) - seqlen_q, f.window_left, f.window_right, seqlen_q, seqlen_k};

    // The key tiles some row sees, cut into p.splits near-equal shares of whole tiles: each split
    // of this sequence takes its own share, so short and long sequences both fill their splits.
    const int t_first = r0 / group, t_last = (r0 + n_rows - 1) / group;
    const TileRange all = mask.key_tiles<kBlockN>(t_first, t_last + 1);
    const int per_split = (all.count() + p.splits - 1) / p.splits;
    const int tile_begin = all.begin + split * per_split;
    const int tile_end = min(tile_begin + per_split, all.end);
    const int n_tiles = tile_end > tile_begin ? tile_end - tile_begin : 0;

    // Q_i: packed row rr is query t = (r0 + rr) / group of head h_kv * group + (r0 + rr) % group.
    const char* const q_base =
        static_cast<const char*>(f.q) + (b * f.q_st.b + static_cast<i64>(h_kv) * group * f.q_st.h) * kElemBytes;
    load_rows<kBlockM>(sQ, [&](int rr) {
        const int r = r0 + rr, t = r / group;
        return q_base + (static_cast<i64>(t) * f.q_st.s + static_cast<i64>(r - t * group) * f.q_st.h) * kElemBytes;
    }, n_rows, f.head_dim, f.q_st.d, f.q, tid);

    const bool paged = p.block_table != nullptr;
    const i64 b_or_page0 = paged ? 0 : b;
    const int* const pages = paged ? p.block_table + b * p.table_stride : nullptr;
    const Loop loop{sQ, sK, sV,
                    CacheRows{static_cast<const char*>(f.k) + (b_or_page0 * f.k_st.b + h_kv * f.k_st.h) * kElemBytes,
                              pages, f.k_st.b, f.k_st.s, p.page_size, p.num_pages},
                    CacheRows{static_cast<const char*>(f.v) + (b_or_page0 * f.v_st.b + h_kv * f.v_st.h) * kElemBytes,
                              pages, f.v_st.b, f.v_st.s, p.page_size, p.num_pages},
                    tile_begin * kBlockN, seqlen_k, f.head_dim, f.head_dim_v, tid, warp, lane, f.k_st.d, f.v_st.d,
                    f.k, f.v};
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_tiles) load_kv(loop, s, s);
        cp_async_commit();  // one group per stage, empty or not, so wait_group counts stay uniform
    }

    const int g = lane >> 2, tq = lane & 3;
    Rows2 rows;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        // Rows past the queries (n_rows <= r < 16) compute on zeros and are never stored; their
        // head (r % group) is still one of the group's, so its ALiBi slope exists.
        const int r = r0 + g + 8 * hh;
        rows.t[hh] = r / group;
        rows.mod[hh] = ScoreMod::of(f, b, h_kv * group + (r - rows.t[hh] * group));
    }

    float acc_o[1][kDTiles][4];
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[0][dt][e] = 0.f;
    Softmax state;
    state.init();

    int stage = 0;
    for (int it = 0; it < n_tiles; ++it) {
        const int j0 = loop.key_begin + it * kBlockN;
        // Uniform over the CTA: every warp takes the same branch, and both carry the same barriers.
        if (mask.full(t_first, t_last + 1, j0, j0 + kBlockN)) {
            tile_step<false>(loop, mask, rows, it, n_tiles, stage, state, acc_o);
        } else {
            tile_step<true>(loop, mask, rows, it, n_tiles, stage, state, acc_o);
        }
    }
    cp_async_wait<0>();
    // Every copy has landed (the loop's barriers do not cover n_tiles == 0) and every warp is done
    // with the K/V ring, which the merge below overwrites.
    __syncthreads();

    // Merge the warps: warp w's rows hold O_w (relative to its m_w) and l_w. For each row,
    // m = max m_w, L = sum l_w 2^(m_w - m), O = sum O_w 2^(m_w - m) / L. A row that no warp saw a
    // key for (every l_w = 0) has O = 0, LSE = -inf. Warps with l_w = 0 are left out rather than
    // weighted by 0, so a NaN of a V row they never saw cannot reach the row; a NaN l_w (NaN
    // scores) is weighted in and makes the row NaN, as the dense kernel's would be.
    const u32 sMerge = sK;
    const u32 sO_warp = sMerge + warp * kBlockM * kORowFloats * 4;
    const u32 sM = sMerge + kMergeOBytes;
    const u32 sL = sM + kWarps * kBlockM * 4;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const float l = quad_sum(state.l[0][hh]);
        const int row = g + 8 * hh;
        if (tq == 0) {
            asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(sM + (warp * kBlockM + row) * 4), "f"(state.m[0][hh])
                         : "memory");
            asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(sL + (warp * kBlockM + row) * 4), "f"(l) : "memory");
        }
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
            const u32 addr = sO_warp + (row * kORowFloats + dt * 8 + 2 * tq) * 4;
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(acc_o[0][dt][2 * hh]),
                         "f"(acc_o[0][dt][2 * hh + 1]) : "memory");
        }
    }
    // Every warp's O_w, m_w, l_w are in shared memory before any thread merges a row.
    __syncthreads();

    const bool direct = p.splits == 1;
    const i64 rows_total = static_cast<i64>(f.batch) * seqlen_q * f.heads_q;
    for (int idx = tid; idx < kBlockM * kHeadDim; idx += kThreads) {
        const int rr = idx / kHeadDim, d = idx - rr * kHeadDim;
        if (rr >= n_rows || d >= f.head_dim_v) continue;
        float m = neg_inf();
        bool seen = false;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            m = fmaxf(m, lds_f32(sM + (w * kBlockM + rr) * 4));
            seen |= lds_f32(sL + (w * kBlockM + rr) * 4) != 0.f;
        }
        // Only NaN scores can leave m = -inf on a row that saw keys; 0 keeps 2^(m_w - m) defined.
        const float m_use = m == neg_inf() ? 0.f : m;
        float o = 0.f, l = 0.f;
        if (seen) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float l_w = lds_f32(sL + (w * kBlockM + rr) * 4);
                if (l_w != 0.f) {
                    const float c = exp2_approx(lds_f32(sM + (w * kBlockM + rr) * 4) - m_use);
                    l += l_w * c;
                    o += lds_f32(sMerge + ((w * kBlockM + rr) * kORowFloats + d) * 4) * c;
                }
            }
            o /= l;
        }
        const float lse = seen ? 0.6931471805599453f * (m_use + log2_approx(l)) : neg_inf();
        const int r = r0 + rr, t = r / group, h = h_kv * group + (r - t * group);
        if (direct) {
            const i64 off = b * f.o_st.b + t * f.o_st.s + h * f.o_st.h + d * f.o_st.d;
            store_elem(static_cast<char*>(f.out) + off * kElemBytes, o);
            if (d == 0) f.lse[b * f.lse_sb + h * f.lse_sh + t * f.lse_ss] = lse;
        } else {
            const i64 row = split * rows_total + (b * seqlen_q + t) * f.heads_q + h;
            p.o_partial[row * f.head_dim_v + d] = o;
            if (d == 0) p.lse_partial[row] = lse;
        }
    }
}
