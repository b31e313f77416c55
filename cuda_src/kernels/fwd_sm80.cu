// FlashAttention forward: O = softmax(logits) V and LSE, one CTA per Br x d tile Q_i of one
// (batch, query head), streaming the K_j, V_j tiles it needs (attn/mask.cuh) through shared memory
// (FlashAttention-2 layout, mma.sync; every architecture from sm_80 on).
//
// Configuration arrives as #define lines from the variant table (cuflash/_cuda/variants.py):
//   HEAD_DIM    bucket of max(D, Dv), a multiple of 32; smaller D/Dv are zero-padded on load
//   BLOCK_M     Br, rows of Q per CTA        BLOCK_N   Bc, keys per K_j/V_j tile
//   NUM_WARPS   warps per CTA (each owns BLOCK_M / NUM_WARPS consecutive rows)
//   STAGES      K_j/V_j tiles in flight through cp.async (2 = double buffering)
//   MIN_BLOCKS  CTAs per SM promised to the register allocator (__launch_bounds__)
//   MAX_REGS    if > 0, a register cap per thread used instead of MIN_BLOCKS (__maxnreg__)
//   VEC_LOAD    1: q, k, v rows are 16-byte aligned with unit stride along the head dim, loaded by
//               16-byte cp.async; 0: element loads with any strides (no copies of odd layouts)
//   DTYPE       1 float16, 2 bfloat16 (mma.m16n8k16), 3 float32 (3xTF32 mma.m16n8k8)
//   SPLIT_Q     float32 only: 1 splits Q_i once into big/small planes in shared memory (twice the
//               bytes of Q_i); 0 keeps Q_i as loaded and splits its fragments at every k8 step
//   SPLIT_SUMS  float32 only: 1 moves O_i into the out buffer every kFlushKeys keys and compensates
//               l_i, so no float32 sum runs over all of Sk (see kFlushO below)
//   SCORE_MODS  score modifiers (attn/score_mod.cuh): bits 1 softcap, 2 ALiBi
//   SEQ_MODE    0 dense, 1 ragged (packed or padded sequences, attn/seqlen.cuh)
//   SMEM_BYTES  the launcher's dynamic shared memory, checked against the layout below
//
// Logits are log2(e) * mod(scale * q_i . k_j) on the keys the mask lets query i see. A row that sees
// no key gets O = 0 and LSE = -inf; LSE is the natural log of sum_j exp(logit_ij).
#include "../attn/mask.cuh"
#include "../attn/schedule.cuh"
#include "../attn/score_mod.cuh"
#include "../attn/softmax.cuh"
#include "../core/elem.cuh"
#include "../core/tile_io.cuh"

#if !defined(HEAD_DIM) || !defined(BLOCK_M) || !defined(BLOCK_N) || !defined(NUM_WARPS) || !defined(STAGES) || \
    !defined(MIN_BLOCKS) || !defined(MAX_REGS) || !defined(VEC_LOAD) || !defined(SPLIT_Q) || !defined(SPLIT_SUMS) || \
    !defined(SMEM_BYTES)
#error "fwd_sm80.cu needs HEAD_DIM, BLOCK_M, BLOCK_N, NUM_WARPS, STAGES, MIN_BLOCKS, MAX_REGS, VEC_LOAD, SPLIT_Q, SPLIT_SUMS, SMEM_BYTES"
#endif

