//! Llama (Touvron et al. 2023) as Hugging Face's `LlamaForCausalLM`: pre-RMSNorm blocks, rotary
//! position embeddings (rotate-half layout, configurable theta), grouped-query attention (each
//! key/value head shared by `num_attention_heads / num_key_value_heads` query heads), SwiGLU MLP,
//! no biases, head tied to the embedding or not. Parameter names and layouts are transformers'
//! (`model.layers.0.self_attn.q_proj.weight`, nn.Linear weights [out, in]), so a Hugging Face
//! folder loads without renaming. Every op it trains through is a fused kernel with a gradient.

use candle_core::{bail, DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::block_model::{cached_attention, BlockModel, Carry, Init, KvCache, ParamSpec, UnitSpec};

/// The fields of transformers' LlamaConfig that matter for the math.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.vocab_size == 0 || c.hidden_size == 0 || c.intermediate_size == 0 || c.num_hidden_layers == 0 || c.num_attention_heads == 0 || c.num_key_value_heads == 0 {
            bail!("llama config: every size must be positive, got {c:?}");
        }
        if c.hidden_size % c.num_attention_heads != 0 || c.head_dim() % 2 != 0 {
            bail!("llama config: hidden_size {} / num_attention_heads {} must be an even integer (rotary halves)", c.hidden_size, c.num_attention_heads);
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            bail!("llama config: num_attention_heads {} must be a multiple of num_key_value_heads {}", c.num_attention_heads, c.num_key_value_heads);
        }
        Ok(())
    }

    pub fn num_params(&self) -> usize {
        let (c, i, kv) = (self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim());
        let block = 2 * c + c * c * 2 + 2 * kv * c + 3 * c * i;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * c };
        self.vocab_size * c + c + head + self.num_hidden_layers * block
    }
}

/// Llama as a `BlockModel`.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
}

// Order of a block's parameters.
const INPUT_NORM: usize = 0;
const Q: usize = 1;
const K: usize = 2;
const V: usize = 3;
const O: usize = 4;
const POST_NORM: usize = 5;
const GATE: usize = 6;
const UP: usize = 7;
const DOWN: usize = 8;
// Order of the root's parameters.
const EMBED: usize = 0;
const NORM: usize = 1;
const LM_HEAD: usize = 2;

/// y = x @ w^T for x (B, T, In) and an nn.Linear weight w (Out, In).
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    kernels::linear(x, w, None, kernels::WeightLayout::OutIn)
}

impl Llama {
    pub fn new(config: LlamaConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    fn single<'a>(carry: &'a Carry, what: &str) -> Result<&'a Tensor> {
        match carry.as_slice() {
            [x] => Ok(x),
            _ => bail!("llama {what}: expected a carry of one tensor (B, T, C), got {}", carry.len()),
        }
    }

    fn check_count(what: &str, params: &[Tensor], expected: usize) -> Result<()> {
        if params.len() != expected {
            bail!("llama {what}: expected {expected} parameter tensors, got {}", params.len());
        }
        Ok(())
    }

    fn root_count(&self) -> usize {
        if self.config.tie_word_embeddings {
            2
        } else {
            3
        }
    }

    /// (B, T, n*D) -> (B, n, T, D)
    fn heads(x: &Tensor, n: usize, d: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
    }

    /// One block on x (B, T, C) with rotary tables `cos`, `sin` for its T positions, and
    /// `attend` mapping q (B, H, T, D) and the unrepeated k, v (B, KV, T, D) to the attention
    /// output: the fused causal kernel for training, the KV-cached attention for sampling (one
    /// block body for both, so that the two paths cannot drift apart).
    fn block_with(
        &self,
        index: usize,
        p: &[Tensor],
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        Self::check_count(&format!("block {index}"), p, 9)?;
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let eps = c.rms_norm_eps;

        // Attention: x + o_proj(attn(rope(q), rope(k), v)) on rms_norm(x).
        let h = kernels::rms_norm(x, &p[INPUT_NORM], eps)?;
        let q = kernels::rope(&Self::heads(&linear(&h, &p[Q])?, nh, hd)?, cos, sin)?; // (B, H, T, D)
        let k = kernels::rope(&Self::heads(&linear(&h, &p[K])?, nkv, hd)?, cos, sin)?; // (B, KV, T, D)
        let v = Self::heads(&linear(&h, &p[V])?, nkv, hd)?;
        let y = attend(&q, &k, &v)?; // (B, H, T, D)
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * hd))?;
        let x = (x + linear(&y, &p[O])?)?;

        // MLP: x + down(silu(gate(h)) * up(h)) on rms_norm(x).
        let h = kernels::rms_norm(&x, &p[POST_NORM], eps)?;
        let m = kernels::swiglu(&linear(&h, &p[GATE])?, &linear(&h, &p[UP])?)?;
        x + linear(&m, &p[DOWN])?
    }

    /// Repeat each of the kv heads `rep` times: (B, KV, T, D) -> (B, KV * rep, T, D).
    fn repeat_kv(x: Tensor, rep: usize) -> Result<Tensor> {
        if rep == 1 {
            return Ok(x);
        }
        let (b, kv, t, d) = x.dims4()?;
        x.unsqueeze(2)?.broadcast_as((b, kv, rep, t, d))?.contiguous()?.reshape((b, kv * rep, t, d))
    }
}

