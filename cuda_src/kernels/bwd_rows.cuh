// FlashAttention backward by recomputation (FlashAttention-2 order): P_ij = exp2(S_ij * scale * log2 e
// - LSE_i * log2 e) is rebuilt tile by tile, never stored in device memory, and
//   dV_j += P_ij^T dO_i,   dP_ij = dO_i V_j^T,   dS_ij = P_ij o (dP_ij - D_i),
//   dK_j += scale * dS_ij^T Q_i,   dQ_i += scale * dS_ij K_j,   with D_i = rowsum(dO_i o O_i).
//
// What the two kernels of bwd_dkdv_f32.cu and bwd_dq.cu share, written for a warp that owns 16 rows
// and streams tiles of columns. The including kernel defines ROLE:
//   ROLE 0, flash_bwd_dkdv, float32 only (the 16-bit dK/dV kernels are bwd_dkdv_sm80.cu and
//     bwd_dkdv_sm90.cu): a CTA owns K_j, V_j (BLOCK_OWN keys) of one key/value head and
//     streams Q_i, dO_i (BLOCK_STREAM queries) of every query head of its share of the GQA group,
//     so dK_j and dV_j (summed over those heads) stay in registers. The warp computes the
//     transposed tiles S^T = K_j Q_i^T and dP^T = V_j dO_i^T: their accumulator layout is exactly
//     the A operand of dV += P^T dO and dK += dS^T Q, so P and dS never leave registers for those
//     two products.
//     With DQ_ATOMIC, dS^T also goes through shared memory for dQ_i += dS K_j, added to a float32
//     workspace with atomics (run-to-run bit differences, as floating-point addition reorders).
//   ROLE 1, flash_bwd_dq: a CTA owns Q_i, dO_i and streams K_j, V_j, accumulating dQ_i in registers
//     (the deterministic path: it recomputes S and dP, 7 products per tile pair instead of 5).
//
// Configuration (#define lines from the variant table, cuflash/_cuda/variants.py):
//   HEAD_DIM     bucket of max(D, Dv), a multiple of 32; smaller D/Dv are zero-padded on load
//   BLOCK_OWN    rows the CTA owns (16 per warp row group)   BLOCK_STREAM  rows per streamed tile
//   NUM_WARPS    warps per CTA     SPLIT_D  warps sharing one 16-row group, each owning HEAD_DIM /
//                SPLIT_D accumulator columns (large head dims; S and dP are then computed by each)
//   STAGES       streamed tiles in flight (2 = double buffering)   MIN_BLOCKS  for __launch_bounds__
//   KK_UNROLL    unroll of the k16 loop of the S and dP products (registers against latency hiding)
//   DQ_ATOMIC    ROLE 0 only: also accumulate dQ with atomics
//   SPLIT_STREAM ROLE 0 float32 only: split each streamed tile once into tf32 planes
//   SMEM_BYTES   the launcher's dynamic shared memory, checked against the layout below
//   DTYPE        1 float16, 2 bfloat16 (mma.m16n8k16), 3 float32 (3xTF32 mma.m16n8k8)
//   SCORE_MODS   score modifiers (attn/score_mod.cuh)
//   SEQ_MODE     0 dense, 1 ragged (attn/seqlen.cuh)
//
// Masking: attn/mask.cuh. The preprocess kernel (bwd_aux.cu) hands over L2_i = LSE_i * log2 e,
// +inf for rows that see no key and for the padding rows up to a multiple of 128, so
// exp2(logit - L2_i) = 0 there, never NaN.
#pragma once

#include "../attn/mask.cuh"
#include "../attn/schedule.cuh"
#include "../attn/score_mod.cuh"
#include "../attn/softmax.cuh"
#include "../core/elem.cuh"
#include "../core/tile_io.cuh"

#if !defined(ROLE) || !defined(HEAD_DIM) || !defined(BLOCK_OWN) || !defined(BLOCK_STREAM) || !defined(NUM_WARPS) || \
    !defined(SPLIT_D) || !defined(STAGES) || !defined(MIN_BLOCKS) || !defined(KK_UNROLL) || !defined(DQ_ATOMIC) || \
    !defined(SPLIT_STREAM) || !defined(SMEM_BYTES)