namespace cuflash {
namespace fwd {

constexpr bool kSplitQ = SPLIT_Q != 0;
static_assert(kIsF32 || !kSplitQ, "SPLIT_Q belongs to the float32 path");
constexpr int kHeadDim = HEAD_DIM;
constexpr int kBlockM = BLOCK_M;
constexpr int kBlockN = BLOCK_N;
constexpr int kWarps = NUM_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = STAGES;
constexpr int kChunkElems = 16 / kElemBytes;           // elements per 16-byte cp.async chunk
constexpr int kRowChunks = kHeadDim / kChunkElems;     // chunks per shared-memory row
// One 16-byte pad per row: the 8 row addresses of an ldmatrix (and the 8 rows of a tf32 fragment)
// then fall in 8 different 16-byte bank groups, so tiles load without bank conflicts.
constexpr int kRowElems = kHeadDim + kChunkElems;
constexpr int kRowBytes = kRowElems * kElemBytes;
constexpr int kWarpRows = kBlockM / kWarps;
constexpr int kMTiles = kWarpRows / 16;                // m16 fragments per warp
constexpr int kNTiles = kBlockN / 8;                   // n8 fragments of S per warp row block
constexpr int kDTiles = kHeadDim / 8;                  // n8 fragments of O
constexpr int kKVTileBytes = kBlockN * kRowBytes;
// float32 (3xTF32): every operand is split into big = tf32(x) and small = tf32(x - big) once, into
// "planes" ordered by mma fragment: for each fragment, 32 lanes x 16 bytes in lane order, so a warp
// reads a whole fragment with one conflict-free 16-byte load per lane. A K_j or V_j fragment
// (m16n8k8 B operand) holds {big b[0], big b[1], small b[0], small b[1]} per lane (512 bytes); a
// Q_i fragment (A operand) is 512 bytes of big a[0..3] then 512 bytes of small a[0..3].
// Shared memory, float32: [Q_i: planes (SPLIT_Q) or as loaded][K_j planes][V_j planes][K_j][V_j]:
// one tile is split and computed from its planes while the next lands in the raw K_j/V_j buffer
// (kStages == 2). With SPLIT_Q, Q_i is first loaded into the space after its planes and split.
constexpr int kFragBytes = 32 * 16;
constexpr int kKVPlaneBytes = kBlockN * kHeadDim * 8;  // big and small of K_j (or V_j), 8 bytes an element
constexpr int kQLoadedBytes = kBlockM * kRowBytes;
constexpr int kQBytes = kSplitQ ? kBlockM * kHeadDim * 8 : kQLoadedBytes;
constexpr int kKVF32Bytes = 2 * kKVPlaneBytes + 2 * kKVTileBytes;
constexpr int kSmemBytes = !kIsF32 ? kQBytes + 2 * kStages * kKVTileBytes
                                   : kQBytes + (kSplitQ && kQLoadedBytes > kKVF32Bytes ? kQLoadedBytes : kKVF32Bytes);

static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(kWarps >= 1 && kWarps <= 16, "NUM_WARPS must be in 1..16");
static_assert(kBlockM % (16 * kWarps) == 0, "BLOCK_M must be a multiple of 16 * NUM_WARPS (m16 fragments per warp)");
static_assert(kMTiles >= 1 && kMTiles <= 4, "each warp owns 16, 32, 48 or 64 rows");
static_assert(kIsF32 || (kBlockN % 16 == 0 && kBlockN >= 16), "BLOCK_N must be a multiple of 16 (k16 steps of P V)");
static_assert(!kIsF32 || (kBlockN % 8 == 0 && kBlockN >= 8), "float32 BLOCK_N must be a multiple of 8 (k8 steps of P V)");
static_assert(kStages >= 2 && kStages <= 4, "STAGES must be in 2..4");
static_assert(!kIsF32 || kStages == 2, "float32 streams one raw K_j/V_j tile beside the split planes: STAGES must be 2");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");
static_assert((kRowBytes / 4) % 32 == 4 || (kRowBytes / 4) % 32 == 20,
              "row stride must keep ldmatrix/tf32 fragment rows on distinct bank groups");

// Tile loads through core/tile_io.cuh; float32 element loads of many passes stay rolled (unrolled,
// the loads of every pass are issued at once, and their values and 64-bit addresses do not fit
// beside O_i), as do Turing's (the sm75 family's d = 256 tiles spill otherwise).
template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, int tid) {
    constexpr int kPasses = (ROWS + kThreads / kRowChunks - 1) / (kThreads / kRowChunks);
    constexpr int kElemUnroll = (kIsF32 || TURING) && kPasses >= 8 ? 1 : kPasses;
    cuflash::load_tile<ROWS, kHeadDim, kElemBytes, kThreads, PaddedRows<kRowBytes>, VEC_LOAD != 0, kElemUnroll>(
        smem, t, row0, nrows, ncols, tid);
}

#if DTYPE != 3
// S_i += Q_i K_j^T for this warp's rows: ldmatrix fragments of Q_i (row-major A) and K_j (its rows
// are the columns of K_j^T, exactly the "col" B layout), one m16n8k16 per (m, n, k) step.
__device__ __forceinline__ void qk_product(float (&acc_s)[kMTiles][kNTiles][4], u32 sQ_warp, u32 sK, int lane) {
    // Lane l addresses row l%8 of matrix l/8; the four matrices of an x4 load tile 16x16.
    const u32 q_lane = sQ_warp + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
    const u32 k_lane = sK + ((lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        u32 a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a[mt], q_lane + mt * 16 * kRowBytes + kk * 32);
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            u32 b[4];
            ldmatrix_x4(b, k_lane + np * 16 * kRowBytes + kk * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                mma_m16n8k16<Elem>(acc_s[mt][2 * np], a[mt], b0);
                mma_m16n8k16<Elem>(acc_s[mt][2 * np + 1], a[mt], b1);
            }
        }
    }
}

