// SwiGLU, y = silu(gate) * up with silu(g) = g * sigmoid(g): forward and backward, the same formulas
// as kernels/src/swiglu.rs. sigmoid(x) = 1 / (1 + exp(-x)) with the exp argument clamped to
// [-87, 88] as the CPU's exp_f32 does, so the denominator is finite and nothing is NaN for any
// finite gate. The backward recomputes s = sigmoid(g) and writes both gradients in one pass, into one
// buffer of 2n elements: dgate = dy * up * s * (1 + g (1 - s)) at [0, n), dup = dy * g * s at [n, 2n).
#include "common.cuh"

__device__ __forceinline__ float swiglu_sigmoid(float x) {
    return 1.0f / (1.0f + expf(fminf(fmaxf(-x, -87.0f), 88.0f)));
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T *gate, const T *up, T *y, size_t n) {
    GRID_STRIDE_LOOP(i, n) {
        float g = load_f32(gate[i]);
        y[i] = store_as<T>(g * swiglu_sigmoid(g) * load_f32(up[i]));
    }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T *gate, const T *up, const T *dy, T *dgrads, size_t n) {
    GRID_STRIDE_LOOP(i, n) {
        float g = load_f32(gate[i]);
        float d = load_f32(dy[i]);
        float s = swiglu_sigmoid(g);
        dgrads[i] = store_as<T>(d * load_f32(up[i]) * s * (1.0f + g * (1.0f - s)));
        dgrads[n + i] = store_as<T>(d * g * s);
    }
}

#define SWIGLU_KERNELS(T, SUFFIX)                                                                       \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const T *gate, const T *up, T *y, size_t n) {        \
        swiglu_fwd<T>(gate, up, y, n);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T *gate, const T *up, const T *dy, T *dgrads, \
                                                   size_t n) {                                          \
        swiglu_bwd<T>(gate, up, dy, dgrads, n);                                                         \
    }

SWIGLU_KERNELS(float, f32)
SWIGLU_KERNELS(bf16, bf16)
SWIGLU_KERNELS(f16, f16)
