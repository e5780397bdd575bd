//! Tests for `kernels::swiglu` (`silu(gate) * up`, Llama's MLP activation): the reference against
//! known values and central finite differences (f64, both inputs), then the fused CustomOp's
//! forward and both gradients against the reference in f32, bf16 and f16 at odd sizes (including one
//! that spans several rayon tasks with a ragged last one), saturation without NaN at |gate| = 100
//! and beyond, a strided input, argument errors and an ignored timing. The fast-path tests run on
//! every device of `kernels::testing::test_devices()` (the CPU, and CUDA with `--features cuda` on a
//! GPU machine), always against the CPU reference.

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{
    assert_close, closeness, finite_difference_grad, test_devices, Tolerance, BF16_TOL, F32_TOL,
};
use kernels::{swiglu, swiglu_reference};

type SwiGluFn = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// Reproducible uniform values in [-scale, scale) (splitmix64; candle's CPU rng cannot be seeded).
fn pseudo_random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = kernels::testing::uniform_values(n, seed)
        .into_iter()
        .map(|u| scale * u)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Output and (dgate, dup) of `sum(f(gate, up) * g)` with gate and up as Vars.
fn forward_and_grads(
    f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    gate: &Tensor,
    up: &Tensor,
    g: &Tensor,
) -> [Tensor; 3] {
    let (gv, uv) = (
        Var::from_tensor(gate).unwrap(),
        Var::from_tensor(up).unwrap(),
    );
    let y = f(gv.as_tensor(), uv.as_tensor()).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    let get = |v: &Var| grads.get(v).expect("missing gradient").clone();
    [y.clone(), get(&gv), get(&uv)]
}

/// `t` copied to the CPU (for comparisons with the CPU reference).
fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

/// Fast path in `dtype` on every test device against the f32 CPU reference on the same (rounded)
/// inputs.
fn check_fast_against_reference(dtype: DType, tol: Tolerance) {
    for dev in test_devices() {
        for (i, dims) in [vec![37, 77], vec![3, 7, 129], vec![100_003], vec![1]]
            .iter()
            .enumerate()
        {
            // gate in +-8 covers both saturated tails and the curved middle.
            let gate = pseudo_random(dims, 10 * i as u64, 8.0)
                .to_dtype(dtype)
                .unwrap();
            let up = pseudo_random(dims, 10 * i as u64 + 1, 2.0)
                .to_dtype(dtype)
                .unwrap();
            let g = pseudo_random(dims, 10 * i as u64 + 2, 1.0)
                .to_dtype(dtype)
                .unwrap();
            let on = |t: &Tensor| t.to_device(&dev).unwrap();
            let fast = forward_and_grads(&swiglu, &on(&gate), &on(&up), &on(&g));
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let reference = forward_and_grads(&swiglu_reference, &f32(&gate), &f32(&up), &f32(&g));
            for (name, (a, e)) in ["y", "dgate", "dup"]
                .iter()
                .zip(fast.iter().zip(&reference))
            {
                assert_eq!(a.dtype(), dtype, "{name} dtype");
                assert_eq!(a.dims(), dims.as_slice(), "{name} shape");
                assert!(
                    a.device().same_device(&dev),
                    "{name} on {:?}",
                    a.device().location()
                );
                assert_close(
                    &cpu(a),
                    e,
                    tol,
                    &format!("swiglu {name} {dtype:?} {dims:?} on {:?}", dev.location()),
                );
            }
        }
    }
}

#[test]
fn swiglu_reference_and_fast_path_match_known_values() {
    // silu(g) = g / (1 + exp(-g)) evaluated in f64, times up.
    let gates = [-6.0f64, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 6.0];
    let ups = [1.0f64, 2.0, -1.0, 3.0, 1.0, -0.5, 1.5, 1.0];
    let expected: Vec<f64> = gates
        .iter()
        .zip(&ups)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    // Spot check of the formula itself: silu(1) = 1 / (1 + e^-1) = 0.7310585786300049.
    assert!((expected[5] - 0.7310585786300049 * -0.5).abs() < 1e-15);
    let dev = &Device::Cpu;
    let (gate, up) = (
        Tensor::new(&gates, dev).unwrap(),
        Tensor::new(&ups, dev).unwrap(),
    );
    let e = Tensor::new(expected.as_slice(), dev).unwrap();
    let tight = Tolerance {
        rtol: 1e-12,
        atol: 1e-14,
    };
    assert_close(
        &swiglu_reference(&gate, &up).unwrap(),
        &e,
        tight,
        "swiglu_reference f64",
    );
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let f32_tol = Tolerance {
        rtol: 1e-6,
        atol: 1e-7,
    };
    assert_close(
        &swiglu_reference(&f32(&gate), &f32(&up)).unwrap(),
        &f32(&e),
        f32_tol,
        "swiglu_reference f32",
    );
    for dev in test_devices() {
        let on = |t: &Tensor| f32(t).to_device(&dev).unwrap();
        assert_close(
            &cpu(&swiglu(&on(&gate), &on(&up)).unwrap()),
            &f32(&e),
            f32_tol,
            &format!("swiglu f32 on {:?}", dev.location()),
        );
    }
}