// O_i += P V_j: P stays in registers (its C layout over two n8 tiles is one k16 A fragment);
// V_j is row-major [key][dim], so ldmatrix.trans yields the B fragments.
__device__ __forceinline__ void pv_product(float (&acc_o)[kMTiles][kDTiles][4], const float (&p)[kMTiles][kNTiles][4],
                                           u32 sV, int lane) {
    const u32 v_lane = sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
        u32 a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            a[mt][0] = pack2<Elem>(p[mt][2 * kk][0], p[mt][2 * kk][1]);
            a[mt][1] = pack2<Elem>(p[mt][2 * kk][2], p[mt][2 * kk][3]);
            a[mt][2] = pack2<Elem>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
            a[mt][3] = pack2<Elem>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < kDTiles / 2; ++dp) {
            u32 b[4];
            ldmatrix_x4_trans(b, v_lane + kk * 16 * kRowBytes + dp * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
                mma_m16n8k16<Elem>(acc_o[mt][2 * dp], a[mt], b0);
                mma_m16n8k16<Elem>(acc_o[mt][2 * dp + 1], a[mt], b1);
            }
        }
    }
}
#else
// 3xTF32: each f32 operand x = big + small (both tf32); big*big' + big*small' + small*big' on
// tensor cores keeps the products at f32 accuracy (plain TF32 would lose ~3 decimal digits).
// The three products go into a fresh accumulator that is then added with an ordinary (rounded)
// f32 add: the tensor cores truncate when they accumulate, and chaining every k step into one
// accumulator would let that one-sided error grow with the length of the sum.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const u32 (&a_big)[4], const u32 (&a_small)[4],
                                           const u32 (&b_big)[2], const u32 (&b_small)[2]) {
    float part[4] = {0.f, 0.f, 0.f, 0.f};
    mma_m16n8k8_tf32(part, a_big, b_big);
    mma_m16n8k8_tf32(part, a_small, b_big);
    mma_m16n8k8_tf32(part, a_big, b_small);
#pragma unroll
    for (int e = 0; e < 4; ++e) d[e] += part[e];
}

// Splits Q_i's m16n8k8 A fragment (mt, kk) of this warp from Q_i as loaded (rows padded to
// kRowBytes): a[0] = (g, t), a[1] = (g + 8, t), a[2] = (g, t + 4), a[3] = (g + 8, t + 4).
__device__ __forceinline__ void split_q_frag(u32 (&a_big)[4], u32 (&a_small)[4], u32 sQ_loaded_warp, int mt, int kk,
                                             int lane) {
    const u32 qa = sQ_loaded_warp + ((lane >> 2) + mt * 16) * kRowBytes + ((lane & 3) + kk * 8) * 4;
    split_tf32(lds_f32(qa), a_big[0], a_small[0]);
    split_tf32(lds_f32(qa + 8 * kRowBytes), a_big[1], a_small[1]);
    split_tf32(lds_f32(qa + 16), a_big[2], a_small[2]);
    split_tf32(lds_f32(qa + 8 * kRowBytes + 16), a_big[3], a_small[3]);
}

// SPLIT_Q: this warp's rows of Q_i into its planes, fragment (mt, kk) at (mt * kDTiles + kk) * 1024.
// Only this warp reads them.
__device__ __forceinline__ void split_q(u32 sQ_warp, u32 sQ_loaded_warp, int lane) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int kk = 0; kk < kDTiles; ++kk) {
            u32 a_big[4], a_small[4];
            split_q_frag(a_big, a_small, sQ_loaded_warp, mt, kk, lane);
            const u32 dst = sQ_warp + (mt * kDTiles + kk) * 2 * kFragBytes + lane * 16;
            sts_128(dst, a_big[0], a_big[1], a_big[2], a_big[3]);
            sts_128(dst + kFragBytes, a_small[0], a_small[1], a_small[2], a_small[3]);
        }
}

// Splits the raw K_j, V_j tile into their planes; the warps share the fragments. K_j fragment
// (nt, kk) is the B operand of S = Q K^T: b[0] = K[nt*8 + g][kk*8 + t], b[1] = column + 4. V_j
// fragment (nt, dt) is the B operand of O += P V under pv_product's key permutation:
// b[0] = V[nt*8 + 2t][dt*8 + g], b[1] = V[nt*8 + 2t + 1][dt*8 + g]. Both index as nt * kDTiles + kk
// (kk, dt < kDTiles), and the raw reads are conflict-free thanks to the row padding.
__device__ __forceinline__ void split_kv(u32 sKV, int warp, int lane) {
    constexpr int kFrags = kNTiles * kDTiles;
    const int g = lane >> 2, t = lane & 3;
    const u32 k_lane = sKV + 2 * kKVPlaneBytes + g * kRowBytes + t * 4;
    const u32 v_lane = sKV + 2 * kKVPlaneBytes + kKVTileBytes + 2 * t * kRowBytes + g * 4;
    // Rolled: unrolled, the compiler computes every fragment's addresses once for the whole loop
    // over tiles and holds them in registers throughout.
#pragma unroll 1
    for (int f = warp; f < kFrags; f += kWarps) {
        const int nt = f / kDTiles, kk = f - nt * kDTiles;
        const u32 src = nt * 8 * kRowBytes + kk * 32;
        const u32 dst = f * kFragBytes + lane * 16;
        u32 big[2], small[2];
        split_tf32(lds_f32(k_lane + src), big[0], small[0]);
        split_tf32(lds_f32(k_lane + src + 16), big[1], small[1]);
        sts_128(sKV + dst, big[0], big[1], small[0], small[1]);
        split_tf32(lds_f32(v_lane + src), big[0], small[0]);
        split_tf32(lds_f32(v_lane + src + kRowBytes), big[1], small[1]);
        sts_128(sKV + kKVPlaneBytes + dst, big[0], big[1], small[0], small[1]);
    }
}

