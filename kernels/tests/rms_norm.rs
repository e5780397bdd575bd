//! Tests for `kernels::rms_norm` (Llama's RMSNorm): the reference against hand-computed values and
//! central finite differences (f64), then the fused CustomOp's forward and both gradients against
//! the reference in f32, bf16 and f16 at odd sizes (including sizes that split into several rayon
//! tasks with a ragged last one), a strided input, argument errors and an ignored timing. The
//! fast-path tests run on every device of `kernels::testing::test_devices()` (the CPU, and CUDA with
//! `--features cuda` on a GPU machine), always against the CPU reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{
    assert_close, closeness, finite_difference_grad, test_devices, Tolerance, BF16_TOL, F32_TOL,
};
use kernels::{rms_norm, rms_norm_reference};

/// Llama's `rms_norm_eps` (1e-5 for Llama 2 / TinyLlama, 1e-6 for some others).
const EPS: f64 = 1e-5;

type RmsFn = fn(&Tensor, &Tensor, f64) -> Result<Tensor>;

/// Reproducible uniform values in [offset - scale, offset + scale) (splitmix64; candle's CPU rng
/// cannot be seeded).
fn pseudo_random(shape: &[usize], seed: u64, scale: f64, offset: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = kernels::testing::uniform_values(n, seed)
        .into_iter()
        .map(|u| offset + scale * u)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Output and (dx, dweight) of `sum(f(x, w) * g)`, with x and w as Vars.
fn forward_and_grads(
    f: &dyn Fn(&Tensor, &Tensor, f64) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
) -> [Tensor; 3] {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = f(xv.as_tensor(), wv.as_tensor(), EPS).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    let get = |v: &Var| grads.get(v).expect("missing gradient").clone();
    [y.clone(), get(&xv), get(&wv)]
}

/// Inputs of shape `dims` (x with an offset, so that the rms is not just the spread) in `dtype`:
/// x, weight, upstream gradient.
fn inputs(dims: &[usize], seed: u64, dtype: DType) -> [Tensor; 3] {
    let c = *dims.last().unwrap();
    [
        pseudo_random(dims, seed, 2.0, 0.7),
        pseudo_random(&[c], seed + 1, 0.5, 1.0),
        pseudo_random(dims, seed + 2, 1.0, 0.0),
    ]
    .map(|t| t.to_dtype(dtype).unwrap())
}

/// Fast path in `dtype` on every test device against the f32 CPU reference on the same (rounded)
/// inputs. The sizes cover a ragged last rayon task (CPU), rows shorter than a warp, C not a multiple
/// of the block size, more rows than the CUDA backward has row blocks (1500 > 512), and C past what
/// its shared-memory accumulators hold (8500 > 8192).
fn check_fast_against_reference(dtype: DType, tol: Tolerance) {
    for dev in test_devices() {
        for (i, dims) in [
            vec![37, 77],
            vec![3, 7, 129],
            vec![301, 129],
            vec![1, 1],
            vec![1500, 5],
            vec![2, 1000],
            vec![3, 8500],
        ]
        .iter()
        .enumerate()
        {
            let ins = inputs(dims, 10 * i as u64, dtype);
            let on_dev = ins.clone().map(|t| t.to_device(&dev).unwrap());
            let fast = forward_and_grads(&rms_norm, &on_dev[0], &on_dev[1], &on_dev[2]);
            let f32_ins = ins.clone().map(|t| t.to_dtype(DType::F32).unwrap());
            let reference =
                forward_and_grads(&rms_norm_reference, &f32_ins[0], &f32_ins[1], &f32_ins[2]);
            for (name, (a, e)) in ["y", "dx", "dweight"]
                .iter()
                .zip(fast.iter().zip(&reference))
            {
                assert_eq!(a.dtype(), dtype, "{name} dtype");
                assert!(
                    a.device().same_device(&dev),
                    "{name} on {:?}",
                    a.device().location()
                );
                assert_eq!(a.dims(), e.dims(), "{name} shape");
                let a = a.to_device(&Device::Cpu).unwrap();
                assert_close(
                    &a,
                    e,
                    tol,
                    &format!("rms_norm {name} {dtype:?} {dims:?} on {:?}", dev.location()),
                );
            }
        }
    }
}

#[test]
fn rms_norm_reference_and_fast_path_match_hand_computed_values() {
    // Row [1, 2, 3, 4]: mean of squares 7.5, no mean subtraction (unlike LayerNorm), eps inside the
    // sqrt, weight multiplied last.
    let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1f32, 2., 1., -1.], &Device::Cpu).unwrap();
    let eps = 0.5; // large, so that forgetting it (or putting it outside the sqrt) shows
    let r = 1.0 / (7.5f32 + 0.5).sqrt();
    let expected = Tensor::new(&[[r, 4.0 * r, 3.0 * r, -4.0 * r]], &Device::Cpu).unwrap();
    assert_close(
        &rms_norm_reference(&x, &w, eps).unwrap(),
        &expected,
        F32_TOL,
        "rms_norm_reference",
    );
    for dev in test_devices() {
        let [x, w] = [&x, &w].map(|t| t.to_device(&dev).unwrap());
        assert_close(
            &rms_norm(&x, &w, eps)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap(),
            &expected,
            F32_TOL,
            &format!("rms_norm on {:?}", dev.location()),
        );
    }
}

