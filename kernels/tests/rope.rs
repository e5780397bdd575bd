//! Tests for `kernels::rope` (rotate_half layout) and `rope_tables`: the tables and the op against
//! hand-computed numbers and against an explicit construction with transformers' formula, the
//! reference against central finite differences (f64, every input), the fused CustomOp's forward
//! and gradient against the reference in f32, bf16 and f16 at odd sizes (tables longer than T, a
//! size spanning several rayon tasks), the gradient as the inverse rotation, a strided input,
//! argument errors and an ignored timing. The fast-path tests run on every device of
//! `kernels::testing::test_devices()` (the CPU, and CUDA with `--features cuda` on a GPU machine),
//! against the CPU reference; the CUDA op and tables must also equal the CPU's bitwise.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use kernels::testing::{
    assert_close, closeness, finite_difference_grad, test_devices, Tolerance, BF16_TOL, F32_TOL,
};
use kernels::{rope, rope_reference, rope_tables};

type RopeFn = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

const THETA: f64 = 10_000.0;

/// Reproducible uniform values in [-scale, scale) (splitmix64; candle's CPU rng cannot be seeded).
fn pseudo_random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f64> = kernels::testing::uniform_values(n, seed)
        .into_iter()
        .map(|u| scale * u)
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Output and dx of `sum(f(x, cos, sin) * g)` with x as a Var (cos, sin constants).
fn forward_and_grad(
    f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    g: &Tensor,
) -> [Tensor; 2] {
    let xv = Var::from_tensor(x).unwrap();
    let y = f(xv.as_tensor(), cos, sin).unwrap();
    let grads = y.mul(g).unwrap().sum_all().unwrap().backward().unwrap();
    [y, grads.get(&xv).expect("missing gradient").clone()]
}

/// `t` copied to the CPU (for comparisons with the CPU reference).
fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

/// Panics unless `a` (on any device) and `b` (on the CPU) hold the same bits.
fn assert_bitwise_equal(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    let bits = |t: &Tensor| -> Vec<u64> {
        let t = cpu(t).flatten_all().unwrap();
        match t.dtype() {
            DType::F64 => t
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            DType::F32 => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u64)
                .collect(),
            DType::BF16 => t
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u64)
                .collect(),
            DType::F16 => t
                .to_vec1::<half::f16>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits() as u64)
                .collect(),
            other => panic!("{what}: unexpected dtype {other:?}"),
        }
    };
    let (a, b) = (bits(a), bits(b));
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!(
            "{what}: element {i} has bits {:#x}, the CPU's {:#x}",
            a[i], b[i]
        );
    }
}

/// transformers' `apply_rotary_pos_emb`, written out: `q * cos + rotate_half(q) * sin` with
/// `rotate_half(q) = cat(-q2, q1)` and cos/sin of width D made by `cat(freqs, freqs)`.
fn transformers_formula(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let half = d / 2;
    let full = |m: &Tensor| -> Result<Tensor> {
        let m = m.narrow(0, 0, t)?;
        Tensor::cat(&[&m, &m], D::Minus1)?.reshape((1, 1, t, d))
    };
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    let rotate_half = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&full(cos)?)? + rotate_half.broadcast_mul(&full(sin)?)?
}

