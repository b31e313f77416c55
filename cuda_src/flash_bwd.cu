// FlashAttention backward by recomputation (FlashAttention-2 order): P_ij = exp2(S_ij * scale * log2 e
// - LSE_i * log2 e) is rebuilt tile by tile, never stored in device memory, and
//   dV_j += P_ij^T dO_i,   dP_ij = dO_i V_j^T,   dS_ij = P_ij o (dP_ij - D_i),
//   dK_j += scale * dS_ij^T Q_i,   dQ_i += scale * dS_ij K_j,   with D_i = rowsum(dO_i o O_i).
//
// Two kernels share one loop, written for a warp that owns 16 rows and streams tiles of columns:
//   ROLE 0, flash_bwd_dkdv, float32 only (the 16-bit dK/dV kernels are flash_bwd_dkdv.cu and
//     flash_bwd_dkdv_sm90.cu): a CTA owns K_j, V_j (BLOCK_OWN keys) of one key/value head and
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
// Configuration (#define lines from cuflash/_cuda/backward.py, one table there):
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
//
// Visibility: query i sees key j iff i < Sq, j < Sk and (!causal or j <= i + causal_offset). The
// preprocess kernel (flash_bwd_aux.cu) hands over L2_i = LSE_i * log2 e, +inf for rows that see no
// key and for the padding rows up to a multiple of 128, so exp2(s - L2_i) = 0 there, never NaN.
#include "bwd_tiles.cuh"

#if !defined(ROLE) || !defined(HEAD_DIM) || !defined(BLOCK_OWN) || !defined(BLOCK_STREAM) || !defined(NUM_WARPS) || \
    !defined(SPLIT_D) || !defined(STAGES) || !defined(MIN_BLOCKS) || !defined(KK_UNROLL) || !defined(DQ_ATOMIC) || \
    !defined(SPLIT_STREAM) || !defined(SMEM_BYTES) || !defined(DTYPE)
#error "flash_bwd.cu needs ROLE, HEAD_DIM, BLOCK_OWN, BLOCK_STREAM, NUM_WARPS, SPLIT_D, STAGES, MIN_BLOCKS, KK_UNROLL, DQ_ATOMIC, SPLIT_STREAM, SMEM_BYTES, DTYPE"
#endif

namespace cuflash {
namespace bwd {

#if DTYPE == 1
using Elem = Half;
#elif DTYPE == 2
using Elem = BFloat16;
#elif DTYPE == 3
using Elem = float;
#else
#error "DTYPE must be 1 (float16), 2 (bfloat16) or 3 (float32)"
#endif

constexpr bool kIsF32 = DTYPE == 3;
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
constexpr int kElemBytes = kIsF32 ? 4 : 2;
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
static_assert(ROLE == 1 || kIsF32, "the 16-bit dK/dV kernel is flash_bwd_dkdv.cu");
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
static_assert(kSmemBytes == SMEM_BYTES, "the launcher's shared memory (SMEM_BYTES, from backward.py) must match this layout");
static_assert((kRowBytes / 4) % 32 == 4 || (kRowBytes / 4) % 32 == 20 || (kRowBytes / 4) % 32 == 12 ||
                  (kRowBytes / 4) % 32 == 28,
              "row stride must keep ldmatrix/tf32 fragment rows on distinct bank groups");

using bwd_tiles::lds_f32x2;
using bwd_tiles::Tensor;

template <int ROWS>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, bool vec, int tid) {
    bwd_tiles::load_tile<ROWS, kHeadDim, kElemBytes, kThreads, bwd_tiles::PaddedRows<kRowBytes>>(smem, t, row0, nrows, ncols, vec, tid);
}

// SPLIT_STREAM: rewrites a streamed tile as its big tf32 plane and writes the small plane
// kStreamTileBytes further. Each thread takes the 16-byte chunks it loaded itself (chunk tid + j *
// kThreads, as bwd_tiles::load_tile assigns them), so only its own cp.async wait is needed first.
__device__ __forceinline__ void split_stream_tile(u32 tile, int tid) {
    constexpr int kChunks = kStream * kRowChunks;
#pragma unroll 1
    for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
        const int c = c0 + tid;
        if (kChunks % kThreads != 0 && c >= kChunks) break;
        const u32 addr = tile + (c / kRowChunks) * kRowBytes + (c % kRowChunks) * 16;
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

// Turns the scores x (16 rows x kStream columns) into P = exp2(x * scale_log2 - L2) in place; l2_of(row
// half, column) supplies L2 of the query of that entry. With `mask`, the visible columns of row half
// h are those >= bound[h] (dK/dV kernel: rows are keys, a key is seen from some query on) or
// <= bound[h] (dQ kernel: a query sees keys up to some key); the others get P = 0 exactly.
template <typename L2Of>
__device__ __forceinline__ void scores_to_p(float (&x)[kColTiles][4], float scale_log2, bool mask,
                                            const int (&bound)[2], L2Of l2_of, int lane) {
    const int t = lane & 3;
#pragma unroll
    for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = ct * 8 + 2 * t + (e & 1);
            float p = exp2_approx(fmaf(x[ct][e], scale_log2, -l2_of(e >> 1, col)));
            if (mask && (kKeyRows ? col < bound[e >> 1] : col > bound[e >> 1])) p = 0.f;
            x[ct][e] = p;
        }
}

// Clamps a 64-bit column bound into [-1, kStream], which keeps every comparison above exact.
__device__ __forceinline__ int clamp_bound(i64 x) {
    return x < -1 ? -1 : (x > kStream ? kStream : static_cast<int>(x));
}

}  // namespace bwd
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::bwd;

