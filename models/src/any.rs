//! One type for "a model this project can load": GPT-2 or Llama, chosen by a Hugging Face
//! config.json's `model_type`, so that sampling, evaluation and export need no per-model code.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::block_model::{BlockModel, BlockTape, Carry, KvCache, UnitSpec};
use crate::gpt2::{Gpt2, Gpt2Config};
use crate::llama::{Llama, LlamaConfig};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type", rename_all = "lowercase")]
pub enum AnyConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl AnyConfig {
    /// Longest sequence the model has positions for.
    pub fn context(&self) -> usize {
        match self {
            AnyConfig::Gpt2(c) => c.context,
            AnyConfig::Llama(c) => c.max_position_embeddings,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            AnyConfig::Gpt2(c) => c.vocab_size,
            AnyConfig::Llama(c) => c.vocab_size,
        }
    }

    pub fn num_params(&self) -> usize {
        match self {
            AnyConfig::Gpt2(c) => c.num_params(),
            AnyConfig::Llama(c) => c.num_params(),
        }
    }

    /// Training FLOPs per token at sequence length `t`: 6 per parameter (GPT-2's position
    /// embeddings excluded) plus 12 * layers * width * t for attention (nanoGPT's estimate_mfu).
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        match self {
            AnyConfig::Gpt2(c) => c.train_flops_per_token(t),
            AnyConfig::Llama(c) => 6.0 * c.num_params() as f64 + 12.0 * (c.num_hidden_layers * c.hidden_size * t) as f64,
        }
    }

    pub fn build(&self) -> Result<AnyModel> {
        Ok(match self {
            AnyConfig::Gpt2(c) => AnyModel::Gpt2(Gpt2::new(c.clone())?),
            AnyConfig::Llama(c) => AnyModel::Llama(Llama::new(c.clone())?),
        })
    }
}

#[derive(Debug, Clone)]
pub enum AnyModel {
    Gpt2(Gpt2),
    Llama(Llama),
}

macro_rules! delegate {
    ($self:ident, $m:ident => $e:expr) => {
        match $self {
            AnyModel::Gpt2($m) => $e,
            AnyModel::Llama($m) => $e,
        }
    };
}

impl BlockModel for AnyModel {
    fn units(&self) -> Vec<UnitSpec> {
        delegate!(self, m => m.units())
    }
    fn num_blocks(&self) -> usize {
        delegate!(self, m => m.num_blocks())
    }
    fn embed(&self, root: &[Tensor], ids: &Tensor) -> Result<Carry> {
        delegate!(self, m => m.embed(root, ids))
    }
    fn block(&self, index: usize, params: &[Tensor], carry: &Carry) -> Result<Carry> {
        delegate!(self, m => m.block(index, params, carry))
    }
    fn logits(&self, root: &[Tensor], carry: &Carry) -> Result<Tensor> {
        delegate!(self, m => m.logits(root, carry))
    }
    fn head_loss(&self, root: &[Tensor], carry: &Carry, targets: &Tensor, divisor: Option<f64>) -> Result<Tensor> {
        delegate!(self, m => m.head_loss(root, carry, targets, divisor))
    }
    fn supports_kv_cache(&self) -> bool {
        delegate!(self, m => m.supports_kv_cache())
    }
    fn supports_explicit_backward(&self, dtype: candle_core::DType, device: &candle_core::Device) -> bool {
        delegate!(self, m => m.supports_explicit_backward(dtype, device))
    }
    fn block_forward_train(&self, index: usize, params: &[Tensor], carry: &Carry) -> Result<(Carry, BlockTape)> {
        delegate!(self, m => m.block_forward_train(index, params, carry))
    }
    fn block_backward(&self, index: usize, params: &[Tensor], tape: BlockTape, upstream: &Carry) -> Result<(Carry, Vec<Tensor>)> {
        delegate!(self, m => m.block_backward(index, params, tape, upstream))
    }
    fn head_loss_train(&self, root: &[Tensor], carry: &Carry, targets: &Tensor, divisor: Option<f64>) -> Result<(Tensor, BlockTape)> {
        delegate!(self, m => m.head_loss_train(root, carry, targets, divisor))
    }
    fn head_backward(&self, root: &[Tensor], tape: BlockTape, dloss: f32) -> Result<(Carry, Vec<Option<Tensor>>)> {
        delegate!(self, m => m.head_backward(root, tape, dloss))
    }
    fn forward_cached(&self, params: &[Vec<Tensor>], ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        delegate!(self, m => m.forward_cached(params, ids, cache))
    }
}