// S_i += Q_i K_j^T from the K_j planes; Q_i fragments from its planes (SPLIT_Q) or split here.
// The loop over k8 steps stays rolled: unrolled, the compiler issues the fragment loads of many
// steps ahead and runs out of registers (spills at every register cap tried).
__device__ __forceinline__ void qk_product(float (&acc_s)[kMTiles][kNTiles][4], u32 sQ_warp, u32 sK, int lane) {
#pragma unroll 1
    for (int kk = 0; kk < kDTiles; ++kk) {
        u32 a_big[kMTiles][4], a_small[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            if constexpr (kSplitQ) {
                const u32 qa = sQ_warp + (mt * kDTiles + kk) * 2 * kFragBytes + lane * 16;
                lds_128(qa, a_big[mt][0], a_big[mt][1], a_big[mt][2], a_big[mt][3]);
                lds_128(qa + kFragBytes, a_small[mt][0], a_small[mt][1], a_small[mt][2], a_small[mt][3]);
            } else {
                split_q_frag(a_big[mt], a_small[mt], sQ_warp, mt, kk, lane);
            }
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
            u32 b_big[2], b_small[2];
            lds_128(sK + (nt * kDTiles + kk) * kFragBytes + lane * 16, b_big[0], b_big[1], b_small[0], b_small[1]);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) mma_3xtf32(acc_s[mt][nt], a_big[mt], a_small[mt], b_big, b_small);
        }
    }
}

// O_i += P V_j from the V_j planes. The k8 step over keys uses the permutation k = t <-> key 2t,
// k = t + 4 <-> key 2t + 1, under which the C fragment of S is already the A fragment of P (no
// shuffles); the V_j planes hold the rows of the same keys. The loop over key blocks stays rolled
// (unrolled, the compiler issues the V_j loads of later blocks early and runs out of registers),
// so P of the current block is always p[.][0]: each step moves the next block's P to the front.
__device__ __forceinline__ void pv_product(float (&acc_o)[kMTiles][kDTiles][4], float (&p)[kMTiles][kNTiles][4],
                                           u32 sV, int lane) {
    u32 v_frag = sV + lane * 16;
#pragma unroll 1
    for (int nt = 0; nt < kNTiles; ++nt) {
        u32 a_big[kMTiles][4], a_small[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
            split_tf32(p[mt][0][0], a_big[mt][0], a_small[mt][0]);
            split_tf32(p[mt][0][2], a_big[mt][1], a_small[mt][1]);
            split_tf32(p[mt][0][1], a_big[mt][2], a_small[mt][2]);
            split_tf32(p[mt][0][3], a_big[mt][3], a_small[mt][3]);
        }
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
            u32 b_big[2], b_small[2];
            lds_128(v_frag + dt * kFragBytes, b_big[0], b_big[1], b_small[0], b_small[1]);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) mma_3xtf32(acc_o[mt][dt], a_big[mt], a_small[mt], b_big, b_small);
        }
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int j = 0; j + 1 < kNTiles; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) p[mt][j][e] = p[mt][j + 1][e];
        v_frag += kDTiles * kFragBytes;
    }
}
#endif


// float32: O_i's running sum moves into this thread's own elements of the out buffer every
// kFlushKeys keys, and the row max m_i it is relative to into the row's LSE slot; the epilogue adds
// it back (rescaled to the final m_i) before it overwrites both. So no float32 sum runs over more
// than kFlushKeys / 8 k8 products: one sum over every k8 product of a long Sk made the error grow
// with Sk to several times naive float32's; split like this, with l_i compensated, it stays at
// naive's (bench/emulate_float32.py, bench/NOTES.md). Nothing of it stays in registers across the
// tile loop. 16-bit outputs cannot see the difference; the sm80 family's float32 tiles at d >= 160
// have no registers for it (variants.py, split_sums).
constexpr bool kFlushO = SPLIT_SUMS != 0;
constexpr int kFlushKeys = 1024;
constexpr int kFlushTiles = kFlushKeys / kBlockN;
static_assert(kIsF32 || !kFlushO, "SPLIT_SUMS belongs to the float32 path");
static_assert(!kFlushO || kFlushKeys % kBlockN == 0, "BLOCK_N must divide kFlushKeys");