#if ROLE == 0
// Grid and work of a CTA: bwd_tiles::kv_work. With f32_out its partial sums of dK (already scaled) and dV go to a float32 workspace indexed by
// split, summed later in a fixed order; otherwise straight to dk and dv. Strides are in elements.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS)
flash_bwd_dkdv(const void* __restrict__ q, const void* __restrict__ k, const void* __restrict__ v,
               const void* __restrict__ dout, const float* __restrict__ l2, const float* __restrict__ dsum,
               float* __restrict__ dq_accum, void* __restrict__ dk, void* __restrict__ dv, i64 q_sb, i64 q_ss,
               i64 q_sh, i64 q_sd, i64 k_sb, i64 k_ss, i64 k_sh, i64 k_sd, i64 v_sb, i64 v_ss, i64 v_sh, i64 v_sd,
               i64 do_sb, i64 do_ss, i64 do_sh, i64 do_sd, i64 dk_split, i64 dk_sb, i64 dk_ss, i64 dk_sh, i64 dk_sd,
               i64 dv_split, i64 dv_sb, i64 dv_ss, i64 dv_sh, i64 dv_sd, int heads_q, int heads_kv, int group,
               int heads_per_split, int splits, int seqlen_q, int seqlen_q_pad, int seqlen_k, int head_dim,
               int head_dim_v, int causal, i64 causal_offset, float scale_log2, float scale, int n_tiles, int vec_in,
               int f32_out) {
    extern __shared__ __align__(128) char smem[];
    const u32 s_base = smem_addr(smem);
    const u32 sK = s_base, sV = s_base + kOffOwnB;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rg = warp % kRowGroups, ds = warp / kRowGroups;

    const bwd_tiles::KvWork work = bwd_tiles::kv_work<kOwn, kStream>(n_tiles, splits, heads_kv, group,
                                                                      heads_per_split, causal, causal_offset, seqlen_q);
    const i64 b = work.b;
    const int split = work.split, h_kv = work.h_kv, key0 = work.key0, n_iter = work.n_iter;

    const bool vec = vec_in != 0;
    const Tensor tk{static_cast<const char*>(k) + (b * k_sb + h_kv * k_sh) * kElemBytes, k_ss, k_sd};
    const Tensor tv{static_cast<const char*>(v) + (b * v_sb + h_kv * v_sh) * kElemBytes, v_ss, v_sd};

    // Tiles needing no mask: K_j inside Sk and, when causal, every key of K_j visible to query i0.
    const bool key_tail = key0 + kOwn > seqlen_k;

    auto load_stream = [&](bwd_tiles::KvStep x, int stage) {
        const int h = x.h;
        const int i0 = x.m * kStream;
        const Tensor tq{static_cast<const char*>(q) + (b * q_sb + static_cast<i64>(h) * q_sh) * kElemBytes, q_ss, q_sd};
        const Tensor tdo{static_cast<const char*>(dout) + (b * do_sb + static_cast<i64>(h) * do_sh) * kElemBytes, do_ss,
                         do_sd};
        load_tile<kStream>(s_base + kOffStreamA + stage * kStreamStride, tq, i0, seqlen_q, head_dim, vec, tid);
        load_tile<kStream>(s_base + kOffStreamB + stage * kStreamStride, tdo, i0, seqlen_q, head_dim_v, vec, tid);
        const i64 vec_off = (b * heads_q + h) * static_cast<i64>(seqlen_q_pad) + i0;
        bwd_tiles::load_vec<kStream, kThreads>(s_base + kOffL2 + stage * kVecBytes, l2 + vec_off, tid);
        bwd_tiles::load_vec<kStream, kThreads>(s_base + kOffD + stage * kVecBytes, dsum + vec_off, tid);
    };

    load_tile<kOwn>(sK, tk, key0, seqlen_k, head_dim, vec, tid);
    load_tile<kOwn>(sV, tv, key0, seqlen_k, head_dim_v, vec, tid);
    bwd_tiles::KvStep cur = work.first(), prev = cur;
    if (n_iter > 0) load_stream(cur, 0);
    cp_async_commit();

    float acc_dk[kAccTiles][4], acc_dv[kAccTiles][4];
    zero_acc(acc_dk);
    zero_acc(acc_dv);
    const int acc_col0 = ds * kAccCols;

    // dQ_i += dS K_j for the tile of iteration `it` from its staged dS^T, added to the float32 workspace
    // (B, Hq, Sq_pad, HEAD_DIM), where every row and column of the tile exists.
    auto add_dq_tile = [&](int it, bwd_tiles::KvStep x) {
        const int h = x.h;
        const int i0 = x.m * kStream;
        const int mg = warp % kDQRowGroups, cg = warp / kDQRowGroups;
        const int m0 = mg * 16;
        const u32 sDS = s_base + kOffDS + (it & 1) * kDSBytes + m0 * kElemBytes;
        float* const dq_rows = dq_accum + ((b * heads_q + h) * static_cast<i64>(seqlen_q_pad) + i0 + m0) * kHeadDim;
#pragma unroll
        for (int pass = 0; pass < kDQPasses; ++pass) {
            auto unit_of = [&](int u) { return cg + (pass * kDQPassUnits + u) * kDQUnitStride; };
            if (unit_of(0) * 16 >= head_dim) break;
            float acc_dq[kDQPassUnits][2][4];
#pragma unroll
            for (int u = 0; u < kDQPassUnits; ++u)
#pragma unroll
                for (int e = 0; e < 8; ++e) acc_dq[u][e >> 2][e & 3] = 0.f;
            product_dq(acc_dq, sDS, sK, unit_of, lane);
#pragma unroll
            for (int u = 0; u < kDQPassUnits; ++u)
                if (unit_of(u) < kDQUnits) bwd_tiles::add_dq_block<kHeadDim>(dq_rows + unit_of(u) * 16, acc_dq[u][0], acc_dq[u][1], lane);
        }
    };

#pragma unroll 1
    for (int it = 0; it < n_iter; ++it) {
        const int stage = it & 1;
        cp_async_wait<0>();
        if constexpr (kSplitStream) {
            split_stream_tile(s_base + kOffStreamA + stage * kStreamStride, tid);
            split_stream_tile(s_base + kOffStreamB + stage * kStreamStride, tid);
        }
        // Tile `it` has landed (and is split) for every thread; every warp is done with tile it-1,
        // whose stage the load below refills, and has staged dS^T of it-1 and read that of it-2.
        __syncthreads();
        const bwd_tiles::KvStep step = cur;
        cur = work.next(cur);
        if (it + 1 < n_iter) load_stream(cur, stage ^ 1);
        cp_async_commit();

        const int i0 = step.m * kStream;
        // Addresses from a fresh base: hoisted out of the loop, the invariant K_j/V_j fragment
        // addresses held registers for the whole loop and the 128 x 16 tile spilled.
        const u32 base = fresh(s_base);
        const u32 sK_w = base + rg * 16 * kRowBytes;
        const u32 sV_w = base + kOffOwnB + rg * 16 * kRowBytes;
        const u32 sQ = base + kOffStreamA + stage * kStreamStride;
        const u32 sdO = base + kOffStreamB + stage * kStreamStride;
        const u32 sL2 = base + kOffL2 + stage * kVecBytes;
        const u32 sD = base + kOffD + stage * kVecBytes;
        const bool mask = key_tail || (causal && static_cast<i64>(key0) + kOwn - 1 > static_cast<i64>(i0) + causal_offset);
        const int key_w = key0 + rg * 16 + g;  // key of accumulator rows g (+8 for the upper half)

        // P^T = exp2(S^T * scale_log2 - L2) with S^T = K_j Q_i^T.
        float s[kColTiles][4];
        zero(s);
        product_rows_by_rows(s, sK_w, sQ, lane);
        // Key k of this lane's row half is seen by the queries i >= k - causal_offset.
        int bound[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int key = key_w + half * 8;
            bound[half] = key >= seqlen_k ? kStream
                                          : (causal ? clamp_bound(static_cast<i64>(key) - causal_offset - i0) : -1);
        }
        scores_to_p(s, scale_log2, mask, bound, [&](int, int col) { return lds_f32(sL2 + col * 4); }, lane);
        Operand p;
        p.set(s);
        // dV_j += P^T dO_i.
        product_regs_by_tile(acc_dv, p, sdO + acc_col0 * kElemBytes, lane);

        // dS^T = P^T o (dP^T - D) with dP^T = V_j dO_i^T.
        float dp[kColTiles][4];
        zero(dp);
        product_rows_by_rows(dp, sV_w, sdO, lane);
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct) {
            const float2 dd = lds_f32x2(sD + (ct * 8 + 2 * t) * 4);
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[ct][e] = p.get(ct, e) * (dp[ct][e] - ((e & 1) ? dd.y : dd.x));
        }
        Operand dS;
        dS.set(dp);
        // dK_j += dS^T Q_i (scaled once at the end).
        product_regs_by_tile(acc_dk, dS, sQ + acc_col0 * kElemBytes, lane);

        if constexpr (kDQAtomic) {
            // Stage dS^T [key][query] in this iteration's buffer (one copy: warps sharing a row group
            // hold the same values); it is read after the next barrier, while the previous
            // iteration's buffer, complete since this iteration's first barrier, feeds dQ now.
            if (ds == 0) dS.store(s_base + kOffDS + stage * kDSBytes + (rg * 16 + g) * kDSRowBytes, kDSRowBytes, lane);
            if (it > 0) add_dq_tile(it - 1, prev);
            prev = step;
        }
    }
    if constexpr (kDQAtomic) {
        if (n_iter > 0) {
            __syncthreads();  // the last iteration's dS^T is staged before warps read it across row groups
            add_dq_tile(n_iter - 1, prev);
        }
    }
    cp_async_wait<0>();

    const int row0 = key0 + rg * 16;
    char* const dk_base = static_cast<char*>(dk) +
                          (split * dk_split + b * dk_sb + h_kv * dk_sh) * (f32_out ? 4 : kElemBytes);
    char* const dv_base = static_cast<char*>(dv) +
                          (split * dv_split + b * dv_sb + h_kv * dv_sh) * (f32_out ? 4 : kElemBytes);
    bwd_tiles::store_acc<Elem>(acc_dk, scale, dk_base, dk_ss, dk_sd, row0, seqlen_k, acc_col0, head_dim, f32_out != 0, lane);
    bwd_tiles::store_acc<Elem>(acc_dv, 1.f, dv_base, dv_ss, dv_sd, row0, seqlen_k, acc_col0, head_dim_v, f32_out != 0, lane);
}
#endif