#error "bwd_rows.cuh needs ROLE, HEAD_DIM, BLOCK_OWN, BLOCK_STREAM, NUM_WARPS, SPLIT_D, STAGES, MIN_BLOCKS, KK_UNROLL, DQ_ATOMIC, SPLIT_STREAM, SMEM_BYTES"
#endif

namespace cuflash {
namespace bwd {

constexpr bool kKeyRows = ROLE == 0;  // rows are keys (dK/dV kernel) or queries (dQ kernel)
constexpr bool kDQAtomic = ROLE == 0 && DQ_ATOMIC != 0;
// float32: each streamed tile is split once, right after it lands, into big and small tf32 planes
// (the second kStreamTileBytes after the first), instead of by every warp at every fragment load.
constexpr bool kSplitStream = SPLIT_STREAM != 0;
constexpr int kHeadDim = HEAD_DIM;
constexpr int kOwn = BLOCK_OWN;
constexpr int kStream = BLOCK_STREAM;
constexpr int kWarps = NUM_WARPS;
constexpr int kThreads = 32 * kWarps;
constexpr int kSplitD = SPLIT_D;
constexpr int kStages = STAGES;
constexpr int kRowGroups = kWarps / kSplitD;      // 16-row groups of the owned tile
constexpr int kAccCols = kHeadDim / kSplitD;      // accumulator columns per warp
constexpr int kAccTiles = kAccCols / 8;           // n8 fragments of dK/dV (or dQ) per warp
constexpr int kColTiles = kStream / 8;            // n8 fragments of S/dP per warp
constexpr int kChunkElems = 16 / kElemBytes;      // elements per 16-byte cp.async chunk
constexpr int kRowChunks = kHeadDim / kChunkElems;
// One 16-byte pad per row: the 8 row addresses of an ldmatrix (and the 8 rows of a tf32 fragment)
// fall in 8 different 16-byte bank groups, so tiles load without bank conflicts.
constexpr int kRowBytes = (kHeadDim + kChunkElems) * kElemBytes;
constexpr int kOwnTileBytes = kOwn * kRowBytes;
constexpr int kStreamTileBytes = kStream * kRowBytes;
constexpr int kStreamStride = (kSplitStream ? 2 : 1) * kStreamTileBytes;  // one streamed tile with its planes
constexpr int kVecBytes = kKeyRows ? kStream * 4 : 0;  // L2 or D of one streamed query tile
constexpr int kDSRowBytes = kStream * kElemBytes + 16;  // dS^T staging row (padded like the tiles)
constexpr int kDSBytes = kDQAtomic ? kOwn * kDSRowBytes : 0;  // one of two dS^T buffers
// Shared memory: owned A (K_j | Q_i), owned B (V_j | dO_i), kStages streamed A tiles, kStages
// streamed B tiles (each followed by its small plane with SPLIT_STREAM), kStages L2 vectors,
// kStages D vectors, two dS^T buffers.
constexpr int kOffOwnB = kOwnTileBytes;
constexpr int kOffStreamA = 2 * kOwnTileBytes;
constexpr int kOffStreamB = kOffStreamA + kStages * kStreamStride;
constexpr int kOffL2 = kOffStreamB + kStages * kStreamStride;
constexpr int kOffD = kOffL2 + kStages * kVecBytes;
constexpr int kOffDS = kOffD + kStages * kVecBytes;
constexpr int kSmemBytes = kOffDS + 2 * kDSBytes;
// dQ_i += dS K_j (DQ_ATOMIC): the (query, dim) output is cut into 16 x 16 units; the warps of
// one 16-row group take every kDQUnitStride-th unit of it, at most 4 units (64 columns) per pass so
// the partial sums stay small beside dK and dV.
constexpr int kDQRowGroups = kStream / 16;
constexpr int kDQUnits = kHeadDim / 16;
constexpr int kDQUnitStride = kWarps / kDQRowGroups > 0 ? kWarps / kDQRowGroups : 1;
constexpr int kDQUnitsPerWarp = (kDQUnits + kDQUnitStride - 1) / kDQUnitStride;
constexpr int kDQPassUnits = kDQUnitsPerWarp < 4 ? kDQUnitsPerWarp : 4;
constexpr int kDQPasses = (kDQUnitsPerWarp + kDQPassUnits - 1) / kDQPassUnits;

static_assert(ROLE == 0 || ROLE == 1, "ROLE must be 0 (dK/dV) or 1 (dQ)");
static_assert(ROLE == 0 || DQ_ATOMIC == 0, "DQ_ATOMIC belongs to the dK/dV kernel");
static_assert(ROLE == 1 || kIsF32, "the 16-bit dK/dV kernels are bwd_dkdv_sm80.cu and bwd_dkdv_sm90.cu");
static_assert(!kSplitStream || (kIsF32 && ROLE == 0), "SPLIT_STREAM belongs to the float32 dK/dV kernel");
static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "HEAD_DIM must be a multiple of 32 in 32..256");
static_assert(kWarps >= 1 && kWarps <= 16, "NUM_WARPS must be in 1..16");
static_assert(kWarps % kSplitD == 0, "NUM_WARPS must be a multiple of SPLIT_D");
static_assert(kOwn == 16 * kRowGroups, "BLOCK_OWN must be 16 rows per warp row group (16 * NUM_WARPS / SPLIT_D)");
static_assert(kAccCols % (kIsF32 ? 8 : 16) == 0,
              "HEAD_DIM / SPLIT_D must be a multiple of 16 (two n8 fragments per ldmatrix; 8 for float32)");
static_assert(kStream % 16 == 0 && kStream <= 128, "BLOCK_STREAM must be a multiple of 16, at most 128");
static_assert(128 % kOwn == 0 && 128 % kStream == 0, "tile sizes must divide the 128-row padding of L2 and D");
static_assert(kStages == 2, "the streamed tiles are double buffered");
static_assert(!kDQAtomic || kWarps % kDQRowGroups == 0, "the dQ product needs NUM_WARPS to be a multiple of BLOCK_STREAM / 16");
static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KiB an sm_90 CTA can have");
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from variants.py) must match this layout");
static_assert((kRowBytes / 4) % 32 == 4 || (kRowBytes / 4) % 32 == 20 || (kRowBytes / 4) % 32 == 12 ||
                  (kRowBytes / 4) % 32 == 28,
              "row stride must keep ldmatrix/tf32 fragment rows on distinct bank groups");

