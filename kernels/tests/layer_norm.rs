//! Tests for `kernels::layer_norm`: the reference against hand-computed values and central finite
//! differences (f64), then the fused CustomOp's forward and its three gradients against the
//! reference in f32, bf16 and f16 at odd sizes (including sizes that split into several rayon tasks
//! with a ragged last one), plus argument errors and an ignored timing. The fast-path tests run on
//! every device of `kernels::testing::test_devices()` (the CPU, and CUDA with `--features cuda` on a
//! GPU machine), always against the CPU reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{assert_close, finite_difference_grad, test_devices, Tolerance, BF16_TOL, F32_TOL};
use kernels::{layer_norm, layer_norm_reference};

const EPS: f64 = 1e-5;

/// Reproducible uniform values in [offset - scale, offset + scale) (splitmix64; candle's CPU rng
/// cannot be seeded).
fn pseudo_random(shape: &[usize], seed: u64, scale: f64, offset: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = kernels::testing::uniform_values(n, seed).into_iter().map(|u| offset + scale * u).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

type LnFn = fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>;

/// Output and (dx, dweight, dbias) of `sum(f(x, w, b) * g)`, with x, w, b as Vars.
fn forward_and_grads(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    g: &Tensor,
) -> [Tensor; 4] {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), EPS).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    let get = |v: &Var| grads.get(v).expect("missing gradient").clone();
    [y.clone(), get(&xv), get(&wv), get(&bv)]
}

/// Inputs of shape `dims` (x with a row offset so that the mean matters) in `dtype`.
fn inputs(dims: &[usize], seed: u64, dtype: DType) -> [Tensor; 4] {
    let c = *dims.last().unwrap();
    [
        pseudo_random(dims, seed, 2.0, 0.7),
        pseudo_random(&[c], seed + 1, 0.5, 1.0),
        pseudo_random(&[c], seed + 2, 0.5, 0.0),
        pseudo_random(dims, seed + 3, 1.0, 0.0),
    ]
    .map(|t| t.to_dtype(dtype).unwrap())
}

/// Fast path in `dtype` on every test device against the f32 CPU reference on the same (rounded)
/// inputs. The sizes cover a ragged last rayon task (CPU), rows shorter than a warp, C not a multiple
/// of the block size, more rows than the CUDA backward has row blocks (1500 > 512), and C past what
/// its shared-memory accumulators hold (4500 > 4096).
fn check_fast_against_reference(dtype: DType, tol: Tolerance) {
    for dev in test_devices() {
        for (i, dims) in [vec![37, 77], vec![3, 7, 129], vec![301, 129], vec![1, 1], vec![1500, 5], vec![2, 1000], vec![3, 4500]]
            .iter()
            .enumerate()
        {
            let ins = inputs(dims, 10 * i as u64, dtype);
            let on_dev = ins.clone().map(|t| t.to_device(&dev).unwrap());
            let fast = forward_and_grads(&layer_norm, &on_dev[0], &on_dev[1], &on_dev[2], &on_dev[3]);
            let f32_ins = ins.clone().map(|t| t.to_dtype(DType::F32).unwrap());
            let reference = forward_and_grads(
                &layer_norm_reference,
                &f32_ins[0],
                &f32_ins[1],
                &f32_ins[2],
                &f32_ins[3],
            );
            for (name, (a, e)) in ["y", "dx", "dweight", "dbias"]
                .iter()
                .zip(fast.iter().zip(&reference))
            {
                assert_eq!(a.dtype(), dtype, "{name} dtype");
                assert!(a.device().same_device(&dev), "{name} on {:?}", a.device().location());
                assert_eq!(a.dims(), e.dims(), "{name} shape");
                let a = a.to_device(&Device::Cpu).unwrap();
                assert_close(&a, e, tol, &format!("layer_norm {name} {dtype:?} {dims:?} on {:?}", dev.location()));
            }
        }
    }
}

#[test]
fn layer_norm_reference_matches_hand_computed_values() {
    // Row [1, 2, 3, 4]: mean 2.5, biased variance 1.25 (PyTorch), eps inside the sqrt.
    let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
    let w = Tensor::new(&[1f32, 2., 1., 1.], &Device::Cpu).unwrap();
    let b = Tensor::new(&[0f32, 0., 0., 10.], &Device::Cpu).unwrap();
    let eps = 0.75; // large, so that forgetting it (or putting it outside the sqrt) shows
    let rstd = 1.0 / (1.25f32 + 0.75).sqrt();
    let expected = Tensor::new(
        &[[
            -1.5 * rstd,
            -0.5 * rstd * 2.0,
            0.5 * rstd,
            1.5 * rstd + 10.0,
        ]],
        &Device::Cpu,
    )
    .unwrap();
    let got = layer_norm_reference(&x, &w, &b, eps).unwrap();
    assert_close(&got, &expected, F32_TOL, "layer_norm_reference");
    for dev in test_devices() {
        let [x, w, b] = [&x, &w, &b].map(|t| t.to_device(&dev).unwrap());
        assert_close(
            &layer_norm(&x, &w, &b, eps).unwrap().to_device(&Device::Cpu).unwrap(),
            &expected,
            F32_TOL,
            &format!("layer_norm on {:?}", dev.location()),
        );
    }
}

