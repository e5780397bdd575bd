//! CUDA side of the kernels (feature `cuda`): the PTX modules that `build.rs` compiles from
//! `src/cuda/*.cu`, and the few helpers every op's `cuda_fwd` uses.
//!
//! Adding a CUDA path to an op (the pattern `gelu.rs` follows):
//! 1. `src/cuda/<op>.cu`: `#include "common.cuh"`, kernels as `extern "C" __global__` functions named
//!    `<op>_<fwd|bwd>_<f32|bf16|f16>`, f32 arithmetic with `load_f32` / `store_as<T>`; elementwise
//!    kernels loop with `GRID_STRIDE_LOOP(i, n)`.
//! 2. One line below: `ptx_module!(OP, "<op>");` (build.rs compiles every `.cu` found).
//! 3. In `<op>.rs`, behind `#[cfg(feature = "cuda")]`: `fn cuda_fwd` on the forward `CustomOp`, and
//!    the backward as a second `CustomOp` (`<Op>Backward`) with `cpu_fwd` (the CPU backward) and
//!    `cuda_fwd`, applied in `bwd` with `apply_opN_no_bwd`, so that `bwd` itself is device-generic.
//!    Inside `cuda_fwd`: [`view`] for each input, `dev.alloc::<T>(n)` for the output, [`kernel`] to
//!    get the function, `builder()`, `arg(...)` in the kernel's parameter order, and `launch` with
//!    [`elementwise_config`] or [`rows_config`]; wrap the output with
//!    `CudaStorage::wrap_cuda_slice(out, dev.clone())`.
//! 4. Tests: loop over [`crate::testing::test_devices`] and compare with the CPU reference.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, CudaView, DeviceRepr, LaunchArgs};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
/// What an op's `cuda_fwd` needs in scope: `PushKernelArg` for `builder().arg(..)`, `WrapErr` for
/// `.w()` on cudarc results, `LaunchConfig`.
pub use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
pub use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CudaStorage, DType, Layout, Result, WithDType};
use std::sync::Arc;

/// One PTX module compiled by build.rs: loaded once per device (candle caches it by `name`).
#[derive(Debug, Clone, Copy)]
pub struct Module {
    /// Cache key in candle's per-device module map; prefixed so it cannot collide with other users.
    pub name: &'static str,
    pub ptx: &'static str,
}

macro_rules! ptx_module {
    ($id:ident, $file:literal) => {
        #[doc = concat!("`src/cuda/", $file, ".cu`, compiled to PTX by build.rs.")]
        pub const $id: Module = Module {
            name: concat!("zero_candle_kernels/", $file),
            ptx: include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
        };
    };
}

ptx_module!(GELU, "gelu");
ptx_module!(ADAMW, "adamw");
ptx_module!(CAST, "cast");
ptx_module!(SWIGLU, "swiglu");
ptx_module!(ROPE, "rope");
ptx_module!(ATTENTION, "attention");
ptx_module!(CROSS_ENTROPY, "cross_entropy");
ptx_module!(LAYER_NORM, "layer_norm");
ptx_module!(RMS_NORM, "rms_norm");

/// Every module, e.g. to check that all of them load on a device.
pub const ALL_MODULES: &[Module] = &[GELU, ADAMW, CAST, SWIGLU, ROPE, ATTENTION, CROSS_ENTROPY, LAYER_NORM, RMS_NORM];

/// A kernel function bound to a device's stream (candle's own `CudaFunc` cannot be named outside
/// candle, so this is the same pair).
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    /// A launch builder on the device's stream: push the arguments with `.arg(&x)` (`&mut` for
    /// outputs, so that cudarc's event tracking records the write), then `unsafe { b.launch(cfg) }.w()?`.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The kernel `function` from `module`, loading the module on `dev` the first time.
