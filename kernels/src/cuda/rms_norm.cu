// RMSNorm over the last dimension (Hugging Face's LlamaRMSNorm, the weight product in f32 too):
// forward and backward, the same formulas as kernels/src/rms_norm.rs, arithmetic in f32.
//
// Forward: one block per row; r = 1 / sqrt(mean(x^2) + eps), y = x * r * w.
// Backward, deterministic (no atomics), in two kernels:
// 1. rms_norm_bwd_<T>: block b handles rows b, b + gridDim.x, ...; per row it recomputes r from x,
//    writes dx = r * (dxhat - xhat * mean(dxhat * xhat)) with xhat = x * r, dxhat = dy * w, and adds
//    dy * xhat (dweight) into its own accumulators: shared memory when `acc_in_shared` (c floats of
//    dynamic shared memory), else its own row of `partial` directly. Each accumulator column is read
//    and written by one thread only (the one that owns that column of the row), so no
//    synchronization is needed around them. At the end block b's sums are in
//    partial[b * c .. (b + 1) * c].
// 2. rms_norm_bwd_reduce_<T>: sums the `blocks` partial rows per column in a fixed order and writes
//    dweight as T.
// Launch: blockDim.x must be a multiple of 32 (full-warp shuffles), at most 1024.
#include "common.cuh"

// Sum of v over the block, returned to every thread (every thread adds the per-warp sums in the same
// order, so all get the same value). `red` holds 32 floats; it may be reused by the next call.
__device__ __forceinline__ float block_sum(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads(); // the previous call's readers are done with `red`
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; i++) total += red[i];
    return total;
}

// 1 / sqrt(mean(x^2) + eps) of one row (the CPU's load_row_rrms).
template <typename T>
__device__ __forceinline__ float row_rrms(const T *xr, size_t c, float eps, float *red) {
    float s = 0.0f;
    for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
        const float v = load_f32(xr[j]);
        s += v * v;
    }
    const float mean_sq = block_sum(s, red) / (float)c;
    return 1.0f / sqrtf(mean_sq + eps);
}

template <typename T>
__device__ __forceinline__ void rms_norm_fwd(const T *x, const T *w, T *y, size_t rows, size_t c, float eps) {
    __shared__ float red[32];
    const size_t row = blockIdx.x;
    if (row >= rows) return; // whole block: no thread reaches a barrier
    const T *xr = x + row * c;
    T *yr = y + row * c;
    const float r = row_rrms(xr, c, eps, red);
    for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
        yr[j] = store_as<T>(load_f32(xr[j]) * r * load_f32(w[j]));
    }
}

template <typename T>
__device__ __forceinline__ void rms_norm_bwd(const T *x, const T *w, const T *dy, T *dx, float *partial, size_t rows,
                                             size_t c, float eps, unsigned int acc_in_shared) {
    extern __shared__ float acc_shared[];
    __shared__ float red[32];
    float *own = partial + (size_t)blockIdx.x * c;
    float *acc = acc_in_shared ? acc_shared : own;
    // Thread t owns columns t, t + blockDim.x, ...
    for (size_t j = threadIdx.x; j < c; j += blockDim.x) acc[j] = 0.0f;
    for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *xr = x + row * c;
        const T *gr = dy + row * c;
        T *dxr = dx + row * c;
        const float r = row_rrms(xr, c, eps, red);
        float s_dxh = 0.0f;
        for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
            const float xh = load_f32(xr[j]) * r;
            const float g = load_f32(gr[j]);
            s_dxh += g * load_f32(w[j]) * xh;
            acc[j] += g * xh;
        }
        const float mean_dxh = block_sum(s_dxh, red) / (float)c;
        for (size_t j = threadIdx.x; j < c; j += blockDim.x) {
            const float xh = load_f32(xr[j]) * r;
            const float d = load_f32(gr[j]) * load_f32(w[j]);
            dxr[j] = store_as<T>(r * (d - xh * mean_dxh));
        }
    }
    if (acc_in_shared) {
        for (size_t j = threadIdx.x; j < c; j += blockDim.x) own[j] = acc[j];
    }
}

// blockDim (32, ny): threadIdx.x picks the column within a tile of 32, threadIdx.y strides over
// the partial rows; then lane y = 0 adds the ny sums in order. Deterministic for a given launch.
template <typename T>
__device__ __forceinline__ void rms_norm_bwd_reduce(const float *partial, size_t blocks, size_t c, T *dw) {
    __shared__ float tile[32][33];
    const size_t col = (size_t)blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (col < c) {
        for (size_t b = threadIdx.y; b < blocks; b += blockDim.y) s += partial[b * c + col];
    }
    tile[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < c) {
        float t = 0.0f;
        for (unsigned int i = 0; i < blockDim.y; i++) t += tile[i][threadIdx.x];
        dw[col] = store_as<T>(t);
    }
}

#define RMS_NORM_KERNELS(T, SUFFIX)                                                                          \
    extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T *x, const T *w, T *y, size_t rows, size_t c,      \
                                                     float eps) {                                             \
        rms_norm_fwd<T>(x, w, y, rows, c, eps);                                                               \
    }                                                                                                         \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T *x, const T *w, const T *dy, T *dx,              \
                                                     float *partial, size_t rows, size_t c, float eps,        \
                                                     unsigned int acc_in_shared) {                            \
        rms_norm_bwd<T>(x, w, dy, dx, partial, rows, c, eps, acc_in_shared);                                  \
    }                                                                                                         \
    extern "C" __global__ void rms_norm_bwd_reduce_##SUFFIX(const float *partial, size_t blocks, size_t c,    \
                                                            T *dw) {                                          \
        rms_norm_bwd_reduce<T>(partial, blocks, c, dw);                                                       \
    }

RMS_NORM_KERNELS(float, f32)
RMS_NORM_KERNELS(bf16, bf16)
RMS_NORM_KERNELS(f16, f16)
