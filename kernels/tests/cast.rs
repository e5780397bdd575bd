//! Tests for `kernels::cast_scaled`: every pair of f32, bf16 and f16 on every device of
//! `kernels::testing::test_devices()` (the CPU, and CUDA with `--features cuda` on a GPU machine)
//! equals `cast_scaled_reference` on the CPU bitwise; its gradient; unsupported dtypes.

use candle_core::{DType, Device, Tensor, Var};
use kernels::testing::{test_devices, uniform_values};
use kernels::{cast_scaled, cast_scaled_reference};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn values(n: usize, seed: u64, scale: f64) -> Tensor {
    let v: Vec<f32> = uniform_values(n, seed).into_iter().map(|u| (scale * u) as f32).collect();
    Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    // -0.0 and 0.0 both stand for zero (the reference adds 0.0 after the multiply).
    v.into_iter().map(|x| if x == 0.0 { 0 } else { x.to_bits() }).collect()
}

#[test]
fn cast_scaled_matches_reference_bitwise_for_every_dtype_pair() {
    for dev in test_devices() {
        for (i, &src) in DTYPES.iter().enumerate() {
            for &dst in &DTYPES {
                // Loss-scale-like factors, a plain cast and an odd factor; values spanning 1e-3..1e3.
                for scale in [1.0f32 / 1024.0, 1.0, 3.7, 65536.0] {
                    let x = (values(70_007, i as u64, 1.0) * values(70_007, 10 + i as u64, 1e3))
                        .unwrap()
                        .reshape((7, 10_001))
                        .unwrap()
                        .to_dtype(src)
                        .unwrap();
                    let y = cast_scaled(&x.to_device(&dev).unwrap(), dst, scale).unwrap();
                    assert_eq!(y.dtype(), dst);
                    assert_eq!(y.dims(), x.dims());
                    let expected = cast_scaled_reference(&x, dst, scale).unwrap();
                    let (a, e) = (bits(&y), bits(&expected));
                    if let Some(k) = (0..a.len()).find(|&k| a[k] != e[k]) {
                        panic!(
                            "cast_scaled {src:?} -> {dst:?} x{scale} on {:?}: element {k} is {}, expected {}",
                            dev.location(),
                            f32::from_bits(a[k]),
                            f32::from_bits(e[k])
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn cast_scaled_strided_input_and_gradient() {
    for dev in test_devices() {
        let x = values(12, 3, 2.0).reshape((3, 4)).unwrap().to_device(&dev).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = cast_scaled(&xv.as_tensor().t().unwrap(), DType::BF16, 0.5).unwrap();
        let expected = cast_scaled_reference(&x.t().unwrap(), DType::BF16, 0.5).unwrap();
        assert_eq!(bits(&y), bits(&expected));
        let g = values(12, 4, 1.0).reshape((4, 3)).unwrap().to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let grads = y.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&xv).expect("no gradient").clone();
        assert_eq!(dx.dtype(), DType::F32);
        let expected_dx = g.t().unwrap().to_dtype(DType::F32).unwrap().affine(0.5, 0.0).unwrap();
        assert_eq!(bits(&dx), bits(&expected_dx));
    }
}

#[test]
fn cast_scaled_rejects_unsupported_dtypes() {
    for dev in test_devices() {
        let x = values(4, 5, 1.0).to_device(&dev).unwrap();
        let err = cast_scaled(&x, DType::F64, 2.0).unwrap_err().to_string();
        assert!(err.contains("cast_scaled") && err.contains("F64"), "{err}");
        let err = cast_scaled(&x.to_dtype(DType::F64).unwrap(), DType::F32, 2.0).unwrap_err().to_string();
        assert!(err.contains("cast_scaled") && err.contains("F64"), "{err}");
    }
}
