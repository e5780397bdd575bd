//! Dynamic loss scaling for f16 compute, with DeepSpeed's defaults and semantics
//! (deepspeed/runtime/fp16/loss_scaler.py, `DynamicLossScaler`): start at 2^16; on an overflow
//! (a non-finite gradient on any rank) the step is skipped, and once `hysteresis` overflows have
//! been seen the scale is halved (never below `min_scale`); after `window` steps without
//! overflow the scale doubles and the hysteresis budget is restored. bf16 and f32 need no
//! scaling (bf16 has f32's exponent range).

/// Loss-scaler state (serializable, so a checkpoint can carry it).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    pub window: u64,
    pub hysteresis: u32,
    pub min_scale: f64,
    /// Overflows still tolerated before the scale is halved.
    pub hysteresis_left: u32,
    /// Steps (taken or skipped) since the last overflow.
    pub steps_since_overflow: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(65536.0, 1000, 2, 1.0)
    }
}

impl LossScaler {
    pub fn new(scale: f64, window: u64, hysteresis: u32, min_scale: f64) -> Self {
        let hysteresis = hysteresis.max(1);
        Self { scale, window: window.max(1), hysteresis, min_scale, hysteresis_left: hysteresis, steps_since_overflow: 0 }
    }

    /// Record the outcome of a step (`overflow`: some gradient was not finite, agreed by all
    /// ranks); returns whether the optimizer step must be skipped.
    pub fn update(&mut self, overflow: bool) -> bool {
        if overflow {
            if self.hysteresis_left <= 1 {
                self.scale = (self.scale / 2.0).max(self.min_scale);
            } else {
                self.hysteresis_left -= 1;
            }
            self.steps_since_overflow = 0;
            return true;
        }
        self.steps_since_overflow += 1;
        if self.steps_since_overflow % self.window == 0 {
            self.scale *= 2.0;
            self.hysteresis_left = self.hysteresis;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::LossScaler;

    #[test]
    fn overflows_skip_steps_and_halve_after_the_hysteresis() {
        let mut s = LossScaler::default();
        assert_eq!(s.scale, 65536.0);
        assert!(s.update(true)); // first overflow: skipped, hysteresis absorbs it
        assert_eq!(s.scale, 65536.0);
        assert!(s.update(true)); // second: halved
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true)); // budget spent: halved again
        assert_eq!(s.scale, 16384.0);
        assert!(!s.update(false));
    }

    #[test]
    fn a_clean_window_doubles_the_scale_and_restores_hysteresis() {
        let mut s = LossScaler::new(8.0, 3, 2, 1.0);
        s.update(true);
        assert_eq!(s.hysteresis_left, 1);
        for _ in 0..2 {
            assert!(!s.update(false));
        }
        assert_eq!(s.scale, 8.0);
        assert!(!s.update(false));
        assert_eq!((s.scale, s.hysteresis_left), (16.0, 2));
    }

    #[test]
    fn the_scale_never_goes_below_the_minimum() {
        let mut s = LossScaler::new(2.0, 1000, 1, 1.0);
        for _ in 0..5 {
            s.update(true);
        }
        assert_eq!(s.scale, 1.0);
    }
}