template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, bool vec, int tid,
                                          int row_lo = 0) {
    cuflash::load_tile<ROWS, kHeadDim, kElemBytes, kThreads, PaddedRows<kRowBytes>>(smem, t, row0, nrows, ncols, vec, tid, row_lo);
}

// SPLIT_STREAM: rewrites a streamed tile as its big tf32 plane and writes the small plane
// kStreamTileBytes further. Each thread takes the 16-byte chunks it loaded itself (core/tile_io.cuh's
// load_tile: chunk tid % kRowChunks of rows tid / kRowChunks + j * kRowsPerPass), so only its own
// cp.async wait is needed first.
__device__ __forceinline__ void split_stream_tile(u32 tile, int tid) {
    constexpr int kRowsPerPass = kThreads / kRowChunks;
    const int r = tid / kRowChunks, chunk = tid % kRowChunks;
    if (r >= kRowsPerPass) return;
#pragma unroll 1
    for (int row = r; row < kStream; row += kRowsPerPass) {
        const u32 addr = tile + row * kRowBytes + chunk * 16;
        u32 x[4], big[4], small[4];
        lds_128(addr, x[0], x[1], x[2], x[3]);
#pragma unroll
        for (int e = 0; e < 4; ++e) split_tf32(__uint_as_float(x[e]), big[e], small[e]);
        sts_128(addr, big[0], big[1], big[2], big[3]);
        sts_128(addr + kStreamTileBytes, small[0], small[1], small[2], small[3]);
    }
}

#if DTYPE != 3
constexpr int kKKUnroll = KK_UNROLL;

