//! Tests for `kernels::gelu` (tanh approximation): the reference against known values and central
//! finite differences (f64), then the fused CustomOp's forward and gradient against the reference in
//! f32, bf16 and f16 at odd sizes (including one that spans several rayon tasks with a ragged last
//! one), a strided input, and an ignored timing. The fast-path tests run on every device of
//! `kernels::testing::test_devices()` (the CPU, and CUDA with `--features cuda` on a GPU machine),
//! always against the CPU reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{
    assert_close, closeness, finite_difference_grad, test_devices, Tolerance, BF16_TOL, F32_TOL,
};
use kernels::{gelu, gelu_reference};

/// Reproducible uniform values in [-scale, scale) (splitmix64; candle's CPU rng cannot be seeded).
fn pseudo_random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = kernels::testing::uniform_values(n, seed).into_iter().map(|u| scale * u).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Output and dx of `sum(f(x) * g)` with x as a Var.
fn forward_and_grad(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, g: &Tensor) -> [Tensor; 2] {
    let xv = Var::from_tensor(x).unwrap();
    let y = f(xv.as_tensor()).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    [y, grads.get(&xv).expect("missing gradient").clone()]
}

/// Fast path in `dtype` on every test device against the f32 CPU reference on the same (rounded)
/// inputs.
fn check_fast_against_reference(dtype: DType, tol: Tolerance) {
    for dev in test_devices() {
        for (i, dims) in [vec![37, 77], vec![3, 7, 129], vec![100_003], vec![1]]
            .iter()
            .enumerate()
        {
            // Range +-6 covers both saturated tails and the curved middle.
            let x = pseudo_random(dims, 10 * i as u64, 6.0)
                .to_dtype(dtype)
                .unwrap();
            let g = pseudo_random(dims, 10 * i as u64 + 1, 1.0)
                .to_dtype(dtype)
                .unwrap();
            let (xd, gd) = (x.to_device(&dev).unwrap(), g.to_device(&dev).unwrap());
            let fast = forward_and_grad(&gelu, &xd, &gd);
            let (x32, g32) = (
                x.to_dtype(DType::F32).unwrap(),
                g.to_dtype(DType::F32).unwrap(),
            );
            let reference = forward_and_grad(&gelu_reference, &x32, &g32);
            for (name, (a, e)) in ["y", "dx"].iter().zip(fast.iter().zip(&reference)) {
                assert_eq!(a.dtype(), dtype, "{name} dtype");
                assert!(a.device().same_device(&dev), "{name} on {:?}", a.device().location());
                let a = a.to_device(&Device::Cpu).unwrap();
                assert_close(&a, e, tol, &format!("gelu {name} {dtype:?} {dims:?} on {:?}", dev.location()));
            }
        }
    }
}

#[test]
fn gelu_reference_matches_known_values() {
    // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) evaluated in f64 (Python's math module).
    let xs = [-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0];
    let expected = [
        -0.0036373920817729943,
        -0.15880800939172324,
        -0.15428599017485606,
        0.0,
        0.34571400982514394,
        0.8411919906082768,
        1.954597694087775,
        2.996362607918227,
    ];
    let x = Tensor::new(&xs, &Device::Cpu).unwrap();
    let e = Tensor::new(&expected, &Device::Cpu).unwrap();
    let tight = Tolerance {
        rtol: 1e-12,
        atol: 1e-14,
    };
    assert_close(
        &gelu_reference(&x).unwrap(),
        &e,
        tight,
        "gelu_reference f64",
    );
    let (x32, e32) = (
        x.to_dtype(DType::F32).unwrap(),
        e.to_dtype(DType::F32).unwrap(),
    );
    let f32_tol = Tolerance {
        rtol: 1e-6,
        atol: 1e-7,
    };
    assert_close(
        &gelu_reference(&x32).unwrap(),
        &e32,
        f32_tol,
        "gelu_reference f32",
    );
    assert_close(&gelu(&x32).unwrap(), &e32, f32_tol, "gelu f32");
}

#[test]
fn gelu_reference_gradient_matches_finite_differences() {
    let x = pseudo_random(&[3, 5], 1, 3.0);
    let g = pseudo_random(&[3, 5], 2, 1.0);
    let [_, analytic] = forward_and_grad(&gelu_reference, &x, &g);
    let fd = finite_difference_grad(&x, 1e-5, |x| {
        gelu_reference(x)?.mul(&g)?.sum_all()?.to_scalar::<f64>()
    })
    .unwrap();
    let tol = Tolerance {
        rtol: 1e-6,
        atol: 1e-8,
    };
    assert_close(&analytic, &fd, tol, "gelu dx vs finite differences");
    // The check must be able to fail: a gradient off by 0.1% is rejected.
    assert!(
        closeness(&analytic.affine(1.001, 0.0).unwrap(), &fd, tol)
            .unwrap()
            .0
            > 1.0
    );
}

