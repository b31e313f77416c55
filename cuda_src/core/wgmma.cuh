// Warpgroup matrix multiply-accumulate (sm_90a wgmma.mma_async) for 16-bit operands with float32
// accumulators, and the 128-byte-swizzled shared-memory tiles it reads.
//
// A warpgroup is 4 consecutive warps (128 threads) and computes D (64 x N) += A (64 x 16) B (16 x N)
// per instruction. The accumulator of warp w of the group holds rows 16w..16w+15 in the layout of
// mma.m16n8k16: d[nt][0..1] are row g, columns 8nt + 2t, +1; d[nt][2..3] row g + 8 (g = lane / 4,
// t = lane % 4). A comes from shared memory (a descriptor) or from registers in the A-fragment
// layout of mma.m16n8k16, which is what two adjacent n8 tiles of an accumulator pack into.
//
// Shared-memory tiles (Swizzle128): a tile of R rows by C 16-bit columns is stored as C / 64 blocks
// of R rows of 128 bytes; in each row the 16-byte chunk c sits at position c ^ (row % 8). Blocks
// start 1024-byte aligned (the swizzle is applied to address bits). The same bytes serve as a
// "K-major" operand (rows are M or N, columns are K) or an "MN-major" one (rows are K): only the
// descriptor differs.
#pragma once

#include "ptx.cuh"

namespace cuflash {
namespace wg {

using u64 = unsigned long long;

template <typename Elem> constexpr bool kIsBFloat16 = false;
template <> constexpr bool kIsBFloat16<BFloat16> = true;

// Byte offset of the 16-byte chunk `chunk` (columns 8 chunk .. 8 chunk + 7) of row r in a
// Swizzle128 tile of Rows rows.
template <int Rows>
__device__ __forceinline__ u32 swizzle128(int r, int chunk) {
    return static_cast<u32>((chunk >> 3) * Rows * 128 + r * 128 + ((chunk ^ r) & 7) * 16);
}

template <int Rows>
struct Swizzle128 {
    __device__ __forceinline__ static u32 offset(int r, int chunk) { return swizzle128<Rows>(r, chunk); }
};

// Matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading-dimension and
// stride-dimension byte offsets (all >> 4), and the swizzle mode (1: 128 bytes) in bits 62-63.
__device__ __forceinline__ u64 descriptor(u32 addr, u32 lead_bytes, u32 stride_bytes) {
    return static_cast<u64>((addr & 0x3ffffu) >> 4) | (static_cast<u64>(lead_bytes >> 4) << 16) |
           (static_cast<u64>(stride_bytes >> 4) << 32) | (1ull << 62);
}

// K-major operand: rows [row0, row0 + 64 or N) of a Swizzle128 tile of Rows rows, the 16 columns
// (K) from 16 kk. Within a 128-byte row the k16 steps are 32 bytes apart; the 8-row groups 1024.
template <int Rows>
__device__ __forceinline__ u64 k_major(u32 tile, int row0, int kk) {
    return descriptor(tile + (kk >> 2) * Rows * 128 + row0 * 128 + (kk & 3) * 32, 16, 1024);
}

// MN-major operand: rows [16 kk, 16 kk + 16) (K) of a Swizzle128 tile of Rows rows, the M or N
// columns from col0 (a multiple of 64): consecutive 64-column blocks are Rows * 128 bytes apart
// (leading offset), the 8-row groups along K 1024 (stride offset).
template <int Rows>
__device__ __forceinline__ u64 mn_major(u32 tile, int col0, int kk) {
    return descriptor(tile + (col0 >> 6) * Rows * 128 + kk * 16 * 128, Rows * 128, 1024);
}

// Orders this thread's earlier register and shared-memory accesses before the next wgmma.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed groups of this warpgroup are in flight.
template <int N> __device__ __forceinline__ void wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (st.shared, completed cp.async) visible to
// the async proxy that wgmma reads through; a barrier must follow before another thread's wgmma.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving reads or writes of x across this point: accumulators and register
// A operands belong to an in-flight wgmma until its wait.
template <int NT>
__device__ __forceinline__ void pin(float (&x)[NT][4]) {
#pragma unroll
    for (int i = 0; i < NT; ++i)
        asm volatile("" : "+f"(x[i][0]), "+f"(x[i][1]), "+f"(x[i][2]), "+f"(x[i][3])::"memory");
}
template <int KT>
__device__ __forceinline__ void pin(u32 (&x)[KT][4]) {
#pragma unroll
    for (int i = 0; i < KT; ++i) asm volatile("" : "+r"(x[i][0]), "+r"(x[i][1]), "+r"(x[i][2]), "+r"(x[i][3])::"memory");
}

#define CUFLASH_ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define CUFLASH_ACC_N64                                                                                 \
    CUFLASH_ACC4(0), CUFLASH_ACC4(1), CUFLASH_ACC4(2), CUFLASH_ACC4(3), CUFLASH_ACC4(4), CUFLASH_ACC4(5), \
        CUFLASH_ACC4(6), CUFLASH_ACC4(7)
#define CUFLASH_ACC_N128                                                                                     \
    CUFLASH_ACC_N64, CUFLASH_ACC4(8), CUFLASH_ACC4(9), CUFLASH_ACC4(10), CUFLASH_ACC4(11), CUFLASH_ACC4(12), \
        CUFLASH_ACC4(13), CUFLASH_ACC4(14), CUFLASH_ACC4(15)
#define CUFLASH_D_N64                                                                                         \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define CUFLASH_D_N128                                                                                        \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "  \
    "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "  \
    "%62, %63}"

// D (+)= A B, A and B from shared memory. TRANS_A / TRANS_B: 1 for an MN-major operand.
// accumulate == 0 ignores D's old value (no zeroing needed).
#define CUFLASH_WGMMA_SS(N, TYPE, DREGS, ACC, IA, IB, IACC, ITA, ITB)                                       \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IACC ", 0;\n"                                          \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " DREGS ", %" #IA ", %" #IB \
                 ", p, 1, 1, %" #ITA ", %" #ITB ";\n}\n"                                                     \
                 : ACC                                                                                         \
                 : "l"(a), "l"(b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B))

// D (+)= A B with A in registers (four 32-bit registers per thread, the mma.m16n8k16 A fragment of
// this warp's 16 rows) and B from shared memory.
#define CUFLASH_WGMMA_RS(N, TYPE, DREGS, ACC, IA0, IA1, IA2, IA3, IB, IACC, ITB)                             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #IACC ", 0;\n"                                          \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " DREGS ", {%" #IA0 ", %" #IA1 \
                 ", %" #IA2 ", %" #IA3 "}, %" #IB ", p, 1, 1, %" #ITB ";\n}\n"                                \
                 : ACC                                                                                         \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B))

