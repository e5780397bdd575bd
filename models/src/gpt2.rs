//! GPT-2 (Radford et al. 2019), as nanoGPT's model.py: pre-LayerNorm blocks, learned positions,
//! GELU-tanh MLP of width 4C, lm_head tied to the token embedding. Parameter names and layouts are
//! exactly those of Hugging Face's `GPT2LMHeadModel` (Conv1D weights stored as [in, out]), so that
//! an export is a plain rename-free copy.

use candle_core::{bail, DType, Result, Tensor, D};
use kernels::WeightLayout;
use serde::{Deserialize, Serialize};

use crate::block_model::{cached_attention, BlockModel, BlockTape, Carry, Init, KvCache, ParamSpec, UnitSpec};

/// GPT-2 hyper-parameters (the fields of Hugging Face's GPT2Config that matter for the math).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Maximum context length (n_positions).
    pub context: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub layer_norm_eps: f64,
}

/// Presets: (name, n_layer, n_head, n_embd, context).
pub const GPT2_PRESETS: &[(&str, usize, usize, usize, usize)] = &[
    ("char-small", 6, 6, 384, 256),
    ("gpt2-mini", 4, 4, 256, 256),
    ("gpt2-124m", 12, 12, 768, 1024),
];

impl Gpt2Config {
    /// A preset by name, for a given vocabulary size (taken from the tokenizer).
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        match GPT2_PRESETS.iter().find(|p| p.0 == name) {
            Some(&(_, n_layer, n_head, n_embd, context)) => {
                Ok(Self { vocab_size, context, n_layer, n_head, n_embd, layer_norm_eps: 1e-5 })
            }
            None => {
                let names: Vec<&str> = GPT2_PRESETS.iter().map(|p| p.0).collect();
                bail!("unknown model preset {name:?}; choose one of {names:?}")
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 || self.context == 0 || self.vocab_size == 0 {
            bail!("gpt2 config: every size must be positive, got {self:?}");
        }
        if self.n_embd % self.n_head != 0 {
            bail!("gpt2 config: n_embd {} must be a multiple of n_head {}", self.n_embd, self.n_head);
        }
        Ok(())
    }

    /// Parameters (the tied head counted once).
    pub fn num_params(&self) -> usize {
        let c = self.n_embd;
        let block = 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c);
        self.vocab_size * c + self.context * c + self.n_layer * block + 2 * c
    }

    /// Training FLOPs (forward + backward) per token at sequence length `t`, as nanoGPT's
    /// estimate_mfu and PaLM's appendix B: 6 per parameter (position embeddings excluded; the tied
    /// head counted once, as its matmul) plus 12 * n_layer * n_embd * t for attention.
    pub fn train_flops_per_token(&self, t: usize) -> f64 {
        let n = (self.num_params() - self.context * self.n_embd) as f64;
        6.0 * n + 12.0 * (self.n_layer * self.n_embd * t) as f64
    }
}

/// GPT-2 as a `BlockModel`.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    pub config: Gpt2Config,
}

// Indices into a block's parameter list (the order of `block_params`).
const LN1_W: usize = 0;
const LN1_B: usize = 1;
const ATTN_W: usize = 2;
const ATTN_B: usize = 3;
const ATTN_PROJ_W: usize = 4;
const ATTN_PROJ_B: usize = 5;
const LN2_W: usize = 6;
const LN2_B: usize = 7;
const FC_W: usize = 8;
const FC_B: usize = 9;
const FC_PROJ_W: usize = 10;
const FC_PROJ_B: usize = 11;
// Indices into the root's parameter list.
const WTE: usize = 0;
const WPE: usize = 1;
const LNF_W: usize = 2;
const LNF_B: usize = 3;

impl Gpt2 {
    pub fn new(config: Gpt2Config) -> Result<Self> {
        config.validate()?;
        Ok(Self { config })
    }

    fn block_params(&self, i: usize) -> Vec<ParamSpec> {
        let c = self.config.n_embd;
        let std = 0.02;
        // GPT-2 scales the init of residual projections by 1/sqrt(2 * n_layer).
        let proj_std = 0.02 / (2.0 * self.config.n_layer as f64).sqrt();
        let p = |name: &str, shape: Vec<usize>, init: Init| ParamSpec { name: format!("transformer.h.{i}.{name}"), shape, init };
        vec![
            p("ln_1.weight", vec![c], Init::Ones),
            p("ln_1.bias", vec![c], Init::Zeros),
            p("attn.c_attn.weight", vec![c, 3 * c], Init::Normal { std }),
            p("attn.c_attn.bias", vec![3 * c], Init::Zeros),
            p("attn.c_proj.weight", vec![c, c], Init::Normal { std: proj_std }),
            p("attn.c_proj.bias", vec![c], Init::Zeros),
            p("ln_2.weight", vec![c], Init::Ones),
            p("ln_2.bias", vec![c], Init::Zeros),
            p("mlp.c_fc.weight", vec![c, 4 * c], Init::Normal { std }),
            p("mlp.c_fc.bias", vec![4 * c], Init::Zeros),
            p("mlp.c_proj.weight", vec![4 * c, c], Init::Normal { std: proj_std }),
            p("mlp.c_proj.bias", vec![c], Init::Zeros),
        ]
    }