#[test]
fn layer_norm_reference_gradients_match_finite_differences() {
    let [x, w, b, g] = inputs(&[3, 5], 1, DType::F64);
    let analytic = forward_and_grads(&layer_norm_reference, &x, &w, &b, &g);
    let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> Result<f64> {
        layer_norm_reference(x, w, b, EPS)?
            .mul(&g)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let tol = Tolerance {
        rtol: 1e-5,
        atol: 1e-7,
    };
    let fd_x = finite_difference_grad(&x, 1e-5, |x| loss(x, &w, &b)).unwrap();
    let fd_w = finite_difference_grad(&w, 1e-5, |w| loss(&x, w, &b)).unwrap();
    let fd_b = finite_difference_grad(&b, 1e-5, |b| loss(&x, &w, b)).unwrap();
    assert_close(&analytic[1], &fd_x, tol, "dx vs finite differences");
    assert_close(&analytic[2], &fd_w, tol, "dweight vs finite differences");
    assert_close(&analytic[3], &fd_b, tol, "dbias vs finite differences");
    // The check must be able to fail: a wrong gradient (dx scaled by 1.01) is rejected.
    let wrong = analytic[1].affine(1.01, 0.0).unwrap();
    assert!(kernels::testing::closeness(&wrong, &fd_x, tol).unwrap().0 > 1.0);
}

#[test]
fn layer_norm_forward_and_gradients_match_reference_f32() {
    check_fast_against_reference(DType::F32, F32_TOL);
}

#[test]
fn layer_norm_forward_and_gradients_match_reference_bf16() {
    check_fast_against_reference(DType::BF16, BF16_TOL);
}

#[test]
fn layer_norm_forward_and_gradients_match_reference_f16() {
    check_fast_against_reference(DType::F16, BF16_TOL);
}

#[test]
fn layer_norm_accepts_strided_input() {
    // A transposed view is copied (differentiably) before the kernel; gradients land on the Var.
    let x = pseudo_random(&[77, 37], 7, 2.0, 0.7)
        .to_dtype(DType::F32)
        .unwrap();
    let [_, w, b, g] = inputs(&[37, 77], 8, DType::F32);
    let via_t = |f: LnFn| move |x: &Tensor, w: &Tensor, b: &Tensor, eps: f64| f(&x.t()?, w, b, eps);
    let reference = forward_and_grads(&via_t(layer_norm_reference), &x, &w, &b, &g);
    for dev in test_devices() {
        let [x, w, b, g] = [&x, &w, &b, &g].map(|t| t.to_device(&dev).unwrap());
        let fast = forward_and_grads(&via_t(layer_norm), &x, &w, &b, &g);
        assert_eq!(fast[1].dims(), [77, 37]);
        for (name, (a, e)) in ["y", "dx", "dweight", "dbias"]
            .iter()
            .zip(fast.iter().zip(&reference))
        {
            let a = a.to_device(&Device::Cpu).unwrap();
            assert_close(&a, e, F32_TOL, &format!("strided layer_norm {name} on {:?}", dev.location()));
        }
    }
}

#[test]
fn layer_norm_rejects_mismatched_shapes_and_dtypes() {
    let [x, w, b, _] = inputs(&[4, 6], 3, DType::F32);
    let short = w.narrow(0, 0, 5).unwrap();
    let err = layer_norm(&x, &short, &b, EPS).unwrap_err().to_string();
    assert!(
        err.contains("layer_norm") && err.contains("[5]") && err.contains("[4, 6]"),
        "{err}"
    );
    let err = layer_norm(&x, &w.to_dtype(DType::BF16).unwrap(), &b, EPS)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dtype") && err.contains("BF16"), "{err}");
    let err = layer_norm(
        &x.to_dtype(DType::F64).unwrap(),
        &w.to_dtype(DType::F64).unwrap(),
        &b.to_dtype(DType::F64).unwrap(),
        EPS,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("F64"), "{err}");
    // The same f64 rejection from every device's kernel (the CPU one above included).
    for dev in test_devices() {
        let [x, w, b] = [&x, &w, &b].map(|t| t.to_dtype(DType::F64).unwrap().to_device(&dev).unwrap());
        let err = layer_norm(&x, &w, &b, EPS).unwrap_err().to_string();
        assert!(err.contains("layer_norm") && err.contains("F64"), "{err} on {:?}", dev.location());
    }
}

/// `cargo test --release -p kernels --test layer_norm -- --ignored --nocapture`
#[test]
#[ignore]
fn layer_norm_speed_vs_reference() {
    let [x, w, b, g] = inputs(&[12 * 256, 384], 5, DType::F32);
    // x * w + b: two cheap candle ops, to show what the Var/loss/backward harness costs by itself.
    let floor: LnFn = |x, w, b, _| x.broadcast_mul(w)?.broadcast_add(b);
    for (name, f) in [
        ("fused", layer_norm as LnFn),
        ("reference", layer_norm_reference as LnFn),
        ("x*w+b floor", floor),
    ] {
        forward_and_grads(&f, &x, &w, &b, &g); // warm-up
        let iters = 20;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            forward_and_grads(&f, &x, &w, &b, &g);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        println!("layer_norm {name} fwd+bwd (3072, 384) f32: {ms:.2} ms/iter (includes Var copies and the y*g loss)");
        let start = std::time::Instant::now();
        for _ in 0..iters {
            f(&x, &w, &b, EPS).unwrap();
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        println!("layer_norm {name} forward only (3072, 384) f32: {ms:.2} ms/iter");
    }
}