#[test]
fn swiglu_reference_gradients_match_finite_differences() {
    let gate = pseudo_random(&[3, 5], 1, 4.0);
    let up = pseudo_random(&[3, 5], 2, 2.0);
    let g = pseudo_random(&[3, 5], 3, 1.0);
    let [_, dgate, dup] = forward_and_grads(&swiglu_reference, &gate, &up, &g);
    let loss = |a: &Tensor, b: &Tensor| -> Result<f64> {
        swiglu_reference(a, b)?
            .mul(&g)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let tol = Tolerance {
        rtol: 1e-6,
        atol: 1e-8,
    };
    let fd_gate = finite_difference_grad(&gate, 1e-5, |a| loss(a, &up)).unwrap();
    let fd_up = finite_difference_grad(&up, 1e-5, |b| loss(&gate, b)).unwrap();
    assert_close(&dgate, &fd_gate, tol, "dgate vs finite differences");
    assert_close(&dup, &fd_up, tol, "dup vs finite differences");
    // The check must be able to fail: a gradient off by 0.1% is rejected.
    assert!(
        closeness(&dgate.affine(1.001, 0.0).unwrap(), &fd_gate, tol)
            .unwrap()
            .0
            > 1.0
    );
}

#[test]
fn swiglu_forward_and_gradients_match_reference_f32() {
    check_fast_against_reference(DType::F32, F32_TOL);
}

#[test]
fn swiglu_forward_and_gradients_match_reference_bf16() {
    check_fast_against_reference(DType::BF16, BF16_TOL);
}

#[test]
fn swiglu_forward_and_gradients_match_reference_f16() {
    check_fast_against_reference(DType::F16, BF16_TOL);
}

#[test]
fn swiglu_saturates_without_nan_at_plus_minus_100_and_beyond() {
    // silu(g) -> g and d silu/dg -> 1 for g -> +inf; both -> 0 for g -> -inf. Naive sigmoids fail
    // here: exp(g) / (1 + exp(g)) is inf / inf = NaN for g > 88 in f32, and candle's gradient of the
    // composed 1 / (1 + exp(-g)) is 0 * exp(-g) = 0 * inf = NaN for g < -88 (both tried).
    let dev = &Device::Cpu;
    for device in test_devices() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // f16 overflows above 65504: keep its inputs to +-100.
            let gates: &[f32] = match dtype {
                DType::F16 => &[-100.0, -90.0, 90.0, 100.0],
                _ => &[-1e30, -1e4, -100.0, -90.0, 90.0, 100.0, 1e4],
            };
            let n = gates.len();
            let gate = Tensor::new(gates, dev).unwrap().to_dtype(dtype).unwrap();
            let up = Tensor::full(2f32, n, dev).unwrap().to_dtype(dtype).unwrap();
            let g = Tensor::ones(n, dtype, dev).unwrap();
            // Expected values from the gates as rounded to `dtype` (1e4 is 9984 in bf16).
            let rounded = gate.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let expect = |f: fn(f32) -> f32| {
                Tensor::new(
                    rounded
                        .iter()
                        .map(|&x| f(x))
                        .collect::<Vec<f32>>()
                        .as_slice(),
                    dev,
                )
                .unwrap()
            };
            let expected_y = expect(|x| if x > 0.0 { 2.0 * x } else { 0.0 });
            let expected_dgate = expect(|x| if x > 0.0 { 2.0 } else { 0.0 });
            let expected_dup = expect(|x| if x > 0.0 { x } else { 0.0 });
            let tol = if dtype == DType::F32 {
                F32_TOL
            } else {
                BF16_TOL
            };
            // The fast path on `device`, the reference on the CPU.
            let on = |t: &Tensor| t.to_device(&device).unwrap();
            let runs = [
                (
                    "swiglu",
                    forward_and_grads(&swiglu, &on(&gate), &on(&up), &on(&g)),
                ),
                (
                    "swiglu_reference",
                    forward_and_grads(&swiglu_reference, &gate, &up, &g),
                ),
            ];
            for (name, [y, dgate, dup]) in runs {
                let (y, dgate, dup) = (cpu(&y), cpu(&dgate), cpu(&dup));
                let name = format!("{name} on {:?}", device.location());
                for (what, a, e) in [
                    ("y", &y, &expected_y),
                    ("dgate", &dgate, &expected_dgate),
                    ("dup", &dup, &expected_dup),
                ] {
                    let values = a.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                    assert!(
                        values.iter().all(|v| v.is_finite()),
                        "{name} {what} {dtype:?}: {values:?}"
                    );
                    assert_close(a, e, tol, &format!("{name} {what} {dtype:?} in the tails"));
                }
            }
        }
    }
}

