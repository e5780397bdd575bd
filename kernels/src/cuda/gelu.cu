// GELU, tanh approximation (GPT-2): forward and backward, the same formulas as kernels/src/gelu.rs.
// 0.5 (1 + tanh u) is evaluated as sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); the backward
// recomputes it from x: dx = dy * (s + 2 x s (1 - s) sqrt(2/pi) (1 + 3 * 0.044715 x^2)).
#include "common.cuh"

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_COEFF 0.044715f

__device__ __forceinline__ float half_one_plus_tanh(float x) {
    float u = SQRT_2_OVER_PI * (x + GELU_COEFF * x * x * x);
    // The CPU's exp_f32 clamps its argument; expf saturates to 0 / inf by itself, and
    // 1 / (1 + inf) = 0, so the tails give exactly x (or 0) and slope 1 (or 0) here too.
    return 1.0f / (1.0f + expf(-2.0f * u));
}

template <typename T>
__device__ __forceinline__ void gelu_fwd(const T *x, T *y, size_t n) {
    GRID_STRIDE_LOOP(i, n) {
        float v = load_f32(x[i]);
        y[i] = store_as<T>(v * half_one_plus_tanh(v));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_bwd(const T *x, const T *dy, T *dx, size_t n) {
    GRID_STRIDE_LOOP(i, n) {
        float v = load_f32(x[i]);
        float s = half_one_plus_tanh(v);
        float grad = s + 2.0f * v * s * (1.0f - s) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_COEFF * v * v);
        dx[i] = store_as<T>(load_f32(dy[i]) * grad);
    }
}

#define GELU_KERNELS(T, SUFFIX)                                                                    \
    extern "C" __global__ void gelu_fwd_##SUFFIX(const T *x, T *y, size_t n) { gelu_fwd<T>(x, y, n); } \
    extern "C" __global__ void gelu_bwd_##SUFFIX(const T *x, const T *dy, T *dx, size_t n) {       \
        gelu_bwd<T>(x, dy, dx, n);                                                                 \
    }

GELU_KERNELS(float, f32)
GELU_KERNELS(bf16, bf16)
GELU_KERNELS(f16, f16)
