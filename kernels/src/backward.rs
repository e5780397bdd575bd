//! Backward passes callable directly, without candle's autograd: what a model's explicit block
//! backward (llm.c style) chains together. Each takes the forward's inputs and the upstream
//! gradient and returns the gradients of every input, computed by the same code as the op's
//! `bwd` (so the explicit and the autograd paths cannot drift apart; tests compare them).

use candle_core::{CustomOp1, CustomOp3, Result, Tensor};

/// dx, d(weight), d(bias) of `layer_norm(x, weight, bias, eps)` for upstream `dy`.
pub fn layer_norm_backward(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let op = crate::layer_norm::LayerNorm { eps: eps as f32 };
    // `bwd` ignores the forward result (its fourth argument).
    let (dx, dw, db) = op.bwd(x, weight, bias, dy, dy)?;
    let missing = || candle_core::Error::Msg("layer_norm backward returned no gradient".into());
    Ok((dx.ok_or_else(missing)?, dw.ok_or_else(missing)?, db.ok_or_else(missing)?))
}

/// dx of `gelu(x)` for upstream `dy`.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    crate::gelu::Gelu.bwd(&x.contiguous()?, dy, dy)?.ok_or_else(|| candle_core::Error::Msg("gelu backward returned no gradient".into()))
}