#if ROLE == 1
// Grid: blockIdx.x = (b * Hq + h) * n_tiles + (n_tiles - 1 - query tile): the longest causal rows
// start first. dQ_i = scale * sum_j dS_ij K_j is written straight to dq in its dtype.
extern "C" __global__ void __launch_bounds__(kThreads, MIN_BLOCKS)
flash_bwd_dq(const void* __restrict__ q, const void* __restrict__ k, const void* __restrict__ v,
             const void* __restrict__ dout, const float* __restrict__ l2, const float* __restrict__ dsum,
             void* __restrict__ dq, i64 q_sb, i64 q_ss, i64 q_sh, i64 q_sd, i64 k_sb, i64 k_ss, i64 k_sh, i64 k_sd,
             i64 v_sb, i64 v_ss, i64 v_sh, i64 v_sd, i64 do_sb, i64 do_ss, i64 do_sh, i64 do_sd, i64 dq_sb, i64 dq_ss,
             i64 dq_sh, i64 dq_sd, int heads_q, int group, int seqlen_q, int seqlen_q_pad, int seqlen_k, int head_dim,
             int head_dim_v, int causal, i64 causal_offset, float scale_log2, float scale, int n_tiles, int vec_in) {
    extern __shared__ __align__(128) char smem[];
    const u32 s_base = smem_addr(smem);
    const u32 sQ = s_base, sdO = s_base + kOffOwnB;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int rg = warp % kRowGroups, ds = warp / kRowGroups;

    const i64 bh = blockIdx.x / n_tiles;
    const int tile = n_tiles - 1 - static_cast<int>(blockIdx.x - bh * n_tiles);
    const i64 b = bh / heads_q;
    const int h = static_cast<int>(bh - b * heads_q);
    const int h_kv = h / group;
    const int row0 = tile * kOwn;

    const bool vec = vec_in != 0;
    const Tensor tq{static_cast<const char*>(q) + (b * q_sb + h * q_sh) * kElemBytes, q_ss, q_sd};
    const Tensor tdo{static_cast<const char*>(dout) + (b * do_sb + h * do_sh) * kElemBytes, do_ss, do_sd};
    const Tensor tk{static_cast<const char*>(k) + (b * k_sb + h_kv * k_sh) * kElemBytes, k_ss, k_sd};
    const Tensor tv{static_cast<const char*>(v) + (b * v_sb + h_kv * v_sh) * kElemBytes, v_ss, v_sd};

    i64 key_end = seqlen_k;
    if (causal) {
        const i64 diag_end = static_cast<i64>(row0) + kOwn + causal_offset;  // the last row sees keys < this
        key_end = diag_end < key_end ? diag_end : key_end;
    }
    const int n_iter = key_end <= 0 ? 0 : static_cast<int>((key_end + kStream - 1) / kStream);

    auto load_stream = [&](int it, int stage) {
        load_tile<kStream>(s_base + kOffStreamA + stage * kStreamStride, tk, it * kStream, seqlen_k, head_dim, vec, tid);
        load_tile<kStream>(s_base + kOffStreamB + stage * kStreamStride, tv, it * kStream, seqlen_k, head_dim_v, vec,
                           tid);
    };
    load_tile<kOwn>(sQ, tq, row0, seqlen_q, head_dim, vec, tid);
    load_tile<kOwn>(sdO, tdo, row0, seqlen_q, head_dim_v, vec, tid);
    if (n_iter > 0) load_stream(0, 0);
    cp_async_commit();

    // L2 and D of this lane's two rows (the buffers are padded, so rows past Sq read +inf and 0).
    const int query_w = row0 + rg * 16 + g;
    const i64 vec_off = (b * heads_q + h) * static_cast<i64>(seqlen_q_pad) + query_w;
    const float l2_row[2] = {l2[vec_off], l2[vec_off + 8]};
    const float d_row[2] = {dsum[vec_off], dsum[vec_off + 8]};

    float acc_dq[kAccTiles][4];
    zero_acc(acc_dq);
    const u32 sQ_w = sQ + rg * 16 * kRowBytes;
    const u32 sdO_w = sdO + rg * 16 * kRowBytes;
    const int acc_col0 = ds * kAccCols;

#pragma unroll 1
    for (int it = 0; it < n_iter; ++it) {
        const int stage = it & 1;
        cp_async_wait<0>();
        // Tile `it` has landed for every thread, and every warp is done with tile it-1, whose stage
        // the load below refills.
        __syncthreads();
        if (it + 1 < n_iter) load_stream(it + 1, stage ^ 1);
        cp_async_commit();

        const int n0 = it * kStream;
        const u32 sKt = s_base + kOffStreamA + stage * kStreamStride;
        const u32 sVt = s_base + kOffStreamB + stage * kStreamStride;
        const bool mask = n0 + kStream > seqlen_k ||
                          (causal && static_cast<i64>(n0) + kStream - 1 > static_cast<i64>(row0) + causal_offset);

        // P = exp2(S * scale_log2 - L2) with S = Q_i K_j^T.
        float s[kColTiles][4];
        zero(s);
        product_rows_by_rows(s, sQ_w, sKt, lane);
        // Query i of this lane's row half sees the keys j <= i + causal_offset, j < Sk.
        int bound[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            i64 last = static_cast<i64>(seqlen_k) - 1 - n0;
            if (causal) {
                const i64 diag = static_cast<i64>(query_w + half * 8) + causal_offset - n0;
                last = diag < last ? diag : last;
            }
            bound[half] = clamp_bound(last);
        }
        scores_to_p(s, scale_log2, mask, bound, [&](int half, int) { return l2_row[half]; }, lane);
        Operand p;
        p.set(s);

        // dS = P o (dP - D) with dP = dO_i V_j^T.
        float dp[kColTiles][4];
        zero(dp);
        product_rows_by_rows(dp, sdO_w, sVt, lane);
#pragma unroll
        for (int ct = 0; ct < kColTiles; ++ct)
#pragma unroll
            for (int e = 0; e < 4; ++e) dp[ct][e] = p.get(ct, e) * (dp[ct][e] - d_row[e >> 1]);
        Operand dS;
        dS.set(dp);
        // dQ_i += dS K_j (scaled once at the end).
        product_regs_by_tile(acc_dq, dS, sKt + acc_col0 * kElemBytes, lane);
    }
    cp_async_wait<0>();

    char* const dq_base = static_cast<char*>(dq) + (b * dq_sb + h * dq_sh) * kElemBytes;
    bwd_tiles::store_acc<Elem>(acc_dq, scale, dq_base, dq_ss, dq_sd, row0 + rg * 16, seqlen_q, acc_col0, head_dim, false, lane);
}
#endif
