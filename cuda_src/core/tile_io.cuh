// Pieces shared by the backward's main kernels (flash_bwd.cu, flash_bwd_dkdv.cu,
// flash_bwd_dkdv_sm90.cu): tile loads into shared memory, the float32 reductions of dQ into its
// workspace, the CTA work decode and the dK/dV stores.
#pragma once

#include "common.cuh"

namespace cuflash {
namespace bwd_tiles {

struct Tensor {
    const char* base;  // element (b, 0, h, 0) of the head being read
    i64 stride_s;      // elements between consecutive sequence positions
    i64 stride_d;      // elements between consecutive head-dim entries (1 on the vector path)
};

// Shared-memory tile layouts for load_tile: Layout::offset(r, chunk) is the byte offset of the
// 16-byte chunk `chunk` of row r. PaddedRows: rows RowBytes apart (one 16-byte pad per row keeps
// the 8 rows of an ldmatrix on distinct bank groups); wg::Swizzle128 (wgmma.cuh) for wgmma operands.
template <int RowBytes>
struct PaddedRows {
    __device__ __forceinline__ static u32 offset(int r, int chunk) { return static_cast<u32>(r * RowBytes + chunk * 16); }
};

// Loads rows [row0, row0 + Rows) x cols [0, Dim) of a (seq, dim) view with ElemBytes-byte
// elements into a shared-memory tile laid out by Layout; rows >= nrows and cols >= ncols become 0,
// which keeps tails out of every product. Threads threads share the copy.
// Vector path: 16-byte cp.async with zero-fill (rows 16-byte aligned, stride_d == 1). Otherwise
// element loads with arbitrary strides, stored synchronously.
template <int Rows, int Dim, int ElemBytes, int Threads, typename Layout>
__device__ __forceinline__ void load_tile(u32 smem, const Tensor& t, int row0, int nrows, int ncols, bool vec, int tid) {
    constexpr int kChunkElems = 16 / ElemBytes;
    constexpr int kRowChunks = Dim / kChunkElems;
    constexpr int kChunks = Rows * kRowChunks;
    if constexpr (Threads % kRowChunks == 0 && kChunks % Threads == 0) {
        // Each thread copies the same 16-byte column chunk of rows r, r + kRowStep, ...: one address
        // computation per tile instead of one per chunk (this runs once per streamed tile).
        constexpr int kRowStep = Threads / kRowChunks;
        if (vec) {
            const int r = tid / kRowChunks, chunk = tid % kRowChunks, col0 = chunk * kChunkElems;
            int valid = ncols - col0;
            valid = valid < 0 ? 0 : (valid > kChunkElems ? kChunkElems : valid);
            const char* src = t.base + (static_cast<i64>(row0 + r) * t.stride_s + col0) * ElemBytes;
            const i64 step = static_cast<i64>(kRowStep) * t.stride_s * ElemBytes;
#pragma unroll
            for (int j = 0; j < Rows / kRowStep; ++j) {
                const bool in = row0 + r + j * kRowStep < nrows && valid > 0;
                cp_async_16(smem + Layout::offset(r + j * kRowStep, chunk), in ? src + j * step : t.base,
                            in ? valid * ElemBytes : 0);
            }
            return;
        }
    }
    // Not unrolled: hoisting the element loads of every chunk costs registers the accumulators need
    // (the element path is the fallback for strided views).
#pragma unroll 1
    for (int c0 = 0; c0 < kChunks; c0 += Threads) {
        const int c = c0 + tid;
        if (kChunks % Threads != 0 && c >= kChunks) break;
        const int r = c / kRowChunks;
        const int col0 = (c % kRowChunks) * kChunkElems;
        const int row = row0 + r;
        const u32 dst = smem + Layout::offset(r, c % kRowChunks);
        int valid = ncols - col0;
        valid = valid < 0 ? 0 : (valid > kChunkElems ? kChunkElems : valid);
        if (row >= nrows) valid = 0;
        if (vec) {
            const char* src = t.base + (static_cast<i64>(row) * t.stride_s + col0) * ElemBytes;
            cp_async_16(dst, valid > 0 ? src : t.base, valid * ElemBytes);
        } else {
            u32 w[4] = {0u, 0u, 0u, 0u};
            const char* p = t.base + (static_cast<i64>(row) * t.stride_s + col0 * t.stride_d) * ElemBytes;
#pragma unroll
            for (int e = 0; e < kChunkElems; ++e) {
                if (e < valid) {
                    if constexpr (ElemBytes == 4) {
                        w[e] = *reinterpret_cast<const u32*>(p + e * t.stride_d * ElemBytes);
                    } else {
                        const u32 h = *reinterpret_cast<const u16*>(p + e * t.stride_d * ElemBytes);
                        w[e / 2] |= h << (16 * (e % 2));
                    }
                }
            }
            sts_128(dst, w[0], w[1], w[2], w[3]);
        }
    }
}

// L2 and D of one query tile of Rows rows: both buffers are padded to a multiple of 128 rows, so the
// copy needs no bounds.
template <int Rows, int Threads>
__device__ __forceinline__ void load_vec(u32 smem, const float* src, int tid) {
    for (int c = tid; c < Rows / 4; c += Threads) cp_async_16(smem + c * 16, src + c * 4, 16);
}

// Adds one 16x16 block of dQ (accumulator layout: two n8 tiles c0, c1) into the float32 workspace,
// whose rows are RowElems apart. On sm_90 two quad neighbours swap pairs so each lane adds 4
// consecutive columns with one vector reduction, 4x fewer atomic operations than scalar adds.
template <int RowElems>
__device__ __forceinline__ void add_dq_block(float* rows, const float (&c0)[4], const float (&c1)[4], int lane) {
    const int g = lane >> 2, t = lane & 3;
#if __CUDA_ARCH__ >= 900
    const bool even = (t & 1) == 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const float(&c)[4] = half ? c1 : c0;
        // Even t keeps row g and takes its neighbour's row-g pair; odd t keeps row g + 8.
        const float send0 = even ? c[2] : c[0];
        const float send1 = even ? c[3] : c[1];
        const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1);
        const float got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
        const float x0 = even ? c[0] : got0, x1 = even ? c[1] : got1;
        const float x2 = even ? got0 : c[2], x3 = even ? got1 : c[3];
        float* const p = rows + static_cast<i64>(even ? g : g + 8) * RowElems + half * 8 + 2 * (t & 2);
        asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(x0), "f"(x1), "f"(x2), "f"(x3)
                     : "memory");
    }