using Softmax = SoftmaxState<kMTiles, kNTiles, kDTiles, float, kFlushO>;

// Moves O_i out (TO_OUT: out = (first ? 0 : out * 2^(m_out - m_i)) + acc, m_out = m_i, acc = 0) or
// brings it back (acc += out * 2^(m_out - m_i)), for this thread's elements: rows from row_w (g of
// its first m16 fragment), those past Sq or Dv skipped; m_out is the row's LSE slot. A row that had
// seen no key when it moved (m_out = -inf) holds 0 there.
template <bool TO_OUT>
__device__ __forceinline__ void move_o_partial(const FwdParams& p, i64 row_w, int lane, bool first,
                                               const Softmax& state, float (&acc_o)[kMTiles][kDTiles][4]) {
    // Rare: the place is recomputed here from a block index the compiler must read anew, so that
    // none of these addresses is hoisted out of the tile loop to hold registers across it.
    const QWork work = q_work(p.num_m_blocks, p.heads_q, p.group);
    const i64 b = fresh(static_cast<u32>(work.b));
    const Seq seq = Seq::of(p, b);
    float* const o_base =
        static_cast<float*>(p.out) + b * p.o_st.b + work.h * p.o_st.h + static_cast<i64>(seq.q0) * p.o_st.s;
    float* const m_base = p.lse + b * p.lse_sb + work.h * p.lse_sh + static_cast<i64>(seq.q0) * p.lse_ss;
    float f[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const i64 row = row_w + mt * 16 + hh * 8;
            f[mt][hh] = 0.f;
            if (!first && row < seq.seqlen_q) {
                const float m_then = m_base[row * p.lse_ss];
                f[mt][hh] = m_then == neg_inf() ? 0.f : exp2_approx(m_then - state.m[mt][hh]);
            }
        }
    __syncwarp();  // the quad's lanes have all read m_out before its first lane overwrites it
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const i64 row = row_w + mt * 16 + hh * 8;
            if (row >= seq.seqlen_q) continue;
            float* const o_row = o_base + row * p.o_st.s;
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& a = acc_o[mt][dt][2 * hh + e];
                    const int col = dt * 8 + 2 * (lane & 3) + e;
                    if (col < p.head_dim_v) {
                        float* const o = o_row + col * p.o_st.d;
                        if constexpr (TO_OUT) {
                            *o = first ? a : fmaf(*o, f[mt][hh], a);
                        } else {
                            a = fmaf(*o, f[mt][hh], a);
                        }
                    }
                }
                // Unfenced, the compiler issues every load of the row at once (D/4 more registers).
                asm volatile("" ::: "memory");
            }
            if (TO_OUT && (lane & 3) == 0) m_base[row * p.lse_ss] = state.m[mt][hh];
        }
    if constexpr (TO_OUT) {
        // A zero the compiler cannot see through: a literal 0 lets it specialise the tiles after a
        // move on O_i = 0, which spills every d >= 160 tile.
        float zero;
        asm volatile("mov.b32 %0, 0;" : "=f"(zero));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = zero;
    }
}

// Loop-invariant inputs of tile_step. Tiles run from the last the CTA needs (n_last) down.
struct TileLoop {
    u32 sQ_warp, sKV;  // this warp's Q_i rows (float32: planes or as loaded); K stages then V stages
                       // (float32: K_j planes, V_j planes, raw K_j, raw V_j)
    Tensor tk, tv;
    int n_last, n_tiles, seqlen_k, head_dim, head_dim_v, tid, lane;
    ScoreMod mod;
    i64 mask_offset;  // the sequence's (ragged batches; dense ones read p.mask_offset)
};