#[test]
fn swiglu_accepts_strided_inputs() {
    let gate = pseudo_random(&[77, 37], 3, 6.0)
        .to_dtype(DType::F32)
        .unwrap();
    let up = pseudo_random(&[77, 37], 4, 2.0)
        .to_dtype(DType::F32)
        .unwrap();
    let g = pseudo_random(&[37, 77], 5, 1.0)
        .to_dtype(DType::F32)
        .unwrap();
    let via_t = |f: SwiGluFn| move |a: &Tensor, b: &Tensor| f(&a.t()?, &b.t()?);
    let reference = forward_and_grads(&via_t(swiglu_reference), &gate, &up, &g);
    for dev in test_devices() {
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let fast = forward_and_grads(&via_t(swiglu), &on(&gate), &on(&up), &on(&g));
        assert_eq!(fast[1].dims(), [77, 37]);
        assert_eq!(fast[2].dims(), [77, 37]);
        for (name, (a, e)) in ["y", "dgate", "dup"]
            .iter()
            .zip(fast.iter().zip(&reference))
        {
            assert_close(
                &cpu(a),
                e,
                F32_TOL,
                &format!("strided swiglu {name} on {:?}", dev.location()),
            );
        }
    }
}

#[test]
fn swiglu_rejects_mismatched_shapes_and_dtypes() {
    for dev in test_devices() {
        let gate = pseudo_random(&[4, 6], 6, 1.0)
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let up = pseudo_random(&[4, 5], 7, 1.0)
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        for f in [swiglu as SwiGluFn, swiglu_reference] {
            let err = f(&gate, &up).unwrap_err().to_string();
            assert!(
                err.contains("swiglu") && err.contains("[4, 6]") && err.contains("[4, 5]"),
                "{err}"
            );
        }
        let err = swiglu(&gate, &gate.to_dtype(DType::BF16).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("swiglu") && err.contains("dtype") && err.contains("BF16"),
            "{err}"
        );
        // f64 is for the reference only.
        let g64 = gate.to_dtype(DType::F64).unwrap();
        let err = swiglu(&g64, &g64).unwrap_err().to_string();
        assert!(err.contains("swiglu") && err.contains("F64"), "{err}");
    }
}

/// `cargo test --release -p kernels --test swiglu -- --ignored --nocapture`
#[test]
#[ignore]
fn swiglu_speed_vs_reference() {
    let dims = [8 * 512, 5632];
    let gate = pseudo_random(&dims, 5, 4.0).to_dtype(DType::F32).unwrap();
    let up = pseudo_random(&dims, 6, 1.0).to_dtype(DType::F32).unwrap();
    let g = pseudo_random(&dims, 7, 1.0).to_dtype(DType::F32).unwrap();
    for (name, f) in [
        ("fused", swiglu as SwiGluFn),
        ("reference", swiglu_reference as SwiGluFn),
    ] {
        forward_and_grads(&f, &gate, &up, &g); // warm-up
        let iters = 5;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            forward_and_grads(&f, &gate, &up, &g);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            f(&gate, &up).unwrap();
        }
        let fwd_ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        println!("swiglu {name} {dims:?} f32: fwd+bwd {ms:.2} ms/iter (with Var copies and y*g loss), forward only {fwd_ms:.2} ms");
    }
}