    fn check_count(what: &str, params: &[Tensor], expected: usize) -> Result<()> {
        if params.len() != expected {
            bail!("gpt2 {what}: expected {expected} parameter tensors, got {}", params.len());
        }
        Ok(())
    }

    fn single<'a>(carry: &'a Carry, what: &str) -> Result<&'a Tensor> {
        match carry.as_slice() {
            [x] => Ok(x),
            _ => bail!("gpt2 {what}: expected a carry of one tensor (B, T, C), got {}", carry.len()),
        }
    }

    fn final_hidden(&self, root: &[Tensor], carry: &Carry) -> Result<Tensor> {
        Self::check_count("head", root, 4)?;
        let x = Self::single(carry, "head")?;
        kernels::layer_norm(x, &root[LNF_W], &root[LNF_B], self.config.layer_norm_eps)
    }

    /// Token plus position embeddings of `ids` (B, T) at positions `t0..t0 + T`.
    fn embed_at(&self, root: &[Tensor], ids: &Tensor, t0: usize) -> Result<Tensor> {
        Self::check_count("embed", root, 4)?;
        let (b, t) = ids.dims2()?;
        if t0 + t > self.config.context {
            bail!("gpt2 embed: sequence length {t} from position {t0} exceeds the model context {}", self.config.context);
        }
        let c = self.config.n_embd;
        let tok = root[WTE].index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c))?; // (B, T, C)
        let pos = root[WPE].narrow(0, t0, t)?; // (T, C)
        tok.broadcast_add(&pos)
    }

    /// One block on x (B, T, C), with `attend` mapping the fused projection qkv (B, T, 3C) to the
    /// merged heads (B, T, C): the fused causal kernel for training, the KV-cached attention for
    /// sampling (one block body for both, so that the two paths cannot drift apart).
    fn block_with(&self, index: usize, p: &[Tensor], x: &Tensor, attend: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        Self::check_count(&format!("block {index}"), p, 12)?;
        let eps = self.config.layer_norm_eps;

        // Attention: x + c_proj(attn(ln_1(x)))
        let h = kernels::layer_norm(x, &p[LN1_W], &p[LN1_B], eps)?;
        let qkv = conv1d(&h, &p[ATTN_W], &p[ATTN_B])?; // (B, T, 3C)
        let y = attend(&qkv)?; // (B, T, C)
        let x = (x + conv1d(&y, &p[ATTN_PROJ_W], &p[ATTN_PROJ_B])?)?;

        // MLP: x + c_proj(gelu(c_fc(ln_2(x))))
        let h = kernels::layer_norm(&x, &p[LN2_W], &p[LN2_B], eps)?;
        let h = kernels::gelu(&conv1d(&h, &p[FC_W], &p[FC_B])?)?; // (B, T, 4C)
        x + conv1d(&h, &p[FC_PROJ_W], &p[FC_PROJ_B])?
    }

    fn head_logits(&self, root: &[Tensor], x: &Tensor) -> Result<Tensor> {
        // lm_head is tied to wte (V, C): logits = x @ wte^T.
        kernels::linear(x, &root[WTE], None, WeightLayout::OutIn)
    }
}

/// What the head's explicit backward reads.
struct Gpt2HeadTape {
    x: Tensor,
    normed: Tensor,
    logits: Tensor,
    targets: Tensor,
    divisor: Option<f64>,
}

/// The activations a block's explicit backward reads (llm.c keeps the same set).
struct Gpt2Tape {
    x: Tensor,
    ln1: Tensor,
    attention: kernels::self_attention::AttentionTape,
    att: Tensor,
    x2: Tensor,
    ln2: Tensor,
    fc: Tensor,
    act: Tensor,
}

/// y = x @ w + b for x (B, T, In), w (In, Out) as GPT-2's Conv1D.
fn conv1d(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    kernels::linear(x, w, Some(b), WeightLayout::InOut)
}

