// RoPE, rotate_half layout: for x (B, H, T, D) contiguous, rows of length D at position row % T,
// y[:D/2] = x1 cos - x2 sin and y[D/2:] = x2 cos + x1 sin with tables cos, sin (T, D/2) contiguous;
// the backward is the same rotation with sin negated (kernels/src/rope.rs). One thread per
// (x1[i], x2[i]) pair, grid-stride over B*H*T*D/2 pairs. The products and sums use the _rn
// intrinsics (never contracted into FMAs), and the sign flip is exact, so each element rounds as
// the CPU loop does: the results equal the CPU op's bitwise for the same inputs.
#include "common.cuh"

template <typename T, bool INVERSE>
__device__ __forceinline__ void rope_rotate(const T *x, const T *cos, const T *sin, T *y, size_t pairs,
                                            size_t half, size_t t) {
    GRID_STRIDE_LOOP(p, pairs) {
        size_t row = p / half;
        size_t i = p - row * half;
        size_t pos = row % t;
        float c = load_f32(cos[pos * half + i]);
        float s = load_f32(sin[pos * half + i]);
        if (INVERSE) s = -s;
        size_t base = row * 2 * half + i;
        float a = load_f32(x[base]);
        float b = load_f32(x[base + half]);
        y[base] = store_as<T>(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        y[base + half] = store_as<T>(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}

#define ROPE_KERNELS(T, SUFFIX)                                                                         \
    extern "C" __global__ void rope_fwd_##SUFFIX(const T *x, const T *cos, const T *sin, T *y,          \
                                                 size_t pairs, size_t half, size_t t) {                \
        rope_rotate<T, false>(x, cos, sin, y, pairs, half, t);                                          \
    }                                                                                                   \
    extern "C" __global__ void rope_bwd_##SUFFIX(const T *x, const T *cos, const T *sin, T *y,          \
                                                 size_t pairs, size_t half, size_t t) {                \
        rope_rotate<T, true>(x, cos, sin, y, pairs, half, t);                                           \
    }

ROPE_KERNELS(float, f32)
ROPE_KERNELS(bf16, bf16)
ROPE_KERNELS(f16, f16)
