//! Learning-rate schedule: linear warmup from 0, then cosine decay to `min_lr` at `max_steps`
//! (GPT-3's schedule, as nanoGPT's get_lr).

/// Learning rate for optimizer step `step` (1-based).
pub fn learning_rate(step: usize, lr: f64, min_lr: f64, warmup_steps: usize, max_steps: usize) -> f64 {
    if warmup_steps > 0 && step <= warmup_steps {
        return lr * step as f64 / warmup_steps as f64;
    }
    if step >= max_steps || max_steps <= warmup_steps {
        return min_lr;
    }
    let progress = (step - warmup_steps) as f64 / (max_steps - warmup_steps) as f64;
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    min_lr + cosine * (lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::learning_rate;

    #[test]
    fn warmup_is_linear_then_cosine_reaches_min_lr() {
        assert!((learning_rate(5, 1e-3, 1e-4, 10, 110) - 5e-4).abs() < 1e-12);
        assert!((learning_rate(10, 1e-3, 1e-4, 10, 110) - 1e-3).abs() < 1e-12);
        // Halfway through the decay the cosine is at its midpoint.
        assert!((learning_rate(60, 1e-3, 1e-4, 10, 110) - 5.5e-4).abs() < 1e-12);
        assert!((learning_rate(110, 1e-3, 1e-4, 10, 110) - 1e-4).abs() < 1e-12);
        assert!(learning_rate(30, 1e-3, 1e-4, 10, 110) > learning_rate(31, 1e-3, 1e-4, 10, 110));
    }
}
