// Causal softmax of causal attention, forward and backward: the same formulas as
// kernels/src/attention.rs (CausalSoftmax / CausalSoftmaxBwd). Scores are (rows, T) with rows =
// B*H*T; row r is query i = r % T, which sees keys 0..=i only (entries past i are never read, so
// inf/nan there cannot leak in), and gets exactly 0 past i.
//   forward:  m = max_j (x_j * scale), e_j = exp(x_j * scale - m), P_j = e_j * (1 / sum_j e_j)
//   backward: dot = sum_j dP_j * P_j, dS_j = scale * P_j * (dP_j - dot)
// One block per row (blockDim.x a multiple of 32, at most 1024; the Rust side picks it), each thread
// strides over the row, then a block reduction (warp shuffles, then one value per warp in shared
// memory). Products are __fmul_rn so that nvcc cannot contract them with the following add into an
// fma: the CPU rounds the product first.
#include "common.cuh"

struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Reduces v over the block with op; every thread gets the result (lane 0 of warp 0's value, so the
// order depends only on blockDim.x: deterministic). Must be reached by every thread of the block.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float identity) {
    __shared__ float partial[32];
    __shared__ float result;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? partial[lane] : identity;
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
        if (lane == 0) result = v;
    }
    // Also keeps the next call's writes to partial/result behind every thread's read of this one.
    __syncthreads();
    return result;
}

template <typename T>
__device__ __forceinline__ void causal_softmax_fwd(const T *scores, T *probs, size_t t, float scale) {
    const size_t row = blockIdx.x;
    const size_t visible = row % t + 1;
    const T *x = scores + row * t;
    T *p = probs + row * t;

    float m = -INFINITY;
    for (size_t j = threadIdx.x; j < visible; j += blockDim.x) m = fmaxf(m, __fmul_rn(load_f32(x[j]), scale));
    m = block_reduce(m, MaxOp(), -INFINITY);

    float sum = 0.0f;
    for (size_t j = threadIdx.x; j < visible; j += blockDim.x) sum += expf(__fmul_rn(load_f32(x[j]), scale) - m);
    sum = block_reduce(sum, AddOp(), 0.0f);

    const float inv = 1.0f / sum;
    for (size_t j = threadIdx.x; j < t; j += blockDim.x) {
        float v = 0.0f;
        if (j < visible) v = __fmul_rn(expf(__fmul_rn(load_f32(x[j]), scale) - m), inv);
        p[j] = store_as<T>(v);
    }
}

template <typename T>
__device__ __forceinline__ void causal_softmax_bwd(const T *probs, const T *dprobs, T *dscores, size_t t, float scale) {
    const size_t row = blockIdx.x;
    const size_t visible = row % t + 1;
    const T *p = probs + row * t;
    const T *g = dprobs + row * t;
    T *ds = dscores + row * t;

    float dot = 0.0f;
    for (size_t j = threadIdx.x; j < visible; j += blockDim.x) dot += __fmul_rn(load_f32(g[j]), load_f32(p[j]));
    dot = block_reduce(dot, AddOp(), 0.0f);

    for (size_t j = threadIdx.x; j < t; j += blockDim.x) {
        float v = 0.0f;
        // P is exactly 0 past the diagonal, so dS is too (the CPU skips those entries as well).
        if (j < visible) v = __fmul_rn(__fmul_rn(scale, load_f32(p[j])), load_f32(g[j]) - dot);
        ds[j] = store_as<T>(v);
    }
}

// Grid: one block per row (rows = elements / t), t > 0.
#define CAUSAL_SOFTMAX_KERNELS(T, SUFFIX)                                                                   \
    extern "C" __global__ void causal_softmax_fwd_##SUFFIX(const T *scores, T *probs, size_t t, float scale) { \
        causal_softmax_fwd<T>(scores, probs, t, scale);                                                     \
    }                                                                                                       \
    extern "C" __global__ void causal_softmax_bwd_##SUFFIX(const T *probs, const T *dprobs, T *dscores,      \
                                                           size_t t, float scale) {                         \
        causal_softmax_bwd<T>(probs, dprobs, dscores, t, scale);                                            \
    }

CAUSAL_SOFTMAX_KERNELS(float, f32)
CAUSAL_SOFTMAX_KERNELS(bf16, bf16)
CAUSAL_SOFTMAX_KERNELS(f16, f16)
