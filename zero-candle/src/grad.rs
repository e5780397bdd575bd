//! Gradient buffers in f32 (default) or bf16 (the ZeRO paper's 2 bytes per gradient).
//!
//! The rule that keeps every stage equal to stage 0 bitwise whatever the buffer dtype: every add
//! into a gradient (a block's contribution, a reduced shard) is done in f32 and rounded to the
//! buffer dtype; collectives read bf16 values as f32 (exactly) and reduce in f32. Stages that
//! build a block's full gradient in a temporary f32 buffer before reduce-scattering it round in
//! the same places (`GradDtype::round`), so they see the same numbers as a bf16 buffer would hold.

use half::bf16;

/// Element type of persistent gradient buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradDtype {
    #[default]
    F32,
    Bf16,
}

impl GradDtype {
    pub fn bytes(self) -> usize {
        match self {
            GradDtype::F32 => 4,
            GradDtype::Bf16 => 2,
        }
    }

    /// The value a buffer of this dtype would store for `v`.
    pub fn round(self, v: f32) -> f32 {
        match self {
            GradDtype::F32 => v,
            GradDtype::Bf16 => bf16::from_f32(v).to_f32(),
        }
    }

    /// `dst[i] = round(dst[i] + src[i])`.
    pub fn add_into(self, dst: &mut [f32], src: &[f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = self.round(*d + s));
    }
}

/// A gradient buffer (a unit's full gradient or this rank's shard of it).
#[derive(Debug, Clone)]
pub enum GradBuf {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl GradBuf {
    pub fn zeros(n: usize, dtype: GradDtype) -> Self {
        match dtype {
            GradDtype::F32 => GradBuf::F32(vec![0.0; n]),
            GradDtype::Bf16 => GradBuf::Bf16(vec![bf16::ZERO; n]),
        }
    }

    /// Store f32 values (rounded to the buffer dtype).
    pub fn from_f32(values: Vec<f32>, dtype: GradDtype) -> Self {
        match dtype {
            GradDtype::F32 => GradBuf::F32(values),
            GradDtype::Bf16 => GradBuf::Bf16(values.into_iter().map(bf16::from_f32).collect()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            GradBuf::F32(v) => v.len(),
            GradBuf::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        match self {
            GradBuf::F32(v) => 4 * v.len(),
            GradBuf::Bf16(v) => 2 * v.len(),
        }
    }

    /// Values of `range` as f32 (exact for bf16): borrowed from an f32 buffer, converted from bf16.
    pub fn to_f32(&self, range: std::ops::Range<usize>) -> std::borrow::Cow<'_, [f32]> {
        match self {
            GradBuf::F32(v) => std::borrow::Cow::Borrowed(&v[range]),
            GradBuf::Bf16(v) => std::borrow::Cow::Owned(v[range].iter().map(|x| x.to_f32()).collect()),
        }
    }

    /// `self[offset + i] = round(self[offset + i] + src[i])`.
    pub fn add_f32(&mut self, offset: usize, src: &[f32]) {
        match self {
            GradBuf::F32(v) => v[offset..offset + src.len()].iter_mut().zip(src).for_each(|(d, s)| *d += s),
            GradBuf::Bf16(v) => v[offset..offset + src.len()].iter_mut().zip(src).for_each(|(d, s)| *d = bf16::from_f32(d.to_f32() + s)),
        }
    }

    /// Sum of squares of `range`, in f64.
    pub fn sum_squares(&self, range: std::ops::Range<usize>) -> f64 {
        match self {
            GradBuf::F32(v) => v[range].iter().map(|&g| (g as f64) * (g as f64)).sum(),
            GradBuf::Bf16(v) => v[range].iter().map(|g| (g.to_f32() as f64).powi(2)).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_buffer_adds_in_f32_and_rounds_like_grad_dtype_round() {
        let mut buf = GradBuf::zeros(3, GradDtype::Bf16);
        let mut shadow = vec![0f32; 3];
        for src in [[1.0f32, 1e-3, 3.1234567], [1e-4, 2.0, -3.0]] {
            buf.add_f32(0, &src);
            GradDtype::Bf16.add_into(&mut shadow, &src);
        }
        assert_eq!(buf.to_f32(0..3).to_vec(), shadow);
        assert_eq!(buf.bytes(), 6);
        assert_ne!(shadow[2], 0.1234567f32, "bf16 rounding happened");
    }
}
