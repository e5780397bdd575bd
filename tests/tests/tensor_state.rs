//! The engine with its state in device tensors (`StateStorage::Tensors`, what a CUDA engine uses)
//! against the host-Vec engine on the CPU, on a tiny GPT-2 with fixed seeds:
//! - on the CPU the tensor path gives the host path's losses and parameters bitwise, for f32, bf16
//!   and f16 compute, f32 and bf16 gradient buffers, stages 0-3 at world 1 and gradient
//!   accumulation (the gradient norm, an f64 sum in another order, within 1e-12);
//! - with clipping active, within f32 tolerance; gradients, evaluation, checkpoint state
//!   (shard_state / set_unit_state) and load_parameters agree;
//! - a tensor-state engine refuses world size > 1 with an error that says why;
//! - on a GPU (built with `cuda`, one present): the same runs on CUDA follow the CPU host path
//!   within the stated tolerances (kernels::testing::test_devices).

use candle_core::{DType, Device, Tensor};
use kernels::AdamWHyper;
use models::{Gpt2, Gpt2Config};
use zero_candle::comm::{Comm, LocalComm};
use zero_candle::engine::StateStorage;
use zero_candle::grad::GradDtype;
use zero_candle::{Engine, EngineOptions, MicroBatch, ZeroStage};

fn tiny() -> Gpt2Config {
    Gpt2Config { vocab_size: 13, context: 8, n_layer: 3, n_head: 2, n_embd: 8, layer_norm_eps: 1e-5 }
}

fn one_rank() -> LocalComm {
    LocalComm::group(1, std::time::Duration::from_secs(30)).pop().unwrap()
}