// acc[c] += A_w B^T over the 16 rows of A_w and the kStream rows of B, contracting all HEAD_DIM
// columns: A_w row-major (ldmatrix), B's rows are the columns of B^T (the "col" B layout).
__device__ __forceinline__ void product_rows_by_rows(float (&acc)[kColTiles][4], u32 sA_w, u32 sB, int lane) {
    const u32 a_lane = sA_w + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
    const u32 b_lane = sB + ((lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16;
    // Unrolled by KK_UNROLL only: hoisting the B fragments of every k16 step costs registers that
    // dK and dV need (ptxas spilled at 64-query tiles when fully unrolled).
#pragma unroll kKKUnroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        u32 a[4];
        ldmatrix_x4(a, a_lane + kk * 32);
#pragma unroll
        for (int np = 0; np < kColTiles / 2; ++np) {
            u32 b[4];
            ldmatrix_x4(b, b_lane + np * 16 * kRowBytes + kk * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
            mma_m16n8k16<Elem>(acc[2 * np], a, b0);
            mma_m16n8k16<Elem>(acc[2 * np + 1], a, b1);
        }
    }
}

// P or dS of this warp's 16 rows as the A operand of the products that follow: the f32 accumulator
// layout of two adjacent n8 tiles is one k16 A fragment, packed to 16-bit pairs (half the registers,
// which is what lets a 64-query tile fit beside dK and dV). dS is computed from these rounded P
// values, as a same-dtype computation would.
struct Operand {
    u32 a[kColTiles / 2][4];

    __device__ __forceinline__ void set(const float (&x)[kColTiles][4]) {
#pragma unroll
        for (int kk = 0; kk < kColTiles / 2; ++kk) {
            a[kk][0] = pack2<Elem>(x[2 * kk][0], x[2 * kk][1]);
            a[kk][1] = pack2<Elem>(x[2 * kk][2], x[2 * kk][3]);
            a[kk][2] = pack2<Elem>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
            a[kk][3] = pack2<Elem>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
        }
    }

    // Element e of accumulator tile ct, back in f32.
    __device__ __forceinline__ float get(int ct, int e) const {
        const u32 w = a[ct >> 1][(ct & 1) * 2 + (e >> 1)];
        return to_float<Elem>(static_cast<u16>((e & 1) ? (w >> 16) : (w & 0xffffu)));
    }
};

// acc[n] += X_w B[:, col0 + n] with X_w (16 x kStream) in registers as an Operand; B is row-major
// [stream row][dim], so ldmatrix.trans yields its fragments. sB points at column col0.
__device__ __forceinline__ void product_regs_by_tile(float (&acc)[kAccTiles][4], const Operand& x, u32 sB, int lane) {
    const u32 b_lane = sB + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
#pragma unroll
    for (int kk = 0; kk < kStream / 16; ++kk) {
#pragma unroll
        for (int dp = 0; dp < kAccTiles / 2; ++dp) {
            u32 b[4];
            ldmatrix_x4_trans(b, b_lane + kk * 16 * kRowBytes + dp * 32);
            const u32 b0[2] = {b[0], b[1]};
            const u32 b1[2] = {b[2], b[3]};
            mma_m16n8k16<Elem>(acc[2 * dp], x.a[kk], b0);
            mma_m16n8k16<Elem>(acc[2 * dp + 1], x.a[kk], b1);
        }
    }
}

#else
// 3xTF32: each f32 operand x = big + small (both tf32); big*big' + big*small' + small*big' on
// tensor cores keeps the products at f32 accuracy (plain TF32 would lose ~3 decimal digits).
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const u32 (&a_big)[4], const u32 (&a_small)[4],
                                           const u32 (&b_big)[2], const u32 (&b_small)[2]) {
    mma_m16n8k8_tf32(d, a_small, b_big);
    mma_m16n8k8_tf32(d, a_big, b_small);
    mma_m16n8k8_tf32(d, a_big, b_big);
}

// Tensor cores add into the f32 accumulator without round-to-nearest, so the error of one long
// chain of mma grows with its length (a 1025-query dV sum came out ~50x worse than float32
// rounding). The float32 products below run short chains into a zeroed partial sum and add that
// into the accumulator with an ordinary, correctly rounded FADD.
// k8 steps (12 mma) per partial sum; at least two chunks, as one lets the compiler interleave the
// S and dP products and spill.
constexpr int kChainK8 = kHeadDim >= 64 ? 4 : 2;

// acc[c] += A_w B^T (see the 16-bit version). A b16 ldmatrix reads 32-bit elements as pairs, so on
// rows of f32 it yields exactly the tf32 fragments: with the 16-bit kernel's lane addresses, one
// x4 load gives the A fragment of a k8 step, or the B fragments of two n8 tiles.
__device__ __forceinline__ void product_rows_by_rows(float (&acc)[kColTiles][4], u32 sA_w, u32 sB, int lane) {
    const u32 a_lane = sA_w + ((lane & 7) + ((lane >> 3) & 1) * 8) * kRowBytes + (lane >> 4) * 16;
    const u32 b_lane = sB + ((lane & 7) + (lane >> 4) * 8) * kRowBytes + ((lane >> 3) & 1) * 16;
    // Not unrolled: hoisting every chunk's loads (two registers each after the split) spilled.
#pragma unroll 1
    for (int k0 = 0; k0 < kHeadDim / 8; k0 += kChainK8) {
        float part[kColTiles][4];
#pragma unroll
        for (int nt = 0; nt < kColTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[nt][e] = 0.f;
#pragma unroll
        for (int kk = k0; kk < k0 + kChainK8; ++kk) {
            u32 a[4], a_big[4], a_small[4];
            ldmatrix_x4(a, a_lane + kk * 32);
#pragma unroll
            for (int i = 0; i < 4; ++i) split_tf32(__uint_as_float(a[i]), a_big[i], a_small[i]);
#pragma unroll
            for (int np = 0; np < kColTiles / 2; ++np) {
                const u32 ba = b_lane + np * 16 * kRowBytes + kk * 32;
                u32 b[4];
                ldmatrix_x4(b, ba);
                if constexpr (kSplitStream) {
                    u32 bs[4];
                    ldmatrix_x4(bs, ba + kStreamTileBytes);
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const u32 b_big[2] = {b[2 * half], b[2 * half + 1]};
                        const u32 b_small[2] = {bs[2 * half], bs[2 * half + 1]};
                        mma_3xtf32(part[2 * np + half], a_big, a_small, b_big, b_small);
                    }
                } else {
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        u32 b_big[2], b_small[2];
                        split_tf32(__uint_as_float(b[2 * half]), b_big[0], b_small[0]);
                        split_tf32(__uint_as_float(b[2 * half + 1]), b_big[1], b_small[1]);
                        mma_3xtf32(part[2 * np + half], a_big, a_small, b_big, b_small);
                    }
                }
            }
        }
#pragma unroll
        for (int nt = 0; nt < kColTiles; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] += part[nt][e];
    }
}