impl BlockModel for Gpt2 {
    fn units(&self) -> Vec<UnitSpec> {
        let c = self.config.n_embd;
        let root = UnitSpec {
            name: "root".into(),
            params: vec![
                ParamSpec { name: "transformer.wte.weight".into(), shape: vec![self.config.vocab_size, c], init: Init::Normal { std: 0.02 } },
                ParamSpec { name: "transformer.wpe.weight".into(), shape: vec![self.config.context, c], init: Init::Normal { std: 0.02 } },
                ParamSpec { name: "transformer.ln_f.weight".into(), shape: vec![c], init: Init::Ones },
                ParamSpec { name: "transformer.ln_f.bias".into(), shape: vec![c], init: Init::Zeros },
            ],
        };
        let mut units = vec![root];
        units.extend((0..self.config.n_layer).map(|i| UnitSpec { name: format!("block.{i}"), params: self.block_params(i) }));
        units
    }

    fn num_blocks(&self) -> usize {
        self.config.n_layer
    }

    fn embed(&self, root: &[Tensor], ids: &Tensor) -> Result<Carry> {
        Ok(vec![self.embed_at(root, ids, 0)?])
    }

    fn block(&self, index: usize, p: &[Tensor], carry: &Carry) -> Result<Carry> {
        let x = Self::single(carry, "block")?;
        let n_head = self.config.n_head;
        Ok(vec![self.block_with(index, p, x, |qkv| kernels::causal_self_attention(qkv, n_head))?])
    }

    fn logits(&self, root: &[Tensor], carry: &Carry) -> Result<Tensor> {
        let x = self.final_hidden(root, carry)?;
        self.head_logits(root, &x)
    }

    fn head_loss(&self, root: &[Tensor], carry: &Carry, targets: &Tensor, divisor: Option<f64>) -> Result<Tensor> {
        let logits = self.logits(root, carry)?;
        if targets.dtype() != DType::U32 {
            bail!("gpt2 head_loss: targets must be u32, got {:?}", targets.dtype());
        }
        kernels::cross_entropy_reusing_logits(&logits, targets, divisor)
    }

    fn supports_kv_cache(&self) -> bool {
        true
    }

    fn supports_explicit_backward(&self, dtype: DType, device: &candle_core::Device) -> bool {
        dtype == DType::F32 && device.is_cpu()
    }

    fn block_forward_train(&self, index: usize, p: &[Tensor], carry: &Carry) -> Result<(Carry, BlockTape)> {
        Self::check_count(&format!("block {index}"), p, 12)?;
        let x = Self::single(carry, "block")?.detach();
        let eps = self.config.layer_norm_eps;
        let ln1 = kernels::layer_norm(&x, &p[LN1_W], &p[LN1_B], eps)?;
        let qkv = conv1d(&ln1, &p[ATTN_W], &p[ATTN_B])?;
        let (att, attention) = kernels::self_attention::causal_self_attention_train(&qkv, self.config.n_head)?;
        drop(qkv); // the attention tape holds it
        let x2 = (&x + conv1d(&att, &p[ATTN_PROJ_W], &p[ATTN_PROJ_B])?)?;
        let ln2 = kernels::layer_norm(&x2, &p[LN2_W], &p[LN2_B], eps)?;
        let fc = conv1d(&ln2, &p[FC_W], &p[FC_B])?;
        let act = kernels::gelu(&fc)?;
        let out = (&x2 + conv1d(&act, &p[FC_PROJ_W], &p[FC_PROJ_B])?)?;
        Ok((vec![out], Box::new(Gpt2Tape { x, ln1, attention, att, x2, ln2, fc, act })))
    }

    fn head_loss_train(&self, root: &[Tensor], carry: &Carry, targets: &Tensor, divisor: Option<f64>) -> Result<(Tensor, BlockTape)> {
        Self::check_count("head", root, 4)?;
        if targets.dtype() != DType::U32 {
            bail!("gpt2 head_loss: targets must be u32, got {:?}", targets.dtype());
        }
        let x = Self::single(carry, "head")?.detach();
        let normed = kernels::layer_norm(&x, &root[LNF_W], &root[LNF_B], self.config.layer_norm_eps)?;
        let logits = self.head_logits(root, &normed)?;
        let loss = kernels::cross_entropy(&logits, targets, divisor)?;
        Ok((loss, Box::new(Gpt2HeadTape { x, normed, logits, targets: targets.clone(), divisor })))
    }

