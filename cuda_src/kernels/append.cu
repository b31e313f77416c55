// Appending new keys and values to a key/value cache: k_new[b, t], v_new[b, t] (B, S_new, Hkv, .)
// go to position cache_seqlens[b] + t of sequence b's cache, dense or paged (core/params.cuh's
// AppendParams), on the caller's stream before the decode kernel reads them. The copy is of raw
// elements of ELEM_BYTES bytes (2, 4 or 8): any dtype, any strides. The host refused appends of
// two sequences into one slot, so no two threads write the same element. Where the caller left the
// lengths and block table unchecked on the device, a position past the cache or a page outside it
// is skipped: nothing is written outside the cache.
#include "../core/params.cuh"

#if !defined(ELEM_BYTES)
#error "append.cu needs ELEM_BYTES (2, 4 or 8)"
#endif

namespace cuflash {
namespace append {

template <int N> struct Bits;
template <> struct Bits<2> { using type = u16; };
template <> struct Bits<4> { using type = u32; };
template <> struct Bits<8> { using type = unsigned long long; };
using Word = Bits<ELEM_BYTES>::type;

// Element offset of position pos (0 <= pos < capacity), head h, column d of sequence b in a cache
// with strides st; -1 where the page lies outside the cache.
__device__ __forceinline__ i64 cache_offset(const AppendParams& p, const Strides& st, i64 b, i64 pos, int h, int d) {
    i64 base;
    if (p.block_table == nullptr) {
        base = b * st.b + pos * st.s;
    } else {
        const i64 n = pos / p.page_size;
        const i64 page = p.block_table[b * p.table_stride + n];
        if (page < 0 || page >= p.num_pages) return -1;
        base = page * st.b + (pos - n * p.page_size) * st.s;
    }
    return base + static_cast<i64>(h) * st.h + static_cast<i64>(d) * st.d;
}

}  // namespace append
}  // namespace cuflash

using namespace cuflash;
using namespace cuflash::append;

// Grid-stride over the elements (b, t, h, e) of k_new and v_new side by side: e < D is column e of
// k_new, D <= e < D + Dv column e - D of v_new.
extern "C" __global__ void __launch_bounds__(256) kv_append(const __grid_constant__ AppendParams p) {
    const int per_row = p.head_dim + p.head_dim_v;
    const i64 total = static_cast<i64>(p.batch) * p.seqlen_new * p.heads_kv * per_row;
    for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<i64>(gridDim.x) * blockDim.x) {
        i64 rest = i;
        const int e = static_cast<int>(rest % per_row);
        rest /= per_row;
        const int h = static_cast<int>(rest % p.heads_kv);
        rest /= p.heads_kv;
        const int t = static_cast<int>(rest % p.seqlen_new);
        const i64 b = rest / p.seqlen_new;
        const i64 pos = static_cast<i64>(p.cache_seqlens[b]) + t;
        if (pos < 0 || pos >= p.capacity) continue;
        const bool is_k = e < p.head_dim;
        const int d = is_k ? e : e - p.head_dim;
        const Strides& src_st = is_k ? p.kn_st : p.vn_st;
        const Word* src = static_cast<const Word*>(is_k ? p.k_new : p.v_new);
        Word* dst = static_cast<Word*>(is_k ? p.k_cache : p.v_cache);
        const i64 src_off = b * src_st.b + static_cast<i64>(t) * src_st.s + static_cast<i64>(h) * src_st.h +
                            static_cast<i64>(d) * src_st.d;
        const i64 dst_off = cache_offset(p, is_k ? p.kc_st : p.vc_st, b, pos, h, d);
        if (dst_off >= 0) dst[dst_off] = src[src_off];
    }
}
