//! zero-candle as a library, top-down: prepare the bundled Shakespeare, build a small GPT-2,
//! train it with the engine for a few hundred steps, and greedy-decode a line.
//!
//! cargo run --release -p examples --bin tiny_gpt -- [steps]

use candle_core::{Device, Tensor};
use datasets::{Split, TokenDataset, TokenizerSpec};
use kernels::AdamWHyper;
use models::{Gpt2, Gpt2Config};
use zero_candle::schedule::learning_rate;
use zero_candle::{Engine, EngineOptions, MicroBatch};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let steps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let (batch, seq_len, lr) = (16, 64, 3e-3);
    zero_candle::cpu::init_compute_threads(0); // all cores, denormals flushed

    // Data: tokenize the bundled plays into a scratch folder.
    let data_dir = std::env::temp_dir().join("zero-candle-example-data");
    datasets::prepare(&["data/shakespeare".into()], &data_dir, TokenizerSpec::Char, 0.1)?;
    let data = TokenDataset::open(&data_dir)?;
    let mut loader = data.loader(Split::Train, batch, seq_len, 1)?;

    // Model: 2 blocks of width 128 (0.4M parameters).
    let config = Gpt2Config { vocab_size: data.vocab_size(), context: seq_len, n_layer: 2, n_head: 4, n_embd: 128, layer_norm_eps: 1e-5 };
    let mut engine = Engine::new(Gpt2::new(config)?, zero_candle::train::single_rank()?, 1, Device::Cpu, EngineOptions::single())?;
    let hyper = AdamWHyper { lr: lr as f32, beta2: 0.99, weight_decay: 0.1, ..Default::default() };

    for step in 1..=steps {
        let b = loader.next_batch();
        let micro = MicroBatch {
            inputs: Tensor::from_vec(b.inputs, (batch, seq_len), &Device::Cpu)?,
            targets: Tensor::from_vec(b.targets, (batch, seq_len), &Device::Cpu)?,
        };
        let stats = engine.train_step(&[micro], learning_rate(step, lr, lr / 10.0, 20, steps), &hyper, 1.0)?;
        if step % 50 == 0 || step == 1 {
            println!("step {step:4} | loss {:.3} | grad norm {:.2}", stats.loss, stats.grad_norm);
        }
    }

    // Greedy decoding of one line.
    let prompt = data.tokenizer().encode("ROMEO:\n")?;
    let out = zero_candle::sample::generate(&mut engine, &prompt, 60, seq_len, 0.0, 0, 1.0, 0)?;
    println!("ROMEO:\n{}", data.tokenizer().decode(&out)?);
    Ok(())
}