/// Fast path in `dtype` on every test device against the f32 CPU reference on the same (rounded)
/// inputs, with tables from `rope_tables` in `dtype` (longer than T in some cases: only the first T
/// rows count). Off the CPU, the tables, y and dx must also equal the CPU fast path's bitwise.
fn check_fast_against_reference(dtype: DType, tol: Tolerance) {
    for dev in test_devices() {
        // (B, H, T, D) and the table length; (2, 4, 100, 64) is 800 rows = 4 rayon tasks, the last ragged.
        let cases = [
            ([2, 3, 13, 10], 13),
            ([2, 3, 13, 10], 29),
            ([1, 5, 7, 2], 7),
            ([2, 4, 100, 64], 128),
            ([1, 1, 1, 2], 1),
        ];
        for (i, (dims, table_len)) in cases.iter().enumerate() {
            let x = pseudo_random(dims, 10 * i as u64, 2.0)
                .to_dtype(dtype)
                .unwrap();
            let g = pseudo_random(dims, 10 * i as u64 + 1, 1.0)
                .to_dtype(dtype)
                .unwrap();
            let (cos, sin) = rope_tables(*table_len, dims[3], THETA, dtype, &Device::Cpu).unwrap();
            let (cos_d, sin_d) = rope_tables(*table_len, dims[3], THETA, dtype, &dev).unwrap();
            let on = format!("on {:?}", dev.location());
            assert_bitwise_equal(&cos_d, &cos, &format!("rope_tables cos {dtype:?} {on}"));
            assert_bitwise_equal(&sin_d, &sin, &format!("rope_tables sin {dtype:?} {on}"));
            let to_dev = |t: &Tensor| t.to_device(&dev).unwrap();
            let fast = forward_and_grad(&rope, &to_dev(&x), &cos_d, &sin_d, &to_dev(&g));
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let reference =
                forward_and_grad(&rope_reference, &f32(&x), &f32(&cos), &f32(&sin), &f32(&g));
            let cpu_fast = forward_and_grad(&rope, &x, &cos, &sin, &g);
            for (name, ((a, e), c)) in ["y", "dx"]
                .iter()
                .zip(fast.iter().zip(&reference).zip(&cpu_fast))
            {
                assert_eq!(a.dtype(), dtype, "{name} dtype");
                assert_eq!(a.dims(), dims, "{name} shape");
                assert!(a.device().same_device(&dev), "{name} {on}");
                let what = format!("rope {name} {dtype:?} {dims:?} table {table_len} {on}");
                assert_close(&cpu(a), e, tol, &what);
                assert_bitwise_equal(a, c, &format!("{what} vs the CPU fast path"));
            }
        }
    }
}

