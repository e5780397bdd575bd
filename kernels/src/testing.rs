//! Helpers for the op tests (public so that kernels/tests, models and the engine share them):
//! named tolerances, a closeness check that reports the worst element, and central finite
//! differences to check each `_reference` once.

use candle_core::{DType, Device, Result, Tensor};

/// The devices the op tests run on: the CPU, plus CUDA device 0 when the crate is built with the
/// `cuda` feature and a GPU opens (without one, the CUDA half of the tests is skipped, not failed:
/// CI builds the `cuda` variant without a GPU). The CUDA device is opened once per test binary.
/// `ZC_TEST_CUDA=require` turns a missing GPU into a panic, for runs on a GPU machine.
pub fn test_devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut devices = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    {
        static CUDA: std::sync::OnceLock<Option<Device>> = std::sync::OnceLock::new();
        let cuda = CUDA.get_or_init(|| match Device::new_cuda(0) {
            Ok(d) => Some(d),
            Err(e) => {
                if std::env::var("ZC_TEST_CUDA").as_deref() == Ok("require") {
                    panic!("ZC_TEST_CUDA=require but CUDA device 0 does not open: {e}");
                }
                eprintln!("test_devices: no CUDA device ({e}); testing on the CPU only");
                None
            }
        });
        devices.extend(cuda.clone());
    }
    #[cfg(not(feature = "cuda"))]
    if std::env::var("ZC_TEST_CUDA").as_deref() == Ok("require") {
        panic!("ZC_TEST_CUDA=require but kernels was built without the `cuda` feature");
    }
    devices
}

/// Tolerances for comparing a fast path with its f32 reference.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub rtol: f32,
    pub atol: f32,
}

/// f32 fast path against f32 reference: only summation order differs.
pub const F32_TOL: Tolerance = Tolerance { rtol: 1e-4, atol: 1e-5 };
/// bf16 inputs/outputs (8 bits of mantissa) against the f32 reference on the same bf16 inputs.
pub const BF16_TOL: Tolerance = Tolerance { rtol: 2e-2, atol: 2e-2 };

/// Largest |a - b| relative to `atol + rtol * |b|`; <= 1 means close. Both are compared in f32.
pub fn closeness(a: &Tensor, b: &Tensor, tol: Tolerance) -> Result<(f32, usize, f32, f32)> {
    if a.dims() != b.dims() {
        candle_core::bail!("shape mismatch: {:?} vs {:?}", a.dims(), b.dims());
    }
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut worst = (0f32, 0usize, 0f32, 0f32);
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        let ratio = if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() / (tol.atol + tol.rtol * y.abs()) };
        if ratio > worst.0 || (ratio.is_infinite() && worst.0.is_finite()) {
            worst = (ratio, i, *x, *y);
        }
    }
    Ok(worst)
}

/// Panics (this is test support) with the worst element when `actual` is not close to `expected`.
pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: Tolerance, what: &str) {
    match closeness(actual, expected, tol) {
        Ok((ratio, i, x, y)) => assert!(
            ratio <= 1.0,
            "{what}: element {i} is {x}, expected {y} (error {ratio:.2}x the tolerance {tol:?})"
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Central finite differences of a scalar function `f` with respect to every element of `x`
/// (f64 recommended for the check). Returns a tensor shaped like `x`.
pub fn finite_difference_grad(x: &Tensor, eps: f64, f: impl Fn(&Tensor) -> Result<f64>) -> Result<Tensor> {
    let shape = x.shape().clone();
    let base = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut grad = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let fp = f(&Tensor::from_vec(plus, shape.clone(), x.device())?.to_dtype(x.dtype())?)?;
        let fm = f(&Tensor::from_vec(minus, shape.clone(), x.device())?.to_dtype(x.dtype())?)?;
        grad.push((fp - fm) / (2.0 * eps));
    }
    Tensor::from_vec(grad, shape, x.device())
}

/// `n` deterministic values uniform in [-1, 1) from SplitMix64 seeded by `seed`, so that test
/// inputs reproduce exactly across runs and machines.
pub fn uniform_values(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            2.0 * (z >> 11) as f64 / (1u64 << 53) as f64 - 1.0
        })
        .collect()
}