// One K_j/V_j tile: S = Q_i K_j^T, logits, online softmax, O_i += P V_j. MASKED is a template
// parameter so that the tiles wholly inside the mask's band carry no masking code at all.
// row_w is this thread's first row (g of its warp's first m16 fragment) and band the keys of its
// rows; the ALiBi distances are derived from row_w where needed (the parameters stay in constant
// memory).
template <bool MASKED>
__device__ __forceinline__ void tile_step(const FwdParams& p, const TileLoop& c, int it, int& stage, i64 row_w,
                                          const Mask::RowBand& band, Softmax& state,
                                          float (&acc_o)[kMTiles][kDTiles][4]) {
#if DTYPE == 3
    cp_async_wait<0>();
    // Raw tile `it` (and Q_i without SPLIT_Q) has landed for every thread, and every warp is
    // done with the planes of tile it-1, which the split overwrites.
    __syncthreads();
    split_kv(c.sKV, c.tid >> 5, c.lane);
    // The planes of tile `it` are complete, and every warp has read the raw tile, which the
    // load below refills.
    __syncthreads();
    if (it + 1 < c.n_tiles) {
        const int n0 = (c.n_last - 1 - it) * kBlockN;
        load_tile<kBlockN>(c.sKV + 2 * kKVPlaneBytes, c.tk, n0, c.seqlen_k, c.head_dim, c.tid);
        load_tile<kBlockN>(c.sKV + 2 * kKVPlaneBytes + kKVTileBytes, c.tv, n0, c.seqlen_k, c.head_dim_v, c.tid);
    }
    cp_async_commit();
#else
    cp_async_wait<kStages - 2>();
    // Tile `it` (and Q_i) has landed for every thread, and every warp is done with tile it-1,
    // whose stage the load below refills.
    __syncthreads();
    const int nxt = it + kStages - 1;
    if (nxt < c.n_tiles) {
        const int nstage = stage == 0 ? kStages - 1 : stage - 1;
        const int n0 = (c.n_last - nxt) * kBlockN;
        load_tile<kBlockN>(c.sKV + nstage * kKVTileBytes, c.tk, n0, c.seqlen_k, c.head_dim, c.tid);
        load_tile<kBlockN>(c.sKV + (kStages + nstage) * kKVTileBytes, c.tv, n0, c.seqlen_k, c.head_dim_v, c.tid);
    }
    cp_async_commit();
#endif

    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
    qk_product(s, c.sQ_warp, kIsF32 ? c.sKV : c.sKV + stage * kKVTileBytes, c.lane);

    // Logits in the log2 domain where a score modifier or the mask needs them (masked keys -inf);
    // plain unmasked tiles leave the scaling to the softmax's exp2. This lane's columns are
    // col0 + nt * 8 + e, e in {0, 1}.
    const int col0 = (c.n_last - it) * kBlockN + 2 * (c.lane & 3);
    // ALiBi distance i + offset - j of row_w and column col0 (exact as a float up to 2^24).
    const float dist_w = kAlibi ? static_cast<float>(row_w + (kRagged ? c.mask_offset : p.mask_offset) - col0) : 0.f;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int d = mt * 16 + hh * 8;  // this row's offset from row_w
            if constexpr (kScoreMods) {
                const float dist0 = dist_w + static_cast<float>(d);
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float& x = s[mt][nt][2 * hh + e];
                        x = c.mod.logit2(x, dist0 - static_cast<float>(nt * 8 + e));
                    }
            } else if constexpr (MASKED) {
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) s[mt][nt][2 * hh + e] *= c.mod.scale_log2;
            }
            if constexpr (MASKED) {
                const int lo = band.first(d) - col0, hi = band.last(d, c.seqlen_k) - col0;
#pragma unroll
                for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (nt * 8 + e < lo || nt * 8 + e > hi) s[mt][nt][2 * hh + e] = neg_inf();
            }
        }

    state.update<MASKED || kScoreMods>(s, acc_o, c.mod.scale_log2);
    pv_product(acc_o, s, kIsF32 ? c.sKV + kKVPlaneBytes : c.sKV + (kStages + stage) * kKVTileBytes, c.lane);
    stage = stage + 1 == kStages ? 0 : stage + 1;
}

}  // namespace fwd
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::fwd;

// MAX_REGS > 0 caps registers per thread directly (for tiles whose compiler-chosen schedule would
// hoist more loads than fit, and spill); otherwise MIN_BLOCKS CTAs per SM set the cap.
#if MAX_REGS > 0
#define FLASH_FWD_BOUNDS __maxnreg__(MAX_REGS)
#else
#define FLASH_FWD_BOUNDS __launch_bounds__(kThreads, MIN_BLOCKS)
#endif