#[test]
fn rope_tables_match_hand_computed_angles() {
    // head_dim 4, theta 100: inv_freq = [100^0, 100^(-2/4)] = [1, 0.1]; angle = t * inv_freq.
    let (cos, sin) = rope_tables(3, 4, 100.0, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(cos.dims(), [3, 2]);
    assert_eq!(sin.dims(), [3, 2]);
    let angles = [[0.0f64, 0.0], [1.0, 0.1], [2.0, 0.2]];
    let expected_cos = Tensor::new(&angles.map(|r| r.map(f64::cos)), &Device::Cpu).unwrap();
    let expected_sin = Tensor::new(&angles.map(|r| r.map(f64::sin)), &Device::Cpu).unwrap();
    let tight = Tolerance {
        rtol: 1e-12,
        atol: 1e-14,
    };
    assert_close(&cos, &expected_cos, tight, "rope_tables cos");
    assert_close(&sin, &expected_sin, tight, "rope_tables sin");
    // Other dtypes are the f64 values rounded once.
    let (cos16, _) = rope_tables(3, 4, 100.0, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(cos16.dtype(), DType::BF16);
    assert_close(
        &cos16,
        &expected_cos.to_dtype(DType::F32).unwrap(),
        BF16_TOL,
        "rope_tables bf16",
    );
    // On every device: the same bits, on that device.
    for dev in test_devices() {
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let on = format!("{dtype:?} on {:?}", dev.location());
            let (c, s) = rope_tables(3, 4, 100.0, dtype, &dev).unwrap();
            assert!(
                c.device().same_device(&dev) && s.device().same_device(&dev),
                "{on}"
            );
            let (c_cpu, s_cpu) = rope_tables(3, 4, 100.0, dtype, &Device::Cpu).unwrap();
            assert_bitwise_equal(&c, &c_cpu, &format!("rope_tables cos {on}"));
            assert_bitwise_equal(&s, &s_cpu, &format!("rope_tables sin {on}"));
        }
    }
}

#[test]
fn rope_matches_transformers_rotate_half_formula_on_hand_checkable_case() {
    // D = 4, T = 2. Position 0: angle 0 (identity). Position 1: pair 0 rotated by 90 degrees
    // (cos 0, sin 1), pair 1 by the 3-4-5 angle (cos 0.6, sin 0.8). Pairs are (x[i], x[i + D/2]):
    // (1, 3) -> (1*0 - 3*1, 3*0 + 1*1) = (-3, 1); (2, 4) -> (2*0.6 - 4*0.8, 4*0.6 + 2*0.8) = (-2, 4).
    let x = Tensor::new(&[[[[1f32, 2., 3., 4.], [1., 2., 3., 4.]]]], &Device::Cpu).unwrap();
    let cos = Tensor::new(&[[1f32, 1.], [0., 0.6]], &Device::Cpu).unwrap();
    let sin = Tensor::new(&[[0f32, 0.], [1., 0.8]], &Device::Cpu).unwrap();
    let expected =
        Tensor::new(&[[[[1f32, 2., 3., 4.], [-3., -2., 1., 4.]]]], &Device::Cpu).unwrap();
    assert_close(
        &transformers_formula(&x, &cos, &sin).unwrap(),
        &expected,
        F32_TOL,
        "transformers formula",
    );
    assert_close(
        &rope_reference(&x, &cos, &sin).unwrap(),
        &expected,
        F32_TOL,
        "rope_reference",
    );
    for dev in test_devices() {
        let d = |t: &Tensor| t.to_device(&dev).unwrap();
        assert_close(
            &cpu(&rope(&d(&x), &d(&cos), &d(&sin)).unwrap()),
            &expected,
            F32_TOL,
            &format!("rope on {:?}", dev.location()),
        );
    }
    // And at the odd test size with real tables.
    let x = pseudo_random(&[2, 3, 13, 10], 3, 2.0)
        .to_dtype(DType::F32)
        .unwrap();
    let (cos, sin) = rope_tables(13, 10, THETA, DType::F32, &Device::Cpu).unwrap();
    let want = transformers_formula(&x, &cos, &sin).unwrap();
    for dev in test_devices() {
        let d = |t: &Tensor| t.to_device(&dev).unwrap();
        assert_close(
            &cpu(&rope(&d(&x), &d(&cos), &d(&sin)).unwrap()),
            &want,
            F32_TOL,
            &format!(
                "rope vs transformers formula (2,3,13,10) on {:?}",
                dev.location()
            ),
        );
    }
}

#[test]
fn rope_reference_gradients_match_finite_differences() {
    // Every input, cos and sin included (arbitrary values, not a rotation), in f64.
    let x = pseudo_random(&[2, 2, 3, 6], 1, 1.0);
    let cos = pseudo_random(&[3, 3], 2, 1.0);
    let sin = pseudo_random(&[3, 3], 3, 1.0);
    let g = pseudo_random(&[2, 2, 3, 6], 4, 1.0);
    let (xv, cv, sv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&cos).unwrap(),
        Var::from_tensor(&sin).unwrap(),
    );
    let y = rope_reference(xv.as_tensor(), cv.as_tensor(), sv.as_tensor()).unwrap();
    let grads = y.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
    let loss = |x: &Tensor, c: &Tensor, s: &Tensor| -> Result<f64> {
        rope_reference(x, c, s)?
            .mul(&g)?
            .sum_all()?
            .to_scalar::<f64>()
    };
    let tol = Tolerance {
        rtol: 1e-6,
        atol: 1e-8,
    };
    let fd_x = finite_difference_grad(&x, 1e-5, |x| loss(x, &cos, &sin)).unwrap();
    let fd_c = finite_difference_grad(&cos, 1e-5, |c| loss(&x, c, &sin)).unwrap();
    let fd_s = finite_difference_grad(&sin, 1e-5, |s| loss(&x, &cos, s)).unwrap();
    let dx = grads.get(&xv).unwrap();
    assert_close(dx, &fd_x, tol, "dx vs finite differences");
    assert_close(
        grads.get(&cv).unwrap(),
        &fd_c,
        tol,
        "dcos vs finite differences",
    );
    assert_close(
        grads.get(&sv).unwrap(),
        &fd_s,
        tol,
        "dsin vs finite differences",
    );
    // The check must be able to fail: a gradient off by 0.1% is rejected.
    assert!(
        closeness(&dx.affine(1.001, 0.0).unwrap(), &fd_x, tol)
            .unwrap()
            .0
            > 1.0
    );
}