// P or dS of this warp's 16 rows, kept in f32 (the 3xTF32 split happens in the product).
struct Operand {
    float x[kColTiles][4];

    __device__ __forceinline__ void set(const float (&v)[kColTiles][4]) {
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
            for (int e = 0; e < 4; ++e) x[ct][e] = v[ct][e];
    }

    __device__ __forceinline__ float get(int ct, int e) const { return x[ct][e]; }

    __device__ __forceinline__ void store(u32 row_g, u32 row_bytes, int lane) const {
        const int t = lane & 3;
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct) {
            const u32 addr = row_g + (ct * 8 + 2 * t) * 4;
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x[ct][0]), "f"(x[ct][1]) : "memory");
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr + 8 * row_bytes), "f"(x[ct][2]), "f"(x[ct][3])
                         : "memory");
        }
    }
};

// acc[n] += X_w B[:, col0 + n]. The k8 step over stream rows uses the permutation k = t <-> row 2t,
// k = t + 4 <-> row 2t + 1, under which the accumulator fragment of X is already the A fragment
// (no shuffles); the B fragment reads the same rows of B. Each n8 column tile sums its kStream
// rows in one short chain (kStream / 8 <= 16 k8 steps) and is then added with FADD.
__device__ __forceinline__ void product_regs_by_tile(float (&acc)[kAccTiles][4], const Operand& op, u32 sB, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const u32 b_lane = sB + 2 * t * kRowBytes + g * 4;
    u32 a_big[kColTiles][4], a_small[kColTiles][4];
#pragma unroll
    for (int ct = 0; ct < kColTiles; ++ct) {
        split_tf32(op.x[ct][0], a_big[ct][0], a_small[ct][0]);
        split_tf32(op.x[ct][2], a_big[ct][1], a_small[ct][1]);
        split_tf32(op.x[ct][1], a_big[ct][2], a_small[ct][2]);
        split_tf32(op.x[ct][3], a_big[ct][3], a_small[ct][3]);
    }
#pragma unroll
    for (int nt = 0; nt < kAccTiles; ++nt) {
        float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct) {
            const u32 ba = b_lane + ct * 8 * kRowBytes + nt * 32;
            u32 b_big[2], b_small[2];
            if constexpr (kSplitStream) {
                b_big[0] = __float_as_uint(lds_f32(ba));
                b_big[1] = __float_as_uint(lds_f32(ba + kRowBytes));
                b_small[0] = __float_as_uint(lds_f32(ba + kStreamTileBytes));
                b_small[1] = __float_as_uint(lds_f32(ba + kStreamTileBytes + kRowBytes));
            } else {
                split_tf32(lds_f32(ba), b_big[0], b_small[0]);
                split_tf32(lds_f32(ba + kRowBytes), b_big[1], b_small[1]);
            }
            mma_3xtf32(part, a_big[ct], a_small[ct], b_big, b_small);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] += part[e];
    }
}

