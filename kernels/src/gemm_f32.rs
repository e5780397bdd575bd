//! Exact f32 matrix products with AVX-512 FMAs (the `MatmulPrecision::F32` path on CPUs that have
//! AVX-512F). candle's gemm crate only uses 256-bit FMAs on stable Rust (its AVX-512 kernels need
//! its `nightly` feature): ~180 GFLOP/s on this 2-core VM, about that width's peak.
//!
//! Classic Goto/BLIS structure: for each K block of 256, B is packed into 32-column panels
//! (row p of a panel: 32 values), A into 8-row panels (column p: 8 values); an 8 x 32 micro-tile
//! of C accumulates in 16 zmm registers (8 rows x 2 vectors), each K step one pair of B loads
//! and eight broadcast FMAs per vector. Sums run in K order per element, in f32 (no bf16
//! anywhere): results differ from candle's gemm only by summation order.

use crate::gemm::MatRef;
use rayon::prelude::*;

const MR: usize = 8;
const NR: usize = 32;
const KC: usize = 256;

/// Whether this CPU runs [`matmul_f32`]'s AVX-512 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// C (m x n, row stride ldc) = A B, or += when `accumulate`; parallel over column panels when
/// `parallel`.
///
/// # Safety
/// `c` must be valid for rows 0..m x columns 0..n at stride `ldc` (reads only when
/// `accumulate`), untouched by other threads during the call; [`available`] must be true.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_f32(a: MatRef, b: MatRef, c: *mut f32, ldc: usize, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul_f32: A is {m}x{k} but B is {}x{n}", b.rows);
    assert!(available());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                std::slice::from_raw_parts_mut(c.add(r * ldc), n).fill(0.0);
            }
        }
        return;
    }
    let (col_panels, row_panels) = (n.div_ceil(NR), m.div_ceil(MR));
    let c_addr = c as usize;
    let mut pa = vec![0f32; KC * MR * row_panels];
    let mut pb = vec![0f32; KC * NR * col_panels];
    let threads = if parallel { rayon::current_num_threads().max(1) } else { 1 };
    for k0 in (0..k).step_by(KC) {
        let kb = KC.min(k - k0);
        // Pack A[:, k0..k0+kb] (kb columns of MR per row panel) and B[k0..k0+kb, :] (kb rows of
        // NR per column panel), once per K block, shared by the tasks below.
        let pack_a = |ip: usize, dst: &mut [f32]| {
            let r0 = ip * MR;
            let height = (m - r0).min(MR);
            for p in 0..kb {
                for r in 0..MR {
                    dst[p * MR + r] = if r < height { a.data[(r0 + r) * a.row_stride + (k0 + p) * a.col_stride] } else { 0.0 };
                }
            }
        };
        let pack_b = |jp: usize, dst: &mut [f32]| {
            let c0 = jp * NR;
            let width = (n - c0).min(NR);
            for p in 0..kb {
                let row = &mut dst[p * NR..(p + 1) * NR];
                let src = (k0 + p) * b.row_stride + c0 * b.col_stride;
                if b.col_stride == 1 {
                    row[..width].copy_from_slice(&b.data[src..src + width]);
                    row[width..].fill(0.0);
                } else {
                    for (j, d) in row.iter_mut().enumerate() {
                        *d = if j < width { b.data[src + j * b.col_stride] } else { 0.0 };
                    }
                }
            }
        };
        if threads > 1 {
            pa.par_chunks_mut(KC * MR).enumerate().for_each(|(ip, d)| pack_a(ip, d));
            pb.par_chunks_mut(KC * NR).enumerate().for_each(|(jp, d)| pack_b(jp, d));
        } else {
            pa.chunks_mut(KC * MR).enumerate().for_each(|(ip, d)| pack_a(ip, d));
            pb.chunks_mut(KC * NR).enumerate().for_each(|(jp, d)| pack_b(jp, d));
        }
        let acc = accumulate || k0 > 0;
        let (pa, pb) = (&pa, &pb);
        let run = |cols: std::ops::Range<usize>| {
            // SAFETY: each call writes only C's columns [NR cols.start, NR cols.end).
            unsafe { column_panels(pa, pb, kb, m, n, cols, c_addr as *mut f32, ldc, acc) }
        };
        if threads == 1 || col_panels == 1 {
            run(0..col_panels);
        } else {
            let chunk = col_panels.div_ceil(threads).max(1);
            (0..col_panels).into_par_iter().step_by(chunk).for_each(|p0| run(p0..(p0 + chunk).min(col_panels)));
        }
    }
}