impl BlockModel for Llama {
    fn units(&self) -> Vec<UnitSpec> {
        let c = &self.config;
        let (h, i, kv) = (c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim());
        let std = 0.02; // transformers' initializer_range
        let mut root = vec![
            ParamSpec { name: "model.embed_tokens.weight".into(), shape: vec![c.vocab_size, h], init: Init::Normal { std } },
            ParamSpec { name: "model.norm.weight".into(), shape: vec![h], init: Init::Ones },
        ];
        if !c.tie_word_embeddings {
            root.push(ParamSpec { name: "lm_head.weight".into(), shape: vec![c.vocab_size, h], init: Init::Normal { std } });
        }
        let mut units = vec![UnitSpec { name: "root".into(), params: root }];
        for l in 0..c.num_hidden_layers {
            let p = |name: &str, shape: Vec<usize>, init: Init| ParamSpec { name: format!("model.layers.{l}.{name}"), shape, init };
            units.push(UnitSpec {
                name: format!("block.{l}"),
                params: vec![
                    p("input_layernorm.weight", vec![h], Init::Ones),
                    p("self_attn.q_proj.weight", vec![h, h], Init::Normal { std }),
                    p("self_attn.k_proj.weight", vec![kv, h], Init::Normal { std }),
                    p("self_attn.v_proj.weight", vec![kv, h], Init::Normal { std }),
                    p("self_attn.o_proj.weight", vec![h, h], Init::Normal { std }),
                    p("post_attention_layernorm.weight", vec![h], Init::Ones),
                    p("mlp.gate_proj.weight", vec![i, h], Init::Normal { std }),
                    p("mlp.up_proj.weight", vec![i, h], Init::Normal { std }),
                    p("mlp.down_proj.weight", vec![h, i], Init::Normal { std }),
                ],
            });
        }
        units
    }

    fn num_blocks(&self) -> usize {
        self.config.num_hidden_layers
    }

    fn embed(&self, root: &[Tensor], ids: &Tensor) -> Result<Carry> {
        Self::check_count("embed", root, self.root_count())?;
        let (b, t) = ids.dims2()?;
        let x = root[EMBED].index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.config.hidden_size))?;
        Ok(vec![x])
    }

    fn block(&self, index: usize, p: &[Tensor], carry: &Carry) -> Result<Carry> {
        let x = Self::single(carry, "block")?;
        let (cos, sin) = kernels::rope_tables(x.dim(1)?, self.config.head_dim(), self.config.rope_theta, x.dtype(), x.device())?;
        let rep = self.config.num_attention_heads / self.config.num_key_value_heads;
        let y = self.block_with(index, p, x, &cos, &sin, |q, k, v| {
            kernels::causal_attention(q, &Self::repeat_kv(k.clone(), rep)?, &Self::repeat_kv(v.clone(), rep)?)
        })?;
        Ok(vec![y])
    }

    fn logits(&self, root: &[Tensor], carry: &Carry) -> Result<Tensor> {
        Self::check_count("head", root, self.root_count())?;
        let x = kernels::rms_norm(Self::single(carry, "head")?, &root[NORM], self.config.rms_norm_eps)?;
        let head = if self.config.tie_word_embeddings { &root[EMBED] } else { &root[LM_HEAD] };
        linear(&x, head)
    }

    fn head_loss(&self, root: &[Tensor], carry: &Carry, targets: &Tensor, divisor: Option<f64>) -> Result<Tensor> {
        if targets.dtype() != DType::U32 {
            bail!("llama head_loss: targets must be u32, got {:?}", targets.dtype());
        }
        kernels::cross_entropy_reusing_logits(&self.logits(root, carry)?, targets, divisor)
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn forward_cached(&self, params: &[Vec<Tensor>], ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        if params.len() != c.num_hidden_layers + 1 {
            bail!("llama forward_cached: expected {} units' parameters, got {}", c.num_hidden_layers + 1, params.len());
        }
        let t0 = cache.len();
        let x = self.embed(&params[0], ids)?;
        let mut x = Self::single(&x, "forward_cached")?.clone();
        let t = x.dim(1)?;
        // Rotary positions continue after the cached ones: rows t0..t0 + T of the tables.
        let (cos, sin) = kernels::rope_tables(t0 + t, c.head_dim(), c.rope_theta, x.dtype(), x.device())?;
        let (cos, sin) = (cos.narrow(0, t0, t)?, sin.narrow(0, t0, t)?);
        let rep = c.num_attention_heads / c.num_key_value_heads;
        for (i, p) in params[1..].iter().enumerate() {
            x = self.block_with(i, p, &x, &cos, &sin, |q, k, v| {
                // The cache holds the KV heads unrepeated (rep times smaller); repeat per forward.
                let (k, v) = cache.append(i, k, v)?;
                cached_attention(q, &Self::repeat_kv(k, rep)?, &Self::repeat_kv(v, rep)?)
            })?;
        }
        self.logits(&params[0], &vec![x])
    }
}