// Grid: attn/schedule.cuh's q_work over p.num_m_blocks query tiles per (batch, head).
extern "C" __global__ void FLASH_FWD_BOUNDS flash_fwd(const __grid_constant__ FwdParams p) {
    extern __shared__ __align__(128) char smem[];
    const u32 sQ = smem_addr(smem);
    const u32 sKV = sQ + kQBytes;  // K stages, then V stages (float32: planes, then raw tile)

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const QWork work = q_work(p.num_m_blocks, p.heads_q, p.group);
    const i64 b = work.b;
    const int h = work.h;
    const int row0 = work.tile * kBlockM;
    // The grid covers the longest sequence of a ragged batch: the shorter ones' tiles past their
    // end have no rows (padding rows are the launcher's).
    const Seq seq = Seq::of(p, b);
    if (kRagged && row0 >= seq.seqlen_q) return;
    const int seqlen_q = seq.seqlen_q;
    const int row_end = row0 + kBlockM < seqlen_q ? row0 + kBlockM : seqlen_q;
    const int seqlen_k = seq.seqlen_k, head_dim = p.head_dim, head_dim_v = p.head_dim_v;

    const Tensor tq = Tensor::of(p.q, p.q_st, b, h, kElemBytes, seq.q0);
    const Tensor tk = Tensor::of(p.k, p.k_st, b, work.h_kv, kElemBytes, seq.k0);
    const Tensor tv = Tensor::of(p.v, p.v_st, b, work.h_kv, kElemBytes, seq.k0);

    // The key tiles some row of Q_i sees, run from the last to the first (the diagonal's first
    // under a causal mask).
    const Mask mask = Mask::of(p, seq);
    const TileRange range = mask.key_tiles<kBlockN>(row0, row_end);
    const int n_tiles = range.count(), n_last = range.end - 1;

#if DTYPE == 3
    // With SPLIT_Q, Q_i lands where the K_j/V_j planes go and is split into its own planes.
    const u32 sQ_loaded = kSplitQ ? sKV : sQ;
    load_tile<kBlockM>(sQ_loaded, tq, row0, seqlen_q, head_dim, tid);
    if constexpr (kSplitQ) {
        cp_async_commit();
        cp_async_wait<0>();
        // Every thread's copies of Q_i have landed before warps split their rows.
        __syncthreads();
        split_q(sQ + warp * kWarpRows * kHeadDim * 8, sQ_loaded + warp * kWarpRows * kRowBytes, lane);
        // Every warp has read Q_i as loaded, which the first raw tile and the planes overwrite.
        __syncthreads();
    }
    if (n_tiles > 0) {
        const int n0 = n_last * kBlockN;
        load_tile<kBlockN>(sKV + 2 * kKVPlaneBytes, tk, n0, seqlen_k, head_dim, tid);
        load_tile<kBlockN>(sKV + 2 * kKVPlaneBytes + kKVTileBytes, tv, n0, seqlen_k, head_dim_v, tid);
    }
    cp_async_commit();
#else
    load_tile<kBlockM>(sQ, tq, row0, seqlen_q, head_dim, tid);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < n_tiles) {
            const int n0 = (n_last - s) * kBlockN;
            load_tile<kBlockN>(sKV + s * kKVTileBytes, tk, n0, seqlen_k, head_dim, tid);
            load_tile<kBlockN>(sKV + (kStages + s) * kKVTileBytes, tv, n0, seqlen_k, head_dim_v, tid);
        }
        cp_async_commit();  // one group per stage, empty or not, so wait_group counts stay uniform
    }