template <typename Elem, int N, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void mma_ss(float (&d)[N / 8][4], u64 a, u64 b, int accumulate) {
    static_assert(N == 64 || N == 128, "mma_ss: N is 64 or 128");
    constexpr bool kBf16 = kIsBFloat16<Elem>;
    if constexpr (N == 64 && kBf16) CUFLASH_WGMMA_SS(64, "bf16", CUFLASH_D_N64, CUFLASH_ACC_N64, 32, 33, 34, 35, 36);
    if constexpr (N == 64 && !kBf16) CUFLASH_WGMMA_SS(64, "f16", CUFLASH_D_N64, CUFLASH_ACC_N64, 32, 33, 34, 35, 36);
    if constexpr (N == 128 && kBf16) CUFLASH_WGMMA_SS(128, "bf16", CUFLASH_D_N128, CUFLASH_ACC_N128, 64, 65, 66, 67, 68);
    if constexpr (N == 128 && !kBf16) CUFLASH_WGMMA_SS(128, "f16", CUFLASH_D_N128, CUFLASH_ACC_N128, 64, 65, 66, 67, 68);
}

template <typename Elem, int N, int TRANS_B>
__device__ __forceinline__ void mma_rs(float (&d)[N / 8][4], const u32 (&a)[4], u64 b, int accumulate) {
    static_assert(N == 64 || N == 128, "mma_rs: N is 64 or 128");
    constexpr bool kBf16 = kIsBFloat16<Elem>;
    if constexpr (N == 64 && kBf16)
        CUFLASH_WGMMA_RS(64, "bf16", CUFLASH_D_N64, CUFLASH_ACC_N64, 32, 33, 34, 35, 36, 37, 38);
    if constexpr (N == 64 && !kBf16)
        CUFLASH_WGMMA_RS(64, "f16", CUFLASH_D_N64, CUFLASH_ACC_N64, 32, 33, 34, 35, 36, 37, 38);
    if constexpr (N == 128 && kBf16)
        CUFLASH_WGMMA_RS(128, "bf16", CUFLASH_D_N128, CUFLASH_ACC_N128, 64, 65, 66, 67, 68, 69, 70);
    if constexpr (N == 128 && !kBf16)
        CUFLASH_WGMMA_RS(128, "f16", CUFLASH_D_N128, CUFLASH_ACC_N128, 64, 65, 66, 67, 68, 69, 70);
}

#undef CUFLASH_WGMMA_RS
#undef CUFLASH_WGMMA_SS
#undef CUFLASH_D_N128
#undef CUFLASH_D_N64
#undef CUFLASH_ACC_N128
#undef CUFLASH_ACC_N64
#undef CUFLASH_ACC4

}  // namespace wg
}  // namespace cuflash
