// Inline-PTX building blocks shared by cuflash's attention kernels (sm_75 and newer).
//
// No CUDA header is included: NVRTC compiles this file with nothing but itself. 16-bit values are
// stored as raw bits (u16, or two per u32) and converted with PTX `cvt`.
//
// TURING (1 in every variant of the "sm75" family, added by the launcher from the family: see
// variants.family_defines) selects what compute capability 7.5 has: the f16 m16n8k16 product as
// two m16n8k8 products, cp.async as a load and a shared store, f16 pairs packed by two `cvt`s.
// Chosen by the family rather than by __CUDA_ARCH__, so that the sm75 variants run unchanged on a
// newer GPU when the family is forced there (the tests do). The bfloat16 and tf32 products and the
// bfloat16 conversions are not defined under TURING, so an sm75 variant cannot use them on any GPU;
// the compile gate builds every sm75 variant for sm_75, which shows that none uses another sm_80
// instruction.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4:
//   A (16x16, row-major), four u32 of two elements each:
//     a[0] = (row g,   cols 2t, 2t+1)   a[1] = (row g+8, cols 2t, 2t+1)
//     a[2] = (row g,   cols 2t+8, +9)   a[3] = (row g+8, cols 2t+8, +9)
//   B (16x8, "col": element (k, n) pairs run along k):
//     b[0] = (rows k = 2t, 2t+1, col n = g)   b[1] = (rows k = 2t+8, 2t+9, col n = g)
//   C/D (16x8, f32): c[0], c[1] = (row g, cols 2t, 2t+1); c[2], c[3] = (row g+8, cols 2t, 2t+1)
// The C layout of two adjacent n8 tiles is exactly the A layout of one k16 step, so an f32
// accumulator packed with pack2<> becomes the A operand of the next product with no shuffles.
//
// For mma.m16n8k8 tf32 the PTX layout is a[0] = (g, t), a[1] = (g+8, t), a[2] = (g, t+4),
// a[3] = (g+8, t+4), b[0] = (k = t, n = g), b[1] = (k = t+4, n = g), with the same C layout.
#pragma once

#if !defined(TURING)
#define TURING 0
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800 && !TURING
#error "compute capability 7.x builds are the sm75 family's: TURING must be 1 (variants.family_defines)"
#endif

namespace cuflash {

using u16 = unsigned short;
using u32 = unsigned int;
using i64 = long long;

// Element tags: select the 16-bit format of mma/pack/unpack at compile time.
struct Half {};      // IEEE float16
struct BFloat16 {};  // bfloat16

// ---------------------------------------------------------------------------------------------
// Constants and scalar math
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x with one MUFU instruction; denormal results flush to zero (CuPy compiles with -ftz anyway).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// log2(x) with one MUFU instruction.
__device__ __forceinline__ float log2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ---------------------------------------------------------------------------------------------
// Conversions between f32 and 16-bit pairs (lo goes to the lower address / lower column)
// ---------------------------------------------------------------------------------------------

template <typename Elem> __device__ __forceinline__ u32 pack2(float lo, float hi);

#if TURING
// cvt to f16x2 needs sm_80: two scalar conversions (the same rounding) and one move.
template <> __device__ __forceinline__ u32 pack2<Half>(float lo, float hi) {
    u32 r;
    asm("{\n"
        ".reg .f16 lo, hi;\n"
        "cvt.rn.f16.f32 lo, %1;\n"
        "cvt.rn.f16.f32 hi, %2;\n"
        "mov.b32 %0, {lo, hi};\n"
        "}\n"
        : "=r"(r)
        : "f"(lo), "f"(hi));
    return r;
}
#else
template <> __device__ __forceinline__ u32 pack2<Half>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <> __device__ __forceinline__ u32 pack2<BFloat16>(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif

template <typename Elem> __device__ __forceinline__ float to_float(u16 x);

template <> __device__ __forceinline__ float to_float<Half>(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}

template <> __device__ __forceinline__ float to_float<BFloat16>(u16 x) {
    return __int_as_float(static_cast<int>(static_cast<u32>(x) << 16));
}

template <typename Elem> __device__ __forceinline__ u16 from_float(float f);

template <> __device__ __forceinline__ u16 from_float<Half>(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

#if !TURING
template <> __device__ __forceinline__ u16 from_float<BFloat16>(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
#endif

// Round an f32 to tf32 (10 mantissa bits, round to nearest, ties away), returned as f32 bits.
__device__ __forceinline__ float to_tf32(float x) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
}

// Split x = big + small with both representable in tf32: the 3xTF32 products
// big*big' + big*small' + small*big' keep nearly f32 accuracy on tensor cores.
__device__ __forceinline__ void split_tf32(float x, u32& big, u32& small) {
    const float b = to_tf32(x);
    big = __float_as_uint(b);
    small = __float_as_uint(to_tf32(x - b));
}

// ---------------------------------------------------------------------------------------------
// Shared memory addressing, cp.async, ldmatrix
// ---------------------------------------------------------------------------------------------

// 32-bit shared-window address of a shared-memory pointer (what ldmatrix/cp.async/ld.shared take).
__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// x, as a value the compiler must treat as new at this point. Called on the shared-memory base at
// the top of a tile loop, it keeps the loop-invariant addresses (and wgmma descriptors) derived
// from it inside the loop, computed where used, instead of hoisted out and holding registers
// across the whole loop.
__device__ __forceinline__ u32 fresh(u32 x) {
    asm volatile("" : "+r"(x));
    return x;
}

// Plain shared-memory accesses by 32-bit address.
__device__ __forceinline__ float lds_f32(u32 addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
    return v;
}

__device__ __forceinline__ void sts_128(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}

__device__ __forceinline__ void lds_128(u32 addr, u32& a, u32& b, u32& c, u32& d) {
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(a), "=r"(b), "=r"(c), "=r"(d)
                 : "r"(addr));
}

#if TURING
// Turing has no cp.async: the copy below is a 16-byte load and a shared store, complete when it
// returns, with the same zero-fill and the same arguments (src_bytes a whole number of 16-bit
// elements). The kernels' barriers, which already separate every copy from the reads of its tile,
// make the stores visible; commit and wait have nothing left to do. Tiles are then loaded while no
// product runs in this warp: other warps and CTAs hide the latency, as on GPUs before cp.async.
// A partial chunk (rare: the vector paths take rows of whole chunks) is zeroed and then written
// element by element in a rolled loop, which keeps its registers out of the tile loops.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
    if (src_bytes >= 16) {
        u32 w[4];
        asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                     : "l"(src));
        sts_128(dst, w[0], w[1], w[2], w[3]);
        return;
    }
    sts_128(dst, 0u, 0u, 0u, 0u);
    const u16* const h = static_cast<const u16*>(src);
#pragma unroll 1
    for (int e = 0; 2 * e < src_bytes; ++e)
        asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(dst + 2 * e), "h"(h[e]) : "memory");
}

