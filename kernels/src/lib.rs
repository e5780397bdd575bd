//! Fused ops with gradients for training on candle.
//!
//! candle 0.11's fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward (the
//! gradient silently stops), so everything a model trains through lives here instead. Each op has:
//! - `<op>_reference`: the spec, composed from differentiable candle primitives in f32;
//! - `<op>`: the fast path, a candle `CustomOp` with a CPU forward and a `bwd`, parallel over rows
//!   where it pays (llm.c's `train_gpt2.c` is the model for the CPU loops).
//! Tests in `kernels/tests/` compare forward and every gradient with the reference in f32 and bf16
//! at odd sizes, and check each reference once against finite differences.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod gelu;
pub mod layer_norm;
pub mod testing;
mod util;

pub use adamw::{adamw_step, adamw_step_reference, AdamWHyper};
pub use attention::{causal_attention, causal_attention_reference, causal_softmax, causal_softmax_reference};
pub use cross_entropy::{cross_entropy, cross_entropy_reference, IGNORE_INDEX};
pub use gelu::{gelu, gelu_reference};
pub use layer_norm::{layer_norm, layer_norm_reference};
