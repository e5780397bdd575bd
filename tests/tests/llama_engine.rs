//! Llama through the engine against a monolithic reference written here from candle primitives
//! and the kernels' `_reference` ops (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU),
//! tied and untied heads; and Llama at ZeRO stage 3 against stage 0, bitwise.

use std::collections::HashMap;
use std::time::Duration;

use candle_core::{DType, Device, Result, Tensor, Var};
use kernels::testing::{assert_close, Tolerance};
use models::{Llama, LlamaConfig};
use zero_candle::comm::{run_ranks, Comm, LocalComm};
use zero_candle::train::single_rank;
use zero_candle::{Engine, EngineOptions, MicroBatch, ZeroStage};

fn tiny(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 17,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 16,
        tie_word_embeddings: tied,
    }
}

fn batch(rows: usize, t: usize) -> MicroBatch {
    let mut s = 5u64;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) % 17) as u32
    };
    let inputs: Vec<u32> = (0..rows * t).map(|_| next()).collect();
    let targets: Vec<u32> = (0..rows * t).map(|_| next()).collect();
    MicroBatch {
        inputs: Tensor::from_vec(inputs, (rows, t), &Device::Cpu).unwrap(),
        targets: Tensor::from_vec(targets, (rows, t), &Device::Cpu).unwrap(),
    }
}

fn reference_loss(c: &LlamaConfig, p: &HashMap<String, Var>, b: &MicroBatch) -> Tensor {
    let get = |n: &str| p.get(n).unwrap_or_else(|| panic!("missing {n}")).as_tensor().clone();
    let (bs, t) = b.inputs.dims2().unwrap();
    let (h, nh, nkv) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads);
    let hd = h / nh;
    let lin = |x: &Tensor, w: &str| {
        let w = get(w);
        x.reshape((bs * t, x.dim(2).unwrap())).unwrap().matmul(&w.t().unwrap()).unwrap().reshape((bs, t, w.dim(0).unwrap())).unwrap()
    };
    let heads = |x: Tensor, n: usize| x.reshape((bs, t, n, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    let (cos, sin) = kernels::rope_tables(t, hd, c.rope_theta, DType::F32, &Device::Cpu).unwrap();
    // Grouped-query attention spelled out: kv head j serves query heads j*rep .. (j+1)*rep.
    let repeat = |x: Tensor| {
        let rep = nh / nkv;
        let parts: Vec<Tensor> = (0..nh).map(|i| x.narrow(1, i / rep, 1).unwrap()).collect();
        Tensor::cat(&parts, 1).unwrap()
    };
    let mut x = get("model.embed_tokens.weight").index_select(&b.inputs.flatten_all().unwrap(), 0).unwrap().reshape((bs, t, h)).unwrap();
    for l in 0..c.num_hidden_layers {
        let pre = format!("model.layers.{l}");
        let n = kernels::rms_norm_reference(&x, &get(&format!("{pre}.input_layernorm.weight")), c.rms_norm_eps).unwrap();
        let q = kernels::rope_reference(&heads(lin(&n, &format!("{pre}.self_attn.q_proj.weight")), nh), &cos, &sin).unwrap();
        let k = kernels::rope_reference(&heads(lin(&n, &format!("{pre}.self_attn.k_proj.weight")), nkv), &cos, &sin).unwrap();
        let v = heads(lin(&n, &format!("{pre}.self_attn.v_proj.weight")), nkv);
        let y = kernels::causal_attention_reference(&q, &repeat(k), &repeat(v)).unwrap();
        let y = y.transpose(1, 2).unwrap().contiguous().unwrap().reshape((bs, t, h)).unwrap();
        x = (x + lin(&y, &format!("{pre}.self_attn.o_proj.weight"))).unwrap();
        let n = kernels::rms_norm_reference(&x, &get(&format!("{pre}.post_attention_layernorm.weight")), c.rms_norm_eps).unwrap();
        let m = kernels::swiglu_reference(&lin(&n, &format!("{pre}.mlp.gate_proj.weight")), &lin(&n, &format!("{pre}.mlp.up_proj.weight"))).unwrap();
        x = (x + lin(&m, &format!("{pre}.mlp.down_proj.weight"))).unwrap();
    }
    let x = kernels::rms_norm_reference(&x, &get("model.norm.weight"), c.rms_norm_eps).unwrap();
    let head = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    let logits = lin(&x, head);
    kernels::cross_entropy_reference(&logits, &b.targets, None).unwrap()
}

#[test]
fn llama_engine_gradients_match_monolithic_reference_tied_and_untied() {
    for tied in [true, false] {
        let cfg = tiny(tied);
        let mut engine = Engine::new(Llama::new(cfg.clone()).unwrap(), single_rank().unwrap(), 11, Device::Cpu, EngineOptions::single()).unwrap();
        let b = batch(3, 9);
        let stats = engine.compute_gradients(std::slice::from_ref(&b)).unwrap();
        let vars: HashMap<String, Var> = engine
            .full_parameters()
            .unwrap()
            .into_iter()
            .map(|(n, shape, v)| (n, Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()))
            .collect();
        assert_eq!(vars.len(), (if tied { 2 } else { 3 }) + 9 * cfg.num_hidden_layers);
        assert_eq!(vars.values().map(|v| v.elem_count()).sum::<usize>(), cfg.num_params());
        let loss = reference_loss(&cfg, &vars, &b);
        let ref_loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((stats.loss - ref_loss).abs() < 1e-5 * ref_loss, "tied {tied}: loss {} vs reference {ref_loss}", stats.loss);
        let grads = loss.backward().unwrap();
        for (name, var) in &vars {
            let expected = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no reference gradient for {name}"));
            let got = Tensor::from_vec(engine.gradient(name).unwrap().1, expected.shape(), &Device::Cpu).unwrap();
            assert_close(&got, expected, Tolerance { rtol: 1e-3, atol: 1e-6 }, &format!("tied {tied}: {name}"));
        }
    }
}

#[test]
fn llama_stage3_matches_stage0_bitwise_at_world2() {
    let run = |stage: u8| -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let b = batch(4, 8);
        let hyper = kernels::AdamWHyper { lr: 1e-2, ..Default::default() };
        let options = EngineOptions { stage: ZeroStage::new(stage).unwrap(), recompute: stage == 3, ..EngineOptions::single() };
        run_ranks(2, Duration::from_secs(30), |comm: LocalComm| -> Result<_> {
            let r = comm.rank();
            let mut e = Engine::new(Llama::new(tiny(true))?, comm, 3, Device::Cpu, options)?;
            let mine = MicroBatch { inputs: b.inputs.narrow(0, 2 * r, 2)?, targets: b.targets.narrow(0, 2 * r, 2)? };
            for _ in 0..2 {
                e.train_step(std::slice::from_ref(&mine), 1e-2, &hyper, 1.0)?;
            }
            e.full_parameters()
        })
        .unwrap()
        .remove(0)
    };
    let (a, b) = (run(0), run(3));
    for ((n, _, x), (_, _, y)) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "{n} differs");
    }
}