pub fn kernel(dev: &CudaDevice, module: Module, function: &str) -> Result<Kernel> {
    let func = dev.get_or_load_custom_func(function, module.name, module.ptx)?;
    Ok(Kernel {
        func: func.into_cuda_function(),
        stream: dev.cuda_stream(),
    })
}

/// Threads per block of the elementwise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Enough blocks to fill an H100 many times over; larger inputs are covered by the grid-stride loop.
const MAX_ELEMENTWISE_BLOCKS: usize = 1 << 16;

/// Launch config for a grid-stride elementwise kernel over `n` elements (`GRID_STRIDE_LOOP`).
pub fn elementwise_config(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, MAX_ELEMENTWISE_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (ELEMENTWISE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch config for row kernels (norms, softmax, cross-entropy): one block of `threads` threads per
/// row (`blockIdx.x` is the row), with `shared_mem_bytes` of dynamic shared memory.
pub fn rows_config(rows: usize, threads: u32, shared_mem_bytes: u32) -> Result<LaunchConfig> {
    if rows > i32::MAX as usize {
        bail!("rows_config: {rows} rows is more than one grid dimension holds");
    }
    Ok(LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes,
    })
}

/// Element types of the kernels: the suffix of the exported kernel names (`gelu_fwd_bf16`).
pub trait CudaFloat: CudaDType + DeviceRepr + WithDType {
    const SUFFIX: &'static str;
}
impl CudaFloat for f32 {
    const SUFFIX: &'static str = "f32";
}
impl CudaFloat for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl CudaFloat for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// Kernel-name suffix for a dtype, or an error naming `op`.
pub fn suffix(dtype: DType, op: &str) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => f32::SUFFIX,
        DType::BF16 => half::bf16::SUFFIX,
        DType::F16 => half::f16::SUFFIX,
        other => bail!("{op}: unsupported dtype {other:?} on CUDA (expected f32, bf16 or f16)"),
    })
}

/// The contiguous part of `storage` that `layout` views, as a `CudaView<T>` (the CUDA counterpart of
/// `util::contiguous_slice`).
pub fn view<'a, T: CudaFloat>(storage: &'a CudaStorage, layout: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    if storage.dtype() != T::DTYPE {
        bail!("{op}: expected {:?} storage, got {:?}", T::DTYPE, storage.dtype());
    }
    let slice = storage.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => bail!(
            "{op}: input must be contiguous (call .contiguous() first), got strides {:?}",
            layout.stride()
        ),
    }
}

/// Launches an elementwise kernel `function` of `module` as `f(inputs..., out, n)`: the common
/// shape of unary/binary elementwise ops. `T` is the element type of the inputs and the output.
pub fn launch_elementwise<T: CudaFloat>(
    dev: &CudaDevice,
    module: Module,
    function: &str,
    inputs: &[&CudaView<'_, T>],
    n: usize,
) -> Result<CudaStorage> {
    // As candle's own kernels do, an empty output is allocated like any other and nothing launched.
    let mut out = unsafe { dev.alloc::<T>(n) }?;
    if n > 0 {
        let k = kernel(dev, module, function)?;
        let mut b = k.builder();
        for x in inputs {
            b.arg(*x);
        }
        b.arg(&mut out);
        b.arg(&n);
        unsafe { b.launch(elementwise_config(n)) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_cover_the_elements() {
        let c = elementwise_config(0);
        assert_eq!(c.grid_dim.0, 1);
        let c = elementwise_config(1000);
        assert_eq!(c.grid_dim.0 * c.block_dim.0, 1024);
        let c = elementwise_config(usize::MAX / 2);
        assert_eq!(c.grid_dim.0 as usize, MAX_ELEMENTWISE_BLOCKS);
        assert_eq!(rows_config(7, 128, 0).unwrap().grid_dim, (7, 1, 1));
    }

    #[test]
    fn every_module_is_ptx() {
        for m in ALL_MODULES {
            assert!(m.ptx.contains(".entry"), "{} has no kernels", m.name);
        }
    }
}