/// `steps` x `micro` micro-batches of 4 rows x 6 tokens, targets a fixed function of the input.
fn batches(steps: usize, micro: usize, device: &Device) -> Vec<Vec<MicroBatch>> {
    let mut s = 7u64;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) % 13) as u32
    };
    (0..steps)
        .map(|_| {
            (0..micro)
                .map(|_| {
                    let inputs: Vec<u32> = (0..24).map(|_| next()).collect();
                    let targets: Vec<u32> = inputs.iter().map(|&x| (5 * x + 2) % 13).collect();
                    MicroBatch {
                        inputs: Tensor::from_vec(inputs, (4, 6), device).unwrap(),
                        targets: Tensor::from_vec(targets, (4, 6), device).unwrap(),
                    }
                })
                .collect()
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
struct Setup {
    stage: u8,
    micro: usize,
    dtype: DType,
    grad_dtype: GradDtype,
    clip: f64,
}

struct Run {
    losses: Vec<f64>,
    norms: Vec<f64>,
    skipped: Vec<bool>,
    params: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn engine(device: &Device, storage: StateStorage, s: Setup) -> Engine<Gpt2, LocalComm> {
    let options = EngineOptions { stage: ZeroStage::new(s.stage).unwrap(), recompute: s.stage == 3, compute_dtype: s.dtype, grad_dtype: s.grad_dtype };
    Engine::with_storage(Gpt2::new(tiny()).unwrap(), one_rank(), 5, device.clone(), options, storage).unwrap()
}

fn train(device: &Device, storage: StateStorage, s: Setup) -> Run {
    let mut e = engine(device, storage, s);
    assert_eq!(e.storage(), storage);
    let hyper = AdamWHyper { lr: 1e-2, weight_decay: 0.1, beta2: 0.99, ..Default::default() };
    let mut run = Run { losses: vec![], norms: vec![], skipped: vec![], params: vec![] };
    for step in batches(3, s.micro, device) {
        let stats = e.train_step(&step, 1e-2, &hyper, s.clip).unwrap();
        run.losses.push(stats.loss);
        run.norms.push(stats.grad_norm);
        run.skipped.push(stats.skipped);
    }
    run.params = e.full_parameters().unwrap();
    run
}

fn assert_same(a: &Run, b: &Run, what: &str) {
    assert_eq!(a.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "{what}: losses {:?} vs {:?}", a.losses, b.losses);
    assert_eq!(a.skipped, b.skipped, "{what}: skipped steps");
    for (x, y) in a.norms.iter().zip(&b.norms) {
        assert!((x - y).abs() <= 1e-12 * y.abs(), "{what}: grad norm {x} vs {y}");
    }
    assert_eq!(a.params.len(), b.params.len());
    for ((n, sa, x), (m, sb, y)) in a.params.iter().zip(&b.params) {
        assert_eq!((n, sa), (m, sb));
        let diff = x.iter().zip(y).position(|(p, q)| p.to_bits() != q.to_bits());
        assert!(diff.is_none(), "{what}: {n}[{}] is {} vs {}", diff.unwrap(), x[diff.unwrap()], y[diff.unwrap()]);
    }
}

fn assert_near(a: &Run, b: &Run, loss_rtol: f64, norm_rtol: f64, what: &str) {
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!((x - y).abs() <= loss_rtol * y.abs(), "{what}: loss {x} vs {y} ({:?} vs {:?})", a.losses, b.losses);
    }
    for (x, y) in a.norms.iter().zip(&b.norms) {
        assert!((x - y).abs() <= norm_rtol * y.abs(), "{what}: grad norm {x} vs {y}");
    }
}

#[test]
fn tensor_state_on_the_cpu_equals_the_host_path_bitwise() {
    let cpu = Device::Cpu;
    let mut cases = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for stage in [0, 3] {
            cases.push(Setup { stage, micro: 1, dtype, grad_dtype: GradDtype::F32, clip: 0.0 });
        }
        cases.push(Setup { stage: 0, micro: 2, dtype, grad_dtype: GradDtype::Bf16, clip: 0.0 });
    }
    cases.push(Setup { stage: 1, micro: 2, dtype: DType::F32, grad_dtype: GradDtype::F32, clip: 0.0 });
    cases.push(Setup { stage: 2, micro: 2, dtype: DType::BF16, grad_dtype: GradDtype::F32, clip: 0.0 });
    for s in cases {
        let host = train(&cpu, StateStorage::HostVecs, s);
        let tensors = train(&cpu, StateStorage::Tensors, s);
        assert_same(&tensors, &host, &format!("{s:?}"));
        // The runs trained (not comparing two untouched models).
        assert!(host.losses[2] < host.losses[0], "{s:?}: {:?}", host.losses);
    }
}

#[test]
fn tensor_state_with_clipping_follows_the_host_path() {
    // The clip factor comes from the norm, whose f64 sum may round differently in its last bit.
    let s = Setup { stage: 0, micro: 2, dtype: DType::F32, grad_dtype: GradDtype::F32, clip: 0.05 };
    let host = train(&Device::Cpu, StateStorage::HostVecs, s);
    assert!(host.norms.iter().all(|&n| n > 0.05), "clipping is active: {:?}", host.norms);
    let tensors = train(&Device::Cpu, StateStorage::Tensors, s);
    assert_near(&tensors, &host, 1e-6, 1e-6, "clipped");
    for ((n, _, x), (_, _, y)) in tensors.params.iter().zip(&host.params) {
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-5 * q.abs() + 1e-6, "clipped: {n}: {p} vs {q}");
        }
    }
}