// The 4- and 8-byte copies likewise: a load and a shared store.
template <int Bytes> __device__ __forceinline__ void cp_async_small(u32 dst, const void* src) {
    static_assert(Bytes == 4 || Bytes == 8, "cp_async_small copies 4 or 8 bytes");
    if constexpr (Bytes == 4) {
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(dst), "r"(*static_cast<const u32*>(src)) : "memory");
    } else {
        asm volatile("st.shared.b64 [%0], %1;\n" ::"r"(dst), "l"(*static_cast<const unsigned long long*>(src))
                     : "memory");
    }
}

__device__ __forceinline__ void cp_async_commit() {}

template <int N> __device__ __forceinline__ void cp_async_wait() {}
#else
// Asynchronous 16-byte global->shared copy that zero-fills: src_bytes (0..16) bytes are read,
// the rest of the 16 destination bytes become 0. With src_bytes == 0 nothing is read, but `src`
// must still be a valid address (pass the tensor's base pointer). Both addresses 16-byte aligned.
// .cg caches in L2 only: tiles are reused across CTAs, never by the same SM's L1.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

// Asynchronous 4- or 8-byte global->shared copy, for data whose 16-byte chunks may be misaligned;
// both addresses aligned to the size (cp.async.ca: copies under 16 bytes go through L1).
template <int Bytes> __device__ __forceinline__ void cp_async_small(u32 dst, const void* src) {
    static_assert(Bytes == 4 || Bytes == 8, "cp_async_small copies 4 or 8 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(src), "n"(Bytes) : "memory");
}

// Closes the current group of cp.async copies issued by this thread.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight. Other threads'
// copies become visible only after a barrier.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses (16 bytes each) of matrix i,
// and r[i] receives this lane's pair of matrix i (row lane/4, cols 2*(lane%4), +1).
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// As ldmatrix_x4 but transposed: r[i] receives (rows 2*(lane%4), +1, col lane/4) of matrix i,
// which turns a row-major [k][n] tile into B fragments.
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Two 8x8 b16 matrices (lanes 0..15 give the row addresses).
__device__ __forceinline__ void ldmatrix_x2(u32 (&r)[2], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2_trans(u32 (&r)[2], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

// ---------------------------------------------------------------------------------------------
// Tensor-core products (d += a * b, f32 accumulate)
// ---------------------------------------------------------------------------------------------

template <typename Elem>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]);

#if TURING
// sm_75 has m16n8k8 for f16: its A fragment is {a0, a1} of the layout above restricted to k 0..7
// (rows g, g+8, cols 2t, 2t+1) and its B fragment one register (k = 2t, 2t+1, n = g), so the k16
// product is the k 0..7 half ({a[0], a[1]}, b[0]) followed by the k 8..15 half ({a[2], a[3]},
// b[1]) on the same accumulator.
template <>
__device__ __forceinline__ void mma_m16n8k16<Half>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%7, %8}, {%9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b[0]), "r"(a[2]), "r"(a[3]), "r"(b[1]));
}
#else
template <>
__device__ __forceinline__ void mma_m16n8k16<Half>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<BFloat16>(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// tf32 operands given as f32 bit patterns already rounded with to_tf32/split_tf32.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// ---------------------------------------------------------------------------------------------
// Warp shuffles
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float shfl_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }

// Max / sum over the 4 lanes of a quad (lanes 4g..4g+3 hold one row of a C fragment).
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, shfl_xor(x, 1));
    return fmaxf(x, shfl_xor(x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += shfl_xor(x, 1);
    return x + shfl_xor(x, 2);
}

}  // namespace cuflash
