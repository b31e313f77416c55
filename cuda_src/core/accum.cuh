// Scalar arithmetic in the accumulator type, for the code that the float and float64 kernels share
// (attn/softmax.cuh, attn/score_mod.cuh, kernels/bwd_aux.cu). Num<float> is what that code computed
// before float64 existed: MUFU ex2/lg2 (FlashAttention's), f32 min/max/fma. Num<double> uses the
// double-precision functions of the CUDA math library (there is no MUFU for double; exp2 and log2
// are accurate to an ulp or so).
#pragma once

#include "ptx.cuh"

namespace cuflash {

// The accumulator type of an element type (Half, BFloat16, float, double): double for double,
// float for every other.
template <typename E> struct AccumOfT { using type = float; };
template <> struct AccumOfT<double> { using type = double; };
template <typename E> using AccumOf = typename AccumOfT<E>::type;

template <typename T> struct Num;

template <> struct Num<float> {
    __device__ __forceinline__ static float inf() { return __int_as_float(0x7f800000); }
    __device__ __forceinline__ static float neg_inf() { return cuflash::neg_inf(); }
    __device__ __forceinline__ static float exp2(float x) { return exp2_approx(x); }
    __device__ __forceinline__ static float log2(float x) { return log2_approx(x); }
    __device__ __forceinline__ static float max(float a, float b) { return fmaxf(a, b); }
    __device__ __forceinline__ static float min(float a, float b) { return fminf(a, b); }
    __device__ __forceinline__ static float fma(float a, float b, float c) { return fmaf(a, b, c); }
    __device__ __forceinline__ static float abs(float x) { return fabsf(x); }
    __device__ __forceinline__ static float tanh(float x) { return tanhf(x); }
    __device__ __forceinline__ static float quad_max(float x) { return cuflash::quad_max(x); }
    __device__ __forceinline__ static float quad_sum(float x) { return cuflash::quad_sum(x); }
};

template <> struct Num<double> {
    __device__ __forceinline__ static double inf() { return __longlong_as_double(0x7ff0000000000000ll); }
    __device__ __forceinline__ static double neg_inf() { return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull)); }
    __device__ __forceinline__ static double exp2(double x) { return ::exp2(x); }
    __device__ __forceinline__ static double log2(double x) { return ::log2(x); }
    __device__ __forceinline__ static double max(double a, double b) { return fmax(a, b); }
    __device__ __forceinline__ static double min(double a, double b) { return fmin(a, b); }
    __device__ __forceinline__ static double fma(double a, double b, double c) { return ::fma(a, b, c); }
    __device__ __forceinline__ static double abs(double x) { return fabs(x); }
    __device__ __forceinline__ static double tanh(double x) { return ::tanh(x); }
    __device__ __forceinline__ static double quad_max(double x) {
        x = fmax(x, __shfl_xor_sync(0xffffffffu, x, 1));
        return fmax(x, __shfl_xor_sync(0xffffffffu, x, 2));
    }
    __device__ __forceinline__ static double quad_sum(double x) {
        x += __shfl_xor_sync(0xffffffffu, x, 1);
        return x + __shfl_xor_sync(0xffffffffu, x, 2);
    }
};

}  // namespace cuflash