#[test]
fn rope_forward_and_gradient_match_reference_f32() {
    check_fast_against_reference(DType::F32, F32_TOL);
}

#[test]
fn rope_forward_and_gradient_match_reference_bf16() {
    check_fast_against_reference(DType::BF16, BF16_TOL);
}

#[test]
fn rope_forward_and_gradient_match_reference_f16() {
    check_fast_against_reference(DType::F16, BF16_TOL);
}

#[test]
fn rope_gradient_is_the_inverse_rotation_and_norms_are_preserved() {
    // With true cos/sin the op is orthogonal: d sum(R x * g)/dx = R^T g, so g = R x gives back x.
    let x_cpu = pseudo_random(&[2, 3, 13, 10], 5, 2.0)
        .to_dtype(DType::F32)
        .unwrap();
    for dev in test_devices() {
        let x = x_cpu.to_device(&dev).unwrap();
        let (cos, sin) = rope_tables(13, 10, THETA, DType::F32, &dev).unwrap();
        let y = rope(&x, &cos, &sin).unwrap();
        let [_, dx] = forward_and_grad(&rope, &x, &cos, &sin, &y);
        let on = format!("on {:?}", dev.location());
        assert_close(&cpu(&dx), &x_cpu, F32_TOL, &format!("R^T R x {on}"));
        let pair_norms = |t: &Tensor| {
            let t = cpu(t);
            let (a, b) = (t.narrow(3, 0, 5).unwrap(), t.narrow(3, 5, 5).unwrap());
            (a.sqr().unwrap() + b.sqr().unwrap()).unwrap()
        };
        assert_close(
            &pair_norms(&y),
            &pair_norms(&x),
            F32_TOL,
            &format!("pair norms {on}"),
        );
    }
}

#[test]
fn rope_gives_no_gradient_to_the_tables() {
    for dev in test_devices() {
        let x = pseudo_random(&[1, 2, 3, 4], 6, 1.0)
            .to_dtype(DType::F32)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        let (cos, sin) = rope_tables(3, 4, THETA, DType::F32, &dev).unwrap();
        let (xv, cv, sv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&cos).unwrap(),
            Var::from_tensor(&sin).unwrap(),
        );
        let grads = rope(xv.as_tensor(), cv.as_tensor(), sv.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&xv).is_some());
        assert!(grads.get(&cv).is_none() && grads.get(&sv).is_none());
    }
}

#[test]
fn rope_accepts_strided_input() {
    // Llama's q: (B, T, H, D) from the projection, transposed to (B, H, T, D) (a strided view).
    let x = pseudo_random(&[2, 13, 3, 10], 7, 2.0)
        .to_dtype(DType::F32)
        .unwrap();
    let g = pseudo_random(&[2, 3, 13, 10], 8, 1.0)
        .to_dtype(DType::F32)
        .unwrap();
    let (cos, sin) = rope_tables(13, 10, THETA, DType::F32, &Device::Cpu).unwrap();
    let via_t = |f: RopeFn| move |x: &Tensor, c: &Tensor, s: &Tensor| f(&x.transpose(1, 2)?, c, s);
    let reference = forward_and_grad(&via_t(rope_reference), &x, &cos, &sin, &g);
    for dev in test_devices() {
        let d = |t: &Tensor| t.to_device(&dev).unwrap();
        let fast = forward_and_grad(&via_t(rope), &d(&x), &d(&cos), &d(&sin), &d(&g));
        assert_eq!(fast[1].dims(), [2, 13, 3, 10]);
        let on = format!("on {:?}", dev.location());
        assert_close(
            &cpu(&fast[0]),
            &reference[0],
            F32_TOL,
            &format!("strided rope y {on}"),
        );
        assert_close(
            &cpu(&fast[1]),
            &reference[1],
            F32_TOL,
            &format!("strided rope dx {on}"),
        );
    }
}

