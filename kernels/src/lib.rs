//! Fused ops with gradients for training on candle.
//!
//! candle 0.11's fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward (the
//! gradient silently stops), so everything a model trains through lives here instead. Each op has:
//! - `<op>_reference`: the spec, composed from differentiable candle primitives in f32;
//! - `<op>`: the fast path, a candle `CustomOp` with a CPU forward and a `bwd`, parallel over rows
//!   where it pays (llm.c's `train_gpt2.c` is the model for the CPU loops).
//!
//! Tests in `kernels/tests/` compare forward and every gradient with the reference in f32 and bf16
//! at odd sizes, and check each reference once against finite differences.
//!
//! With the `cuda` feature, ops with a `cuda_fwd` (see `cuda`) run on CUDA tensors too: so far `gelu`,
//! `adamw_step_tensors`, `cast_scaled`, `causal_softmax` (so all of `causal_attention`) and `cross_entropy`.
//!
//! Ops: `layer_norm`, `gelu` (tanh), `causal_softmax`, `causal_attention`, `cross_entropy`
//! (GPT-2); `rms_norm`, `rope` (+ `rope_tables`), `swiglu` (Llama); and the `adamw_step` update.

pub mod adamw;
pub mod attention;
pub mod backward;
pub mod cast;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gelu;
pub mod gemm;
pub mod gemm_f32;
pub mod layer_norm;
pub mod linear;
pub mod rms_norm;
pub mod self_attention;
pub mod rope;
pub mod swiglu;
pub mod testing;
mod util;

pub use adamw::{adamw_step, adamw_step_reference, adamw_step_tensors, AdamWHyper};
#[cfg(feature = "cuda")]
pub use adamw::adamw_step_cuda;
pub use attention::{causal_attention, causal_attention_reference, causal_softmax, causal_softmax_reference};
pub use cast::{cast_scaled, cast_scaled_reference};
pub use cross_entropy::{cross_entropy, cross_entropy_reference, cross_entropy_reusing_logits, IGNORE_INDEX};
pub use gelu::{gelu, gelu_reference};
pub use layer_norm::{layer_norm, layer_norm_reference};
pub use linear::{linear, linear_reference, matmul_precision, set_matmul_precision, MatmulPrecision, WeightLayout};
pub use rms_norm::{rms_norm, rms_norm_reference};
pub use self_attention::{causal_self_attention, causal_self_attention_reference};
pub use rope::{rope, rope_reference, rope_tables};
pub use swiglu::{swiglu, swiglu_reference};