// acc[u] += sum_key dS^T[key][m] K[key][unit u's columns], with the same key permutation inside
// each k8 step as product_regs_by_tile.
template <typename UnitOf>
__device__ __forceinline__ void product_dq(float (&acc)[kDQPassUnits][2][4], u32 sDS, u32 sK, UnitOf unit_of, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const u32 a_lane = sDS + 2 * t * kDSRowBytes + g * 4;
    const u32 b_lane = sK + 2 * t * kRowBytes + g * 4;
#pragma unroll
    for (int kk = 0; kk < kOwn / 8; ++kk) {
        u32 a_big[4], a_small[4];
        const u32 aa = a_lane + kk * 8 * kDSRowBytes;
        split_tf32(lds_f32(aa), a_big[0], a_small[0]);
        split_tf32(lds_f32(aa + 32), a_big[1], a_small[1]);
        split_tf32(lds_f32(aa + kDSRowBytes), a_big[2], a_small[2]);
        split_tf32(lds_f32(aa + kDSRowBytes + 32), a_big[3], a_small[3]);
#pragma unroll
        for (int u = 0; u < kDQPassUnits; ++u) {
            const int unit = unit_of(u);
            if (unit >= kDQUnits) continue;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const u32 ba = b_lane + kk * 8 * kRowBytes + unit * 64 + half * 32;
                u32 b_big[2], b_small[2];
                split_tf32(lds_f32(ba), b_big[0], b_small[0]);
                split_tf32(lds_f32(ba + kRowBytes), b_big[1], b_small[1]);
                mma_3xtf32(acc[u][half], a_big, a_small, b_big, b_small);
            }
        }
    }
}

#endif

// The ALiBi distance i + offset - j of column `col`, from that of column 0.
__device__ __forceinline__ float col_dist(float dist0, int col) {
    return kKeyRows ? dist0 + static_cast<float>(col) : dist0 - static_cast<float>(col);
}

__device__ __forceinline__ void zero(float (&x)[kColTiles][4]) {
#pragma unroll
    for (int i = 0; i < kColTiles; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
}

__device__ __forceinline__ void zero_acc(float (&x)[kAccTiles][4]) {
#pragma unroll
    for (int i = 0; i < kAccTiles; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
}

// Turns the scores x (16 rows x kStream columns) into P = exp2(logit - L2) in place; l2_of(row
// half, column) supplies L2 of the query of that entry, dist0[h] the ALiBi distance i + offset - j
// of column 0 in row half h (one column further moves it by +1 when the rows are keys, -1 when they
// are queries). With `mask`, the columns of row half h outside [lo[h], hi[h]] get P = 0 exactly.
template <typename L2Of>
__device__ __forceinline__ void scores_to_p(float (&x)[kColTiles][4], const ScoreMod& mod, bool mask,
                                            const int (&lo)[2], const int (&hi)[2], const float (&dist0)[2],
                                            L2Of l2_of, int lane) {
    const int t = lane & 3;
#pragma unroll
    for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = ct * 8 + 2 * t + (e & 1), h = e >> 1;
            float p = p_from_lse(mod.logit2(x[ct][e], col_dist(dist0[h], col)), l2_of(h, col));
            if (mask && (col < lo[h] || col > hi[h])) p = 0.f;
            x[ct][e] = p;
        }
}

}  // namespace bwd
}  // namespace cuflash