#[test]
fn rope_rejects_odd_head_dim_short_tables_and_mismatches() {
    for device in test_devices() {
        let dev = &device;
        let f32 = |dims: &[usize]| Tensor::zeros(dims, DType::F32, dev).unwrap();
        let check = |x: &Tensor, c: &Tensor, s: &Tensor, needles: &[&str]| {
            for f in [rope as RopeFn, rope_reference] {
                let err = f(x, c, s).unwrap_err().to_string();
                assert!(
                    err.contains("rope") && needles.iter().all(|n| err.contains(n)),
                    "{err}"
                );
            }
        };
        // Odd D.
        check(
            &f32(&[1, 1, 2, 5]),
            &f32(&[2, 2]),
            &f32(&[2, 2]),
            &["even", "5"],
        );
        // Tables shorter than T.
        check(
            &f32(&[1, 2, 4, 6]),
            &f32(&[3, 3]),
            &f32(&[3, 3]),
            &["cos", "3 positions", "T = 4"],
        );
        check(
            &f32(&[1, 2, 4, 6]),
            &f32(&[4, 3]),
            &f32(&[3, 3]),
            &["sin", "3 positions", "T = 4"],
        );
        // Wrong table width, wrong rank.
        check(
            &f32(&[1, 2, 4, 6]),
            &f32(&[4, 6]),
            &f32(&[4, 6]),
            &["width 6", "D/2 = 3"],
        );
        check(
            &f32(&[2, 4, 6]),
            &f32(&[4, 3]),
            &f32(&[4, 3]),
            &["(B, H, T, D)", "[2, 4, 6]"],
        );
        check(
            &f32(&[1, 2, 4, 6]),
            &f32(&[12]),
            &f32(&[4, 3]),
            &["cos", "(T, D/2)", "[12]"],
        );
        // dtype mismatch between x and the tables.
        let bf = Tensor::zeros((4, 3), DType::BF16, dev).unwrap();
        check(&f32(&[1, 2, 4, 6]), &bf, &bf, &["dtype", "BF16"]);
        // f64 is for the reference only.
        let x64 = Tensor::zeros((1, 1, 2, 4), DType::F64, dev).unwrap();
        let (c64, s64) = rope_tables(2, 4, THETA, DType::F64, dev).unwrap();
        let err = rope(&x64, &c64, &s64).unwrap_err().to_string();
        assert!(err.contains("rope") && err.contains("F64"), "{err}");
        // rope_tables arguments.
        let err = rope_tables(4, 7, THETA, DType::F32, dev)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rope_tables") && err.contains("even") && err.contains('7'),
            "{err}"
        );
        let err = rope_tables(4, 8, 0.0, DType::F32, dev)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rope_tables") && err.contains("theta"),
            "{err}"
        );
        let err = rope_tables(4, 8, THETA, DType::U32, dev)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rope_tables") && err.contains("U32"), "{err}");
    }
}

/// `cargo test --release -p kernels --test rope -- --ignored --nocapture`
#[test]
#[ignore]
fn rope_speed_vs_reference() {
    let dims = [8, 32, 512, 64];
    let x = pseudo_random(&dims, 5, 2.0).to_dtype(DType::F32).unwrap();
    let g = pseudo_random(&dims, 6, 1.0).to_dtype(DType::F32).unwrap();
    let (cos, sin) = rope_tables(512, 64, THETA, DType::F32, &Device::Cpu).unwrap();
    for (name, f) in [
        ("fused", rope as RopeFn),
        ("reference", rope_reference as RopeFn),
    ] {
        forward_and_grad(&f, &x, &cos, &sin, &g); // warm-up
        let iters = 10;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            forward_and_grad(&f, &x, &cos, &sin, &g);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let start = std::time::Instant::now();
        for _ in 0..iters {
            f(&x, &cos, &sin).unwrap();
        }
        let fwd_ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
        println!("rope {name} {dims:?} f32: fwd+bwd {ms:.2} ms/iter (with Var copy and y*g loss), forward only {fwd_ms:.2} ms");
    }
}