#endif

    float acc_o[kMTiles][kDTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    Softmax state;
    state.init();

    const u32 sQ_warp = sQ + warp * kWarpRows * kRowBytes;
    const int g = lane >> 2, t = lane & 3;
    int stage = 0;
    const i64 row_w = row0 + warp * kWarpRows + g;
    const Mask::RowBand band = mask.row_band(row_w);

    const u32 sQ_frag = kSplitQ ? sQ + warp * kWarpRows * kHeadDim * 8 : sQ_warp;
    const TileLoop loop{sQ_frag, sKV, tk, tv, n_last, n_tiles, seqlen_k, head_dim, head_dim_v, tid, lane,
                        ScoreMod::of(p, b, h), mask.offset};
    // Tiles wholly inside [full_lo, full_hi), the keys every row sees, need no mask. In descending
    // order the masked tiles (the Sk tail, the band's upper edge) come first, then the unmasked
    // ones, then those across the band's lower edge (a window): the outer loop runs at most twice,
    // and each tile body is specialised without a branch inside it (with a third copy of the masked
    // body the d = 64, 128 x 128 tiles spill).
    int full_lo, full_hi;
    mask.keys_of_all(row0, row_end, full_lo, full_hi);
    auto is_full = [&](int it) {
        const int n0 = (n_last - it) * kBlockN;
        return n0 >= full_lo && n0 + kBlockN <= full_hi;
    };
    for (int it = 0; it < n_tiles;) {
        // float32: the walk also stops at each multiple of kFlushTiles to move O_i out (one copy of
        // that code, not one per tile body).
        const int stop = kFlushO && (it / kFlushTiles + 1) * kFlushTiles < n_tiles ? (it / kFlushTiles + 1) * kFlushTiles
                                                                                    : n_tiles;
        for (; it < stop && !is_full(it); ++it) tile_step<true>(p, loop, it, stage, row_w, band, state, acc_o);
        for (; it < stop && is_full(it); ++it) tile_step<false>(p, loop, it, stage, row_w, band, state, acc_o);
        if (kFlushO && it == stop && stop < n_tiles) move_o_partial<true>(p, row_w, lane, it == kFlushTiles, state, acc_o);
    }
    if (kFlushO && n_tiles > kFlushTiles) move_o_partial<false>(p, row_w, lane, false, state, acc_o);
    cp_async_wait<0>();
    // Every thread's copies into Q_i have landed (the loop's barriers do not cover n_tiles == 0)
    // before warps reuse their Q_i rows to stage O_i; with SPLIT_Q those rows overlap other warps'
    // Q_i planes, which every warp is done with here.
    __syncthreads();

    // Finalize: O_i = acc / l_i, LSE_i = ln 2 * (m_i + log2 l_i). A row that sees no key (outside
    // the mask's live queries) writes O = 0 whatever V holds (its P is 0, but 0 times a NaN would not
    // be); a row that does see keys keeps the arithmetic, 0/0 = NaN included when every logit it
    // sees is -inf.
    // A ragged sequence's place and lengths are read again here rather than held in registers
    // across the loop (through an index the compiler cannot match with the first reads).
    const Seq seq_out = kRagged ? Seq::of(p, fresh(static_cast<u32>(b))) : seq;
    int live_lo, live_hi;
    Mask::of(p, seq_out).live_queries(live_lo, live_hi);
    float inv_l[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float l = quad_sum(state.lane_sum(mt, hh));
            const int row = row0 + warp * kWarpRows + mt * 16 + g + hh * 8;
            inv_l[mt][hh] = 1.f / l;
            if (row < live_lo || row >= live_hi) {  // selects on the accumulators: no registers kept
#pragma unroll
                for (int dt = 0; dt < kDTiles; ++dt) acc_o[mt][dt][2 * hh] = acc_o[mt][dt][2 * hh + 1] = 0.f;
                inv_l[mt][hh] = 0.f;
            }
            if (t == 0 && row < seq_out.seqlen_q) {
                const float val = l > 0.f ? 0.6931471805599453f * (state.m[mt][hh] + log2_approx(l)) : neg_inf();
                p.lse[b * p.lse_sb + h * p.lse_sh + (static_cast<i64>(seq_out.q0) + row) * p.lse_ss] = val;
            }
        }

    // Stage O_i through this warp's own rows of the Q_i buffer (only this warp read them, or with
    // SPLIT_Q no warp reads the buffer any more), then write whole 16-byte chunks per lane so global
    // stores are coalesced.
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const float x0 = acc_o[mt][dt][2 * hh] * inv_l[mt][hh];
                const float x1 = acc_o[mt][dt][2 * hh + 1] * inv_l[mt][hh];
                const u32 addr = sQ_warp + (mt * 16 + g + hh * 8) * kRowBytes + (dt * 8 + 2 * t) * kElemBytes;
#if DTYPE == 3
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x0), "f"(x1) : "memory");
#else
                asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(pack2<Elem>(x0, x1)) : "memory");
#endif
            }
    __syncwarp();  // this warp's staged rows are complete before its lanes read across them

    char* const o_base = static_cast<char*>(p.out) + (b * p.o_st.b + h * p.o_st.h + seq_out.q0 * p.o_st.s) * kElemBytes;
    constexpr int kOutIters = (kWarpRows * kRowChunks + 31) / 32;
#pragma unroll
    for (int it = 0; it < kOutIters; ++it) {
        const int c = lane + it * 32;
        const int r = c / kRowChunks;
        const int col0 = (c % kRowChunks) * kChunkElems;
        const int row = row0 + warp * kWarpRows + r;
        if (r >= kWarpRows || row >= seq_out.seqlen_q || col0 >= head_dim_v) continue;
        u32 w[4];
        lds_128(sQ_warp + r * kRowBytes + col0 * kElemBytes, w[0], w[1], w[2], w[3]);
        char* const o_row = o_base + static_cast<i64>(row) * p.o_st.s * kElemBytes;
        if (p.vec_out && col0 + kChunkElems <= head_dim_v) {
            *reinterpret_cast<uint4*>(o_row + col0 * kElemBytes) = make_uint4(w[0], w[1], w[2], w[3]);
        } else {
#pragma unroll
            for (int e = 0; e < kChunkElems; ++e) {
                if (col0 + e < head_dim_v) {
                    char* const pe = o_row + static_cast<i64>(col0 + e) * p.o_st.d * kElemBytes;
#if DTYPE == 3
                    *reinterpret_cast<u32*>(pe) = w[e];
#else
                    *reinterpret_cast<u16*>(pe) = static_cast<u16>(w[e / 2] >> (16 * (e % 2)));
#endif
                }
            }
        }
    }
}