    fn head_backward(&self, root: &[Tensor], tape: BlockTape, dloss: f32) -> Result<(Carry, Vec<Option<Tensor>>)> {
        use kernels::backward::layer_norm_backward;
        Self::check_count("head", root, 4)?;
        let Ok(tape) = tape.downcast::<Gpt2HeadTape>() else { bail!("gpt2 head backward: tape from another model") };
        let Gpt2HeadTape { x, normed, logits, targets, divisor } = *tape;
        // The logits are this tape's own: their storage becomes dlogits (no second copy).
        let dlogits = kernels::cross_entropy::cross_entropy_grad_over_logits(&logits, &targets, divisor, dloss)?;
        drop(logits);
        let (dnormed, dwte, _) = kernels::linear::linear_backward(&normed, &root[WTE], false, &dlogits, WeightLayout::OutIn)?;
        drop(dlogits);
        let (dx, dw, db) = layer_norm_backward(&x, &root[LNF_W], &root[LNF_B], self.config.layer_norm_eps, &dnormed)?;
        // Root order: wte, wpe (not used by the head), ln_f weight, ln_f bias.
        Ok((vec![dx], vec![Some(dwte), None, Some(dw), Some(db)]))
    }

    fn block_backward(&self, index: usize, p: &[Tensor], tape: BlockTape, upstream: &Carry) -> Result<(Carry, Vec<Tensor>)> {
        use kernels::backward::{gelu_backward, layer_norm_backward};
        use kernels::linear::linear_backward;
        Self::check_count(&format!("block {index}"), p, 12)?;
        let Ok(tape) = tape.downcast::<Gpt2Tape>() else { bail!("gpt2 block {index} backward: tape from another model") };
        let Gpt2Tape { x, ln1, attention, att, x2, ln2, fc, act } = *tape;
        let dout = Self::single(upstream, "block backward")?;
        let eps = self.config.layer_norm_eps;
        let lin = |input: &Tensor, w: usize, dy: &Tensor| linear_backward(input, &p[w], true, dy, WeightLayout::InOut);
        let missing = || candle_core::Error::Msg(format!("gpt2 block {index}: linear backward gave no bias gradient"));

        // MLP: out = x2 + c_proj(gelu(c_fc(ln_2(x2))))
        let (dact, d_fc_proj_w, d_fc_proj_b) = lin(&act, FC_PROJ_W, dout)?;
        let dfc = gelu_backward(&fc, &dact)?;
        let (dln2, d_fc_w, d_fc_b) = lin(&ln2, FC_W, &dfc)?;
        let (dx2_norm, d_ln2_w, d_ln2_b) = layer_norm_backward(&x2, &p[LN2_W], &p[LN2_B], eps, &dln2)?;
        let dx2 = (dout + dx2_norm)?;
        // Attention: x2 = x + c_proj(attn(ln_1(x)))
        let (datt, d_proj_w, d_proj_b) = lin(&att, ATTN_PROJ_W, &dx2)?;
        let dqkv = kernels::self_attention::causal_self_attention_backward(attention, &datt)?;
        let (dln1, d_attn_w, d_attn_b) = lin(&ln1, ATTN_W, &dqkv)?;
        let (dx_norm, d_ln1_w, d_ln1_b) = layer_norm_backward(&x, &p[LN1_W], &p[LN1_B], eps, &dln1)?;
        let dx = (dx2 + dx_norm)?;
        // In ParamSpec order (LN1_W .. FC_PROJ_B).
        let grads = vec![
            d_ln1_w, d_ln1_b, d_attn_w, d_attn_b.ok_or_else(missing)?, d_proj_w, d_proj_b.ok_or_else(missing)?,
            d_ln2_w, d_ln2_b, d_fc_w, d_fc_b.ok_or_else(missing)?, d_fc_proj_w, d_fc_proj_b.ok_or_else(missing)?,
        ];
        Ok((vec![dx], grads))
    }

    fn forward_cached(&self, params: &[Vec<Tensor>], ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if params.len() != self.config.n_layer + 1 {
            bail!("gpt2 forward_cached: expected {} units' parameters, got {}", self.config.n_layer + 1, params.len());
        }
        // Learned positions: the new tokens take wpe rows t0.. after the cached ones.
        let mut x = self.embed_at(&params[0], ids, cache.len())?;
        for (i, p) in params[1..].iter().enumerate() {
            x = self.block_with(i, p, &x, |qkv| {
                let (b, t, c3) = qkv.dims3()?;
                let (c, nh) = (c3 / 3, self.config.n_head);
                let heads = |i: usize| -> Result<Tensor> {
                    qkv.narrow(D::Minus1, i * c, c)?.reshape((b, t, nh, c / nh))?.transpose(1, 2)?.contiguous() // (B, H, T, D)
                };
                let (k, v) = cache.append(i, &heads(1)?, &heads(2)?)?;
                let y = cached_attention(&heads(0)?, &k, &v)?; // (B, H, T, D)
                y.transpose(1, 2)?.contiguous()?.reshape((b, t, c))
            })?;
        }
        self.logits(&params[0], &vec![x])
    }
}