#[test]
fn rms_norm_reference_gradients_match_finite_differences() {
    let [x, w, g] = inputs(&[3, 5], 1, DType::F64);
    let analytic = forward_and_grads(&rms_norm_reference, &x, &w, &g);
    let loss = |x: &Tensor, w: &Tensor| -> Result<f64> {
        rms_norm_reference(x, w, EPS)?
            .mul(&g)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let tol = Tolerance {
        rtol: 1e-5,
        atol: 1e-7,
    };
    let fd_x = finite_difference_grad(&x, 1e-5, |x| loss(x, &w)).unwrap();
    let fd_w = finite_difference_grad(&w, 1e-5, |w| loss(&x, w)).unwrap();
    assert_close(&analytic[1], &fd_x, tol, "dx vs finite differences");
    assert_close(&analytic[2], &fd_w, tol, "dweight vs finite differences");
    // The check must be able to fail: a wrong gradient (dx scaled by 1.01) is rejected.
    let wrong = analytic[1].affine(1.01, 0.0).unwrap();
    assert!(closeness(&wrong, &fd_x, tol).unwrap().0 > 1.0);
}

#[test]
fn rms_norm_forward_and_gradients_match_reference_f32() {
    check_fast_against_reference(DType::F32, F32_TOL);
}

#[test]
fn rms_norm_forward_and_gradients_match_reference_bf16() {
    check_fast_against_reference(DType::BF16, BF16_TOL);
}

#[test]
fn rms_norm_forward_and_gradients_match_reference_f16() {
    check_fast_against_reference(DType::F16, BF16_TOL);
}

#[test]
fn rms_norm_accepts_strided_input() {
    // A transposed view is copied (differentiably) before the kernel; gradients land on the Var.
    let x = pseudo_random(&[77, 37], 7, 2.0, 0.7)
        .to_dtype(DType::F32)
        .unwrap();
    let [_, w, g] = inputs(&[37, 77], 8, DType::F32);
    let via_t = |f: RmsFn| move |x: &Tensor, w: &Tensor, eps: f64| f(&x.t()?, w, eps);
    let reference = forward_and_grads(&via_t(rms_norm_reference), &x, &w, &g);
    for dev in test_devices() {
        let [x, w, g] = [&x, &w, &g].map(|t| t.to_device(&dev).unwrap());
        let fast = forward_and_grads(&via_t(rms_norm), &x, &w, &g);
        assert_eq!(fast[1].dims(), [77, 37]);
        for (name, (a, e)) in ["y", "dx", "dweight"]
            .iter()
            .zip(fast.iter().zip(&reference))
        {
            let a = a.to_device(&Device::Cpu).unwrap();
            assert_close(
                &a,
                e,
                F32_TOL,
                &format!("strided rms_norm {name} on {:?}", dev.location()),
            );
        }
    }
}

#[test]
fn rms_norm_rejects_mismatched_shapes_dtypes_and_eps() {
    let [x, w, _] = inputs(&[4, 6], 3, DType::F32);
    let short = w.narrow(0, 0, 5).unwrap();
    for f in [rms_norm as RmsFn, rms_norm_reference] {
        let err = f(&x, &short, EPS).unwrap_err().to_string();
        assert!(
            err.contains("rms_norm") && err.contains("[5]") && err.contains("[4, 6]"),
            "{err}"
        );
    }
    let err = rms_norm(&x, &w.to_dtype(DType::BF16).unwrap(), EPS)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rms_norm") && err.contains("dtype") && err.contains("BF16"),
        "{err}"
    );
    let err = rms_norm(&x, &w, -1.0).unwrap_err().to_string();
    assert!(err.contains("rms_norm") && err.contains("eps"), "{err}");
    let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
    let err = rms_norm(&scalar, &w, EPS).unwrap_err().to_string();
    assert!(err.contains("rms_norm") && err.contains("scalar"), "{err}");
    // f64 is for the reference only.
    let err = rms_norm(
        &x.to_dtype(DType::F64).unwrap(),
        &w.to_dtype(DType::F64).unwrap(),
        EPS,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("rms_norm") && err.contains("F64"), "{err}");
    // The same f64 rejection from every device's kernel (the CPU one above included).
    for dev in test_devices() {
        let [x, w] = [&x, &w].map(|t| t.to_dtype(DType::F64).unwrap().to_device(&dev).unwrap());
        let err = rms_norm(&x, &w, EPS).unwrap_err().to_string();
        assert!(
            err.contains("rms_norm") && err.contains("F64"),
            "{err} on {:?}",
            dev.location()
        );
    }
}

/// `cargo test --release -p kernels --test rms_norm -- --ignored --nocapture`
#[test]
#[ignore]
fn rms_norm_speed_vs_reference() {
    let [x, w, g] = inputs(&[8 * 512, 2048], 5, DType::F32);
    for (name, f) in [
        ("fused", rms_norm as RmsFn),
        ("reference", rms_norm_reference as RmsFn),
    ] {
        forward_and_grads(&f, &x, &w, &g); // warm-up
        let iters = 10;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            forward_and_grads(&f, &x, &w, &g);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            f(&x, &w, EPS).unwrap();
        }
        let fwd_ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        println!("rms_norm {name} (4096, 2048) f32: fwd+bwd {ms:.2} ms/iter (with Var copies and y*g loss), forward only {fwd_ms:.2} ms");
    }
}