#else
#pragma unroll
    for (int e = 0; e < 8; ++e)
        atomicAdd(rows + static_cast<i64>(g + ((e >> 1) & 1) * 8) * RowElems + (e >> 2) * 8 + 2 * t + (e & 1),
                  (e >> 2) ? c1[e & 3] : c0[e & 3]);
#endif
}

// The work of one dK/dV CTA. Grid: blockIdx.x = ((b * Hkv + h_kv) * splits + split) * n_tiles + key
// tile, so B*H is not bound by gridDim.y/z limits and the CTAs of one head (sharing its Q and dO in
// L2) run together. The CTA owns keys [key0, key0 + BlockN) of key/value head h_kv and streams the
// query tiles m in [m_begin, m_end) (BlockM queries each; when causal, from the first tile whose
// diagonal reaches key0) of the query heads h in [h_begin, h_end) of its share of the GQA group:
// n_iter steps (h, m), tiles fastest.
struct KvStep {
    int h, m;
};

struct KvWork {
    i64 b;
    int split, h_kv, key0, h_begin, h_end, m_begin, m_end, n_iter;

    __device__ __forceinline__ KvStep first() const { return KvStep{h_begin, m_begin}; }
    __device__ __forceinline__ KvStep next(KvStep x) const {
        return x.m + 1 < m_end ? KvStep{x.h, x.m + 1} : KvStep{x.h + 1, m_begin};
    }
};

template <int BlockN, int BlockM>
__device__ __forceinline__ KvWork kv_work(int n_tiles, int splits, int heads_kv, int group, int heads_per_split,
                                          int causal, i64 causal_offset, int seqlen_q) {
    KvWork w;
    const int tile = static_cast<int>(blockIdx.x % n_tiles);
    i64 rest = blockIdx.x / n_tiles;
    w.split = static_cast<int>(rest % splits);
    rest /= splits;
    w.h_kv = static_cast<int>(rest % heads_kv);
    w.b = rest / heads_kv;
    w.key0 = tile * BlockN;
    w.h_begin = w.h_kv * group + w.split * heads_per_split;
    const int h_stop = w.h_kv * group + group;
    w.h_end = w.h_begin + heads_per_split < h_stop ? w.h_begin + heads_per_split : h_stop;
    w.m_begin = 0;
    if (causal) {
        const i64 first_query = static_cast<i64>(w.key0) - causal_offset;
        w.m_begin = first_query <= 0 ? 0 : (first_query >= seqlen_q ? seqlen_q : static_cast<int>(first_query)) / BlockM;
    }
    w.m_end = (seqlen_q + BlockM - 1) / BlockM;
    const int per_head = w.m_end > w.m_begin ? w.m_end - w.m_begin : 0;
    w.n_iter = per_head * (w.h_end > w.h_begin ? w.h_end - w.h_begin : 0);
    return w;
}

template <typename Elem> constexpr bool kIsFloat = false;
template <> constexpr bool kIsFloat<float> = true;

// Writes mul * acc (a warp tile in the mma accumulator layout: MT m16 rows from row0 by NT n8
// columns from col0) to a (seq, dim) view, in Elem (Half, BFloat16 or float) or, for GQA partial
// sums, in float32; rows >= nrows and cols >= ncols are skipped.
template <typename Elem, int MT, int NT>
__device__ __forceinline__ void store_acc(const float (&acc)[MT][NT][4], float mul, char* base, i64 stride_s,
                                          i64 stride_d, int row0, int nrows, int col0, int ncols, bool f32_out,
                                          int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + mt * 16 + g + (e >> 1) * 8;
                const int col = col0 + nt * 8 + 2 * t + (e & 1);
                if (row >= nrows || col >= ncols) continue;
                const float val = acc[mt][nt][e] * mul;
                const i64 off = static_cast<i64>(row) * stride_s + static_cast<i64>(col) * stride_d;
                if constexpr (kIsFloat<Elem>) {
                    reinterpret_cast<float*>(base)[off] = val;
                } else {
                    if (f32_out) reinterpret_cast<float*>(base)[off] = val;
                    else reinterpret_cast<u16*>(base)[off] = from_float<Elem>(val);
                }
            }
}

// The same for a warp tile of one m16 row block.
template <typename Elem, int NT>
__device__ __forceinline__ void store_acc(const float (&acc)[NT][4], float mul, char* base, i64 stride_s,
                                          i64 stride_d, int row0, int nrows, int col0, int ncols, bool f32_out,
                                          int lane) {
    store_acc<Elem>(reinterpret_cast<const float(&)[1][NT][4]>(acc), mul, base, stride_s, stride_d, row0, nrows, col0,
                    ncols, f32_out, lane);
}

__device__ __forceinline__ float2 lds_f32x2(u32 addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
    return v;
}

}  // namespace bwd_tiles
}  // namespace cuflash