#[test]
fn gelu_forward_and_gradient_match_reference_f32() {
    check_fast_against_reference(DType::F32, F32_TOL);
}

#[test]
fn gelu_forward_and_gradient_match_reference_bf16() {
    check_fast_against_reference(DType::BF16, BF16_TOL);
}

#[test]
fn gelu_forward_and_gradient_match_reference_f16() {
    check_fast_against_reference(DType::F16, BF16_TOL);
}

#[test]
fn gelu_accepts_strided_input() {
    let x = pseudo_random(&[77, 37], 3, 4.0)
        .to_dtype(DType::F32)
        .unwrap();
    let g = pseudo_random(&[37, 77], 4, 1.0)
        .to_dtype(DType::F32)
        .unwrap();
    let reference = forward_and_grad(&|x: &Tensor| gelu_reference(&x.t()?), &x, &g);
    for dev in test_devices() {
        let (xd, gd) = (x.to_device(&dev).unwrap(), g.to_device(&dev).unwrap());
        let fast = forward_and_grad(&|x: &Tensor| gelu(&x.t()?), &xd, &gd);
        assert_eq!(fast[1].dims(), [77, 37]);
        let on = format!("on {:?}", dev.location());
        assert_close(&fast[0].to_device(&Device::Cpu).unwrap(), &reference[0], F32_TOL, &format!("strided gelu y {on}"));
        assert_close(&fast[1].to_device(&Device::Cpu).unwrap(), &reference[1], F32_TOL, &format!("strided gelu dx {on}"));
    }
}

#[test]
fn gelu_saturates_without_nan_for_large_inputs() {
    // The kernel's exp is clamped: far tails must give exactly x (or 0) and slope 1 (or 0).
    for dev in test_devices() {
        let x = Tensor::new(&[-1e4f32, -50.0, -12.0, 12.0, 50.0, 1e4], &dev).unwrap();
        let g = Tensor::ones(6, DType::F32, &dev).unwrap();
        let [y, dx] = forward_and_grad(&gelu, &x, &g);
        let expected_y = Tensor::new(&[0f32, 0.0, 0.0, 12.0, 50.0, 1e4], &Device::Cpu).unwrap();
        let expected_dx = Tensor::new(&[0f32, 0.0, 0.0, 1.0, 1.0, 1.0], &Device::Cpu).unwrap();
        let on = format!("on {:?}", dev.location());
        assert_close(&y.to_device(&Device::Cpu).unwrap(), &expected_y, F32_TOL, &format!("gelu tails {on}"));
        assert_close(&dx.to_device(&Device::Cpu).unwrap(), &expected_dx, F32_TOL, &format!("gelu slope in the tails {on}"));
    }
}

#[test]
fn gelu_rejects_unsupported_dtype() {
    for dev in test_devices() {
        let x = pseudo_random(&[4], 5, 1.0).to_device(&dev).unwrap(); // f64: the fast path covers f32/bf16/f16 only
        let err = gelu(&x).unwrap_err().to_string();
        assert!(err.contains("gelu") && err.contains("F64"), "{err}");
    }
}

/// `cargo test --release -p kernels --test gelu -- --ignored --nocapture`
#[test]
#[ignore]
fn gelu_speed_vs_reference() {
    let dims = [12 * 256, 4 * 384];
    let x = pseudo_random(&dims, 5, 4.0).to_dtype(DType::F32).unwrap();
    let g = pseudo_random(&dims, 6, 1.0).to_dtype(DType::F32).unwrap();
    type F = fn(&Tensor) -> Result<Tensor>;
    for (name, f) in [("fused", gelu as F), ("reference", gelu_reference as F)] {
        forward_and_grad(&f, &x, &g); // warm-up
        let iters = 10;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            forward_and_grad(&f, &x, &g);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            f(&x).unwrap();
        }
        let fwd_ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        println!("gelu {name} {dims:?} f32: fwd+bwd {ms:.2} ms/iter (with Var copy and y*g loss), forward only {fwd_ms:.2} ms");
    }
}