#[test]
fn gradients_eval_checkpoint_state_and_loading_agree() {
    let cpu = Device::Cpu;
    let s = Setup { stage: 0, micro: 2, dtype: DType::F32, grad_dtype: GradDtype::Bf16, clip: 1.0 };
    let mut host = engine(&cpu, StateStorage::HostVecs, s);
    let mut tens = engine(&cpu, StateStorage::Tensors, s);
    let data = batches(1, 2, &cpu).remove(0);
    let a = host.compute_gradients(&data).unwrap();
    let b = tens.compute_gradients(&data).unwrap();
    assert_eq!(a.loss.to_bits(), b.loss.to_bits());
    for (name, _, _) in host.full_parameters().unwrap() {
        assert_eq!(host.gradient(&name), tens.gradient(&name), "gradient of {name}");
    }
    assert_eq!(host.eval_loss(&data).unwrap().to_bits(), tens.eval_loss(&data).unwrap().to_bits());

    // Checkpoint state: host values in, the same out; then both engines take a step alike.
    let hyper = AdamWHyper::default();
    let mut stats = (a, b);
    host.apply_update(&mut stats.0, 1e-3, &hyper, 1.0).unwrap();
    tens.apply_update(&mut stats.1, 1e-3, &hyper, 1.0).unwrap();
    for unit in 0..host.units.len() {
        let h: Vec<Vec<f32>> = host.shard_state(unit).unwrap().iter().map(|c| c.to_vec()).collect();
        let t: Vec<Vec<f32>> = tens.shard_state(unit).unwrap().iter().map(|c| c.to_vec()).collect();
        assert_eq!(h, t, "unit {unit} state after one step");
        let scaled: Vec<Vec<f32>> = h.iter().map(|v| v.iter().map(|x| x * 0.5).collect()).collect();
        host.set_unit_state(unit, scaled[0].clone(), scaled[1].clone(), scaled[2].clone()).unwrap();
        tens.set_unit_state(unit, scaled[0].clone(), scaled[1].clone(), scaled[2].clone()).unwrap();
        let back: Vec<Vec<f32>> = tens.shard_state(unit).unwrap().iter().map(|c| c.to_vec()).collect();
        assert_eq!(back, scaled, "unit {unit} restored");
    }
    host.finish_restore(1).unwrap();
    tens.finish_restore(1).unwrap();
    let next = batches(2, 1, &cpu).remove(1);
    let x = host.train_step(&next, 1e-3, &hyper, 1.0).unwrap();
    let y = tens.train_step(&next, 1e-3, &hyper, 1.0).unwrap();
    assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "loss after restore");
    assert_eq!(host.full_parameters().unwrap(), tens.full_parameters().unwrap(), "parameters after restore and a step");

    // Loading weights resets the moments on both.
    let weights = host.full_parameters().unwrap().into_iter().map(|(n, s, v)| (n, (s, v.iter().map(|x| x + 0.25).collect()))).collect();
    host.load_parameters(&weights).unwrap();
    tens.load_parameters(&weights).unwrap();
    assert_eq!(host.full_parameters().unwrap(), tens.full_parameters().unwrap());
    for unit in 0..host.units.len() {
        let t: Vec<Vec<f32>> = tens.shard_state(unit).unwrap().iter().map(|c| c.to_vec()).collect();
        assert!(t[1].iter().chain(&t[2]).all(|&m| m == 0.0), "unit {unit}: moments reset");
    }
    let x = host.train_step(&next, 1e-3, &hyper, 1.0).unwrap();
    let y = tens.train_step(&next, 1e-3, &hyper, 1.0).unwrap();
    assert_eq!(x.loss.to_bits(), y.loss.to_bits(), "loss after loading");
}

#[test]
fn tensor_state_needs_world_size_1() {
    let comms = LocalComm::group(2, std::time::Duration::from_secs(5));
    let comm = comms.into_iter().next().unwrap();
    assert_eq!(comm.world_size(), 2);
    let err = Engine::with_storage(Gpt2::new(tiny()).unwrap(), comm, 1, Device::Cpu, EngineOptions::single(), StateStorage::Tensors)
        .err()
        .expect("world 2 with tensor state must fail")
        .to_string();
    assert!(err.contains("world size 1") && err.contains("NCCL"), "{err}");
    // Engine::new keeps host Vecs on the CPU.
    let e = Engine::new(Gpt2::new(tiny()).unwrap(), one_rank(), 1, Device::Cpu, EngineOptions::single()).unwrap();
    assert_eq!(e.storage(), StateStorage::HostVecs);
}

/// On a GPU (test_devices() lists it when built with `cuda` and one opens): the engine as
/// `Engine::new` builds it there (tensor state) follows the CPU host path.
#[test]
fn cuda_engine_follows_the_cpu_host_path() {
    for device in kernels::testing::test_devices().into_iter().filter(|d| d.is_cuda()) {
        for (dtype, loss_rtol, norm_rtol) in [(DType::F32, 1e-4, 1e-3), (DType::BF16, 2e-2, 5e-2)] {
            for stage in [0, 3] {
                let s = Setup { stage, micro: 2, dtype, grad_dtype: GradDtype::F32, clip: 1.0 };
                let host = train(&Device::Cpu, StateStorage::HostVecs, s);
                assert_eq!(StateStorage::for_device(&device), StateStorage::Tensors);
                let gpu = train(&device, StateStorage::Tensors, s);
                assert_near(&gpu, &host, loss_rtol, norm_rtol, &format!("cuda {s:?}"));
            }
        }
    }
}