/// C's column panels `cols` (NR wide), all rows, for one packed K block of `kb`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn column_panels(pa: &[f32], pb: &[f32], kb: usize, m: usize, n: usize, cols: std::ops::Range<usize>, c: *mut f32, ldc: usize, accumulate: bool) {
    // Row panels in L2-sized groups, so a group of A stays cached across the column panels.
    let row_panels = m.div_ceil(MR);
    let group = (256 * 1024 / (KC * MR * 4)).max(1);
    for g0 in (0..row_panels).step_by(group) {
        for jp in cols.clone() {
            let c0 = jp * NR;
            let width = (n - c0).min(NR);
            let bp = pb.as_ptr().add(jp * KC * NR);
            for ip in g0..(g0 + group).min(row_panels) {
                let r0 = ip * MR;
                micro_tile(pa.as_ptr().add(ip * KC * MR), bp, kb, c.add(r0 * ldc + c0), ldc, (m - r0).min(MR), width, accumulate);
            }
        }
    }
}

/// C[0..height, 0..width] (+)= Apanel (kb x MR) . Bpanel (kb x NR).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_tile(ap: *const f32, bp: *const f32, kb: usize, c: *mut f32, ldc: usize, height: usize, width: usize, accumulate: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kb {
        let b0 = _mm512_loadu_ps(bp.add(p * NR));
        let b1 = _mm512_loadu_ps(bp.add(p * NR + 16));
        let arow = ap.add(p * MR);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*arow.add(r));
            acc_r[0] = _mm512_fmadd_ps(av, b0, acc_r[0]);
            acc_r[1] = _mm512_fmadd_ps(av, b1, acc_r[1]);
        }
    }
    let masks = [
        if width >= 16 { 0xffffu16 } else { ((1u32 << width) - 1) as u16 },
        if width >= 32 { 0xffffu16 } else if width > 16 { ((1u32 << (width - 16)) - 1) as u16 } else { 0 },
    ];
    for (r, acc_r) in acc.iter().enumerate().take(height) {
        let row = c.add(r * ldc);
        for h in 0..2 {
            if masks[h] == 0 {
                continue;
            }
            let ptr = row.add(16 * h);
            let v = if accumulate { _mm512_add_ps(_mm512_maskz_loadu_ps(masks[h], ptr), acc_r[h]) } else { acc_r[h] };
            _mm512_mask_storeu_ps(ptr, masks[h], v);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn matches_f64() {
        if !available() {
            return;
        }
        for &(m, k, n) in &[(1, 1, 1), (8, 32, 32), (13, 300, 47), (70, 600, 65), (33, 5, 100)] {
            for &(a_t, b_t) in &[(false, false), (false, true), (true, false), (true, true)] {
                for accumulate in [false, true] {
                    let ad: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 31.0).collect();
                    let bd: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0).collect();
                    let a = if a_t { MatRef::new(&ad, k, m).t() } else { MatRef::new(&ad, m, k) };
                    let b = if b_t { MatRef::new(&bd, n, k).t() } else { MatRef::new(&bd, k, n) };
                    let ldc = n + 5;
                    let mut c = vec![0.5f32; m * ldc];
                    unsafe { matmul_f32(a, b, c.as_mut_ptr(), ldc, accumulate, true) };
                    for r in 0..m {
                        for j in 0..n {
                            let mut want = if accumulate { 0.5f64 } else { 0.0 };
                            let mut scale = 0f64;
                            for p in 0..k {
                                let t = ad[if a_t { p * m + r } else { r * k + p }] as f64 * bd[if b_t { j * k + p } else { p * n + j }] as f64;
                                want += t;
                                scale += t.abs();
                            }
                            let got = c[r * ldc + j] as f64;
                            assert!((got - want).abs() <= 1e-5 * (scale + 1.0), "{m}x{k}x{n} ({r},{j}) {got} vs {want}");
                        }
                        for j in n..ldc {
                            assert_eq!(c[r * ldc + j], 0.5);
                        }
                    }
                }
            }
        }
    }
}
