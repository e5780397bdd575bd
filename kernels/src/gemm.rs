//! Matrix products with bf16 inputs and f32 accumulation on Intel AMX (the `--matmul bf16` path).
//!
//! Why: a training step is mostly matrix products, and in f32 a CPU core does at best 32 FMAs per
//! cycle (candle's gemm crate reaches ~175-200 GFLOP/s on this 2-core VM). AMX tiles multiply
//! bf16 pairs with f32 accumulation at up to 16x that rate (a register-only `tdpbf16ps` loop ran
//! at ~3.5 TFLOP/s on one core here; docs/benchmarks.md). Inputs stay f32 in memory; they are rounded to bf16 (round to
//! nearest even) while being packed into tiles, and sums are f32, which is what PyTorch calls
//! `float32_matmul_precision = "medium"` and what bf16 mixed-precision training does on GPUs.
//! Relative error per product is about k^0.5 * 2^-9 of the input magnitudes; tests bound it.
//!
//! Layout (Intel SDM vol. 1 ch. 18, "Intel AMX"): a tile is 16 rows x 64 bytes. C tiles hold
//! 16x16 f32, A tiles 16 rows x 32 bf16 (one K step), B tiles 16 "pair rows" x 16 columns x 2 bf16
//! (VNNI: element (k, n) of the K step sits at row k/2, slot 2n + k%2). Both operands are packed
//! into such tiles up front (zero padded to 32 rows/columns and K to a multiple of 32), then each
//! 32x32 block of C accumulates in four tile registers: per K step 2 A loads, 2 B loads and 4
//! `tdpbf16ps`. Blocks of A rows that fit in L2 are the outer loop so B streams once per block.
//!
//! The instructions are issued with `asm!` (Rust's AMX intrinsics are not stable). Linux asks
//! each process to request the tile data state first (arch_prctl ARCH_REQ_XCOMP_PERM);
//! [`amx_available`] does that once and reports whether the CPU and kernel allow AMX.

use rayon::prelude::*;
use std::sync::OnceLock;

/// A read-only strided view of a row-major matrix: element (r, c) is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "MatRef: {} values for {rows}x{cols}", data.len());
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }
    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride }
    }
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_stride + c * self.col_stride]
    }
}

/// Whether this process can use AMX bf16 (CPU support and, on Linux, the kernel's permission).
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect_and_enable_amx)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect_and_enable_amx() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let leaf7 = __cpuid_count(7, 0);
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return false;
    }
    const SYS_ARCH_PRCTL: isize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only asks the kernel to allow the AMX register
    // state for this process; it reads no memory. rcx and r11 are clobbered by `syscall`.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect_and_enable_amx() -> bool {
    false
}

/// f32 -> bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

const TILE: usize = 512; // bf16 values per A or B tile (16 x 32)

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Run `f(index, panel)` over consecutive `len`-sized panels, on the rayon pool or this thread.
fn for_each_panel(packed: &mut [u16], len: usize, parallel: bool, f: impl Fn(usize, &mut [u16]) + Sync + Send) {
    if parallel {
        packed.par_chunks_mut(len).enumerate().for_each(|(i, p)| f(i, p));
    } else {
        packed.chunks_mut(len).enumerate().for_each(|(i, p)| f(i, p));
    }
}

/// Pack A (m x k) into tiles [m/16][k/32] of 16 rows x 32 bf16. Every element of `packed` is
/// written (padding rows and the K tail with zeros), so the buffer can be reused unzeroed.
fn pack_a(a: &MatRef, packed: &mut [u16], k_tiles: usize, parallel: bool) {
    #[cfg(target_arch = "x86_64")]
    if (a.col_stride == 1 || a.row_stride == 1) && simd::available() {
        // SAFETY: AVX-512 BF16 was detected.
        return for_each_panel(packed, k_tiles * TILE, parallel, |mb, panel| unsafe { simd::pack_a_panel(a, panel, mb, k_tiles) });
    }
    pack_a_scalar(a, packed, k_tiles, parallel)
}

fn pack_a_scalar(a: &MatRef, packed: &mut [u16], k_tiles: usize, parallel: bool) {
    let (m, k) = (a.rows, a.cols);
    for_each_panel(packed, k_tiles * TILE, parallel, |mb, panel| {
        let r0 = mb * 16;
        let height = m.saturating_sub(r0).min(16);
        if a.col_stride == 1 {
            for rr in 0..16 {
                for kb in 0..k_tiles {
                    let dst = &mut panel[kb * TILE + rr * 32..][..32];
                    let valid = if rr < height { k.saturating_sub(kb * 32).min(32) } else { 0 };
                    if valid > 0 {
                        let src = &a.data[(r0 + rr) * a.row_stride + kb * 32..][..valid];
                        for (d, &x) in dst.iter_mut().zip(src) {
                            *d = bf16_bits(x);
                        }
                    }
                    dst[valid..].fill(0);
                }
            }
        } else if a.row_stride == 1 {
            // Columns of A are contiguous (A is a transposed view): take two K rows of the
            // source at a time and write each A row's (p, p+1) pair as one u32.
            let panel32 = as_pairs(panel);
            let zeros = [0f32; 16];
            for pair in 0..k_tiles * 16 {
                let p = 2 * pair;
                let row = |q: usize| if q < k && height > 0 { &a.data[q * a.col_stride + r0..][..height] } else { &zeros[..0] };
                let (x0, x1) = (row(p), row(p + 1));
                let (kb, pp) = (pair / 16, pair % 16);
                for rr in 0..16 {
                    let lo = x0.get(rr).copied().unwrap_or(0.0);
                    let hi = x1.get(rr).copied().unwrap_or(0.0);
                    panel32[kb * 256 + rr * 16 + pp] = bf16_pair(lo, hi);
                }
            }
        } else {
            for rr in 0..16 {
                for p in 0..k_tiles * 32 {
                    let x = if rr < height && p < k { a.at(r0 + rr, p) } else { 0.0 };
                    panel[(p / 32) * TILE + rr * 32 + p % 32] = bf16_bits(x);
                }
            }
        }
    });
}

/// A packed panel seen as u32 VNNI pairs.
fn as_pairs(panel: &mut [u16]) -> &mut [u32] {
    // SAFETY: u16 -> u32 reinterpretation; the buffers come from Vec<u16> allocations, which the
    // global allocator aligns to at least 8 bytes, and panels are multiples of 512 elements.
    let (head, pairs, tail) = unsafe { panel.align_to_mut::<u32>() };
    assert!(head.is_empty() && tail.is_empty(), "packed buffer not 4-byte aligned");
    pairs
}

/// Two f32 as one VNNI pair: `lo` (even K) in the low half, `hi` (odd K) in the high half.
#[inline(always)]
fn bf16_pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// Pack B (k x n) into VNNI tiles [n/16][k/32]: (p, c) goes to pair row (p%32)/2, slot 2(c%16) + p%2.
/// Seen as u32, a tile is 16 pair rows x 16 columns, so both source layouts pack with plain
/// loops over u32 pairs. Every element is written (padding with zeros).
fn pack_b(b: &MatRef, packed: &mut [u16], k_tiles: usize, parallel: bool) {
    #[cfg(target_arch = "x86_64")]
    if (b.col_stride == 1 || b.row_stride == 1) && simd::available() {
        // SAFETY: AVX-512 BF16 was detected.
        return for_each_panel(packed, k_tiles * TILE, parallel, |nb, panel| unsafe { simd::pack_b_panel(b, panel, nb, k_tiles) });
    }
    pack_b_scalar(b, packed, k_tiles, parallel)
}

fn pack_b_scalar(b: &MatRef, packed: &mut [u16], k_tiles: usize, parallel: bool) {
    let (k, n) = (b.rows, b.cols);
    for_each_panel(packed, k_tiles * TILE, parallel, |nb, panel| {
        let panel32 = as_pairs(panel);
        let c0 = nb * 16;
        let width = n.saturating_sub(c0).min(16);
        let pairs = k_tiles * 16;
        let full = k / 2; // pairs with both halves inside K
        if b.row_stride == 1 {
            // Each column of B is contiguous along K (B is a transposed row-major weight).
            for c in 0..16 {
                if c >= width {
                    (0..pairs).for_each(|pp| panel32[pp * 16 + c] = 0);
                    continue;
                }
                let col = &b.data[(c0 + c) * b.col_stride..][..k];
                for (pp, pair) in col[..2 * full].chunks_exact(2).enumerate() {
                    panel32[pp * 16 + c] = bf16_pair(pair[0], pair[1]);
                }
                for pp in full..pairs {
                    let lo = if 2 * pp < k { col[2 * pp] } else { 0.0 };
                    panel32[pp * 16 + c] = bf16_pair(lo, 0.0);
                }
            }
        } else if b.col_stride == 1 {
            let zeros = [0f32; 16];
            for pp in 0..pairs {
                let row = |q: usize| if q < k && width > 0 { &b.data[q * b.row_stride + c0..][..width] } else { &zeros[..width] };
                let (r0, r1) = (row(2 * pp), row(2 * pp + 1));
                let dst = &mut panel32[pp * 16..][..16];
                for ((d, &x0), &x1) in dst.iter_mut().zip(r0).zip(r1) {
                    *d = bf16_pair(x0, x1);
                }
                dst[width..].fill(0);
            }
        } else {
            for pp in 0..pairs {
                for c in 0..16 {
                    let at = |q: usize| if q < k && c < width { b.at(q, c0 + c) } else { 0.0 };
                    panel32[pp * 16 + c] = bf16_pair(at(2 * pp), at(2 * pp + 1));
                }
            }
        }
    });
}

/// AVX-512 packers (every AMX CPU has AVX-512 BF16): `vcvtne2ps2bf16` converts 32 floats at a
/// time (round to nearest even; it treats denormal inputs as zero, which the scalar path does
/// not), masked loads cover ragged edges and scatters write transposed columns. The same layouts
/// as the scalar packers above, which remain for CPUs without AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{MatRef, TILE};
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512bw")
    }

    /// Up to 16 floats from `src` (0 reads nothing; fewer than 16 use a masked load).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(src: *const f32, valid: usize) -> __m512 {
        match valid {
            0 => _mm512_setzero_ps(),
            v if v >= 16 => _mm512_loadu_ps(src),
            v => _mm512_maskz_loadu_ps(((1u32 << v) - 1) as u16, src),
        }
    }

    /// 32 floats (a then b) to 32 bf16 in order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn convert32(a: __m512, b: __m512) -> __m512i {
        std::mem::transmute(_mm512_cvtne2ps_pbh(b, a))
    }

    /// 16 VNNI pairs: lane i = (lo[i], hi[i]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pairs(lo: __m512, hi: __m512) -> __m512i {
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
            23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        _mm512_permutexvar_epi16(interleave, convert32(lo, hi))
    }

    /// Transpose 16 vectors of 16 u32 in registers: out[c][r] = v[r][c]. Two interleave stages
    /// within 128-bit lanes, then a 4x4 transpose of the lanes (replaces 16 scatters, which the
    /// profile showed stalling the packers).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(v: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        // s[4i + j], lane L: rows 4i..4i+3 of column 4L + j.
        let mut s = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            s[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            s[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            s[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            s[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        // Column 4L + j, lane G = s[4G + j], lane L.
        for j in 0..4 {
            let (a0, a1, a2, a3) = (s[j], s[4 + j], s[8 + j], s[12 + j]);
            let u0 = _mm512_shuffle_i32x4::<0x44>(a0, a1);
            let u1 = _mm512_shuffle_i32x4::<0xEE>(a0, a1);
            let u2 = _mm512_shuffle_i32x4::<0x44>(a2, a3);
            let u3 = _mm512_shuffle_i32x4::<0xEE>(a2, a3);
            v[j] = _mm512_shuffle_i32x4::<0x88>(u0, u2);
            v[4 + j] = _mm512_shuffle_i32x4::<0xDD>(u0, u2);
            v[8 + j] = _mm512_shuffle_i32x4::<0x88>(u1, u3);
            v[12 + j] = _mm512_shuffle_i32x4::<0xDD>(u1, u3);
        }
    }

    #[cfg(test)]
    pub fn transpose16_for_test(m: &[[u32; 16]; 16]) -> [[u32; 16]; 16] {
        assert!(available());
        // SAFETY: AVX-512 checked above.
        unsafe {
            let mut v: [__m512i; 16] = std::array::from_fn(|r| _mm512_loadu_si512(m[r].as_ptr() as *const _));
            transpose16(&mut v);
            let mut out = [[0u32; 16]; 16];
            for (r, row) in out.iter_mut().enumerate() {
                _mm512_storeu_si512(row.as_mut_ptr() as *mut _, v[r]);
            }
            out
        }
    }

    /// # Safety
    /// AVX-512 BF16 must be available; `panel` is panel `mb` of [`super::pack_a`]'s layout.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_a_panel(a: &MatRef, panel: &mut [u16], mb: usize, k_tiles: usize) {
        let (m, k) = (a.rows, a.cols);
        let r0 = mb * 16;
        let height = m.saturating_sub(r0).min(16);
        let base = a.data.as_ptr();
        assert!(panel.len() >= k_tiles * TILE);
        let out = panel.as_mut_ptr();
        if a.col_stride == 1 {
            for rr in 0..16 {
                let row = base.wrapping_add((r0 + rr) * a.row_stride);
                for kb in 0..k_tiles {
                    let valid = if rr < height { k.saturating_sub(kb * 32).min(32) } else { 0 };
                    let lo = load16(row.wrapping_add(kb * 32), valid.min(16));
                    let hi = load16(row.wrapping_add(kb * 32 + 16), valid.saturating_sub(16));
                    _mm512_storeu_si512(out.add(kb * TILE + rr * 32) as *mut _, convert32(lo, hi));
                }
            }
        } else {
            // A is a transposed view (row_stride 1): two K rows of the source give 16 pairs,
            // one per A row, scattered down the tile's rows.
            debug_assert_eq!(a.row_stride, 1);
            let out32 = out as *mut i32;
            let src = |q: usize| if q < k { load16(base.wrapping_add(q * a.col_stride + r0), height) } else { _mm512_setzero_ps() };
            for kb in 0..k_tiles {
                // v[pp] lane rr = pair pp of A row rr; the tile wants row rr = (pair 0..16).
                let mut v: [__m512i; 16] = std::array::from_fn(|pp| pairs(src(kb * 32 + 2 * pp), src(kb * 32 + 2 * pp + 1)));
                transpose16(&mut v);
                for (rr, row) in v.iter().enumerate() {
                    _mm512_storeu_si512(out32.add(kb * 256 + rr * 16) as *mut _, *row);
                }
            }
        }
    }

    /// # Safety
    /// AVX-512 BF16 must be available; `panel` is panel `nb` of [`super::pack_b`]'s layout.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn pack_b_panel(b: &MatRef, panel: &mut [u16], nb: usize, k_tiles: usize) {
        let (k, n) = (b.rows, b.cols);
        let c0 = nb * 16;
        let width = n.saturating_sub(c0).min(16);
        let base = b.data.as_ptr();
        assert!(panel.len() >= k_tiles * TILE);
        let out32 = panel.as_mut_ptr() as *mut i32;
        if b.col_stride == 1 {
            for pp in 0..k_tiles * 16 {
                let src = |q: usize| if q < k { load16(base.wrapping_add(q * b.row_stride + c0), width) } else { _mm512_setzero_ps() };
                _mm512_storeu_si512(out32.add(pp * 16) as *mut _, pairs(src(2 * pp), src(2 * pp + 1)));
            }
        } else {
            // Columns of B are contiguous along K: 32 consecutive K values are 16 pairs in order,
            // scattered down the tile's pair rows.
            debug_assert_eq!(b.row_stride, 1);
            for kb in 0..k_tiles {
                // v[c] lane pp = pair pp of column c; the tile wants pair row pp = (column 0..16).
                let mut v: [__m512i; 16] = std::array::from_fn(|c| {
                    let col = base.wrapping_add((c0 + c) * b.col_stride + kb * 32);
                    let valid = if c < width { k.saturating_sub(kb * 32).min(32) } else { 0 };
                    convert32(load16(col, valid.min(16)), load16(col.wrapping_add(16), valid.saturating_sub(16)))
                });
                transpose16(&mut v);
                for (pp, row) in v.iter().enumerate() {
                    _mm512_storeu_si512(out32.add(kb * 256 + pp * 16) as *mut _, *row);
                }
            }
        }
    }
}

/// Packing buffers, kept per thread between calls (every element is rewritten by the packers,
/// so no zeroing); a re-entrant call or one above the cap gets fresh buffers.
fn with_pack_buffers<R>(len_a: usize, len_b: usize, f: impl FnOnce(&mut [u16], &mut [u16]) -> R) -> R {
    use std::cell::RefCell;
    const CACHE_CAP: usize = 2 * PACK_LIMIT; // elements per buffer (padding included)
    thread_local! {
        static BUFFERS: RefCell<(Vec<u16>, Vec<u16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }
    if len_a.max(len_b) > CACHE_CAP {
        return f(&mut vec![0; len_a], &mut vec![0; len_b]);
    }
    BUFFERS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => {
            let (a, b) = &mut *bufs;
            if a.len() < len_a {
                a.resize(len_a, 0);
            }
            if b.len() < len_b {
                b.resize(len_b, 0);
            }
            f(&mut a[..len_a], &mut b[..len_b])
        }
        Err(_) => f(&mut vec![0; len_a], &mut vec![0; len_b]),
    })
}

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// C (m x n, row stride `ldc`) = A B, or += A B when `accumulate`. Inputs rounded to bf16, sums in
/// f32, parallel over the rayon pool. Panics if AMX is unavailable (check [`amx_available`] first)
/// or shapes disagree.
pub fn matmul_bf16(a: MatRef, b: MatRef, c: &mut [f32], ldc: usize, accumulate: bool) {
    check_c(&a, &b, c.len(), ldc);
    // SAFETY: C's extent was checked against the slice.
    unsafe { matmul_bf16_raw(a, b, c.as_mut_ptr(), ldc, accumulate, true) }
}

/// A B as a new row-major (m x n) Vec (bf16 inputs, f32 sums, parallel). The product writes every
/// element, so the Vec is not zero-filled first (a memset per product showed in profiles).
pub fn product_bf16(a: MatRef, b: MatRef) -> Vec<f32> {
    let (m, n) = (a.rows, b.cols);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: with accumulate = false, matmul_bf16_raw writes all m x n elements at ldc = n
    // (tiles inside C directly, edge tiles through scratch, zeros when k == 0) and reads none
    // before writing them; only then is the length set.
    unsafe {
        matmul_bf16_raw(a, b, c.as_mut_ptr(), n, false, true);
        c.set_len(m * n);
    }
    c
}

fn check_c(a: &MatRef, b: &MatRef, c_len: usize, ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: A is {m}x{k} but B is {}x{n}", b.rows);
    assert!(ldc >= n && (m == 0 || c_len >= (m - 1) * ldc + n), "matmul: C too small for {m}x{n} (ldc {ldc})");
}

/// The same as [`matmul_bf16`] writing through a pointer, on this thread unless `parallel`.
///
/// # Safety
/// `c` must be valid for writes of rows `0..m` x columns `0..n` at row stride `ldc`, and no
/// other thread may touch those elements during the call.
pub unsafe fn matmul_bf16_raw(a: MatRef, b: MatRef, c: *mut f32, ldc: usize, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul_bf16: A is {m}x{k} but B is {}x{n}", b.rows);
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
    assert!(amx_available(), "matmul_bf16 needs AMX-BF16 (check kernels::gemm::amx_available first)");
    // Blocks of at most PACK_LIMIT packed values per operand (Goto's kc x nc / mc x kc panels):
    // memory stays bounded and the per-thread packing buffers are reused, even for a 50257-wide
    // vocabulary head; K blocks after the first accumulate into C.
    let kc = k.min(KC_MAX);
    let mc = (PACK_LIMIT / round_up(kc, 32)).max(32) / 32 * 32;
    let nc = mc;
    for k0 in (0..k).step_by(kc) {
        let kb = kc.min(k - k0);
        for m0 in (0..m).step_by(mc) {
            let a_block = a.block(m0, mc.min(m - m0), k0, kb);
            for n0 in (0..n).step_by(nc) {
                let b_block = b.block(k0, kb, n0, nc.min(n - n0));
                matmul_block(a_block, b_block, c.add(m0 * ldc + n0), ldc, accumulate || k0 > 0, parallel);
            }
        }
    }
}

/// Largest K block, and the most packed values per operand block.
const KC_MAX: usize = 4096;
const PACK_LIMIT: usize = 4 << 20;

impl<'a> MatRef<'a> {
    /// Rows `r0..r0 + rows`, columns `c0..c0 + cols` (a view; no copy).
    fn block(&self, r0: usize, rows: usize, c0: usize, cols: usize) -> MatRef<'a> {
        let start = r0 * self.row_stride + c0 * self.col_stride;
        MatRef { data: &self.data[start.min(self.data.len())..], rows, cols, row_stride: self.row_stride, col_stride: self.col_stride }
    }
}

/// One block product: pack both operands, then the 32x32 C blocks (split over column pairs).
unsafe fn matmul_block(a: MatRef, b: MatRef, c: *mut f32, ldc: usize, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let k_tiles = k.div_ceil(32);
    let (mp, np) = (round_up(m, 32), round_up(n, 32));
    let c_addr = c as usize;
    with_pack_buffers((mp / 16) * k_tiles * TILE, (np / 16) * k_tiles * TILE, |pa, pb| {
        pack_a(&a, pa, k_tiles, parallel);
        pack_b(&b, pb, k_tiles, parallel);
        // Rows of A per L2 block: keep the packed A block near 512 KiB.
        let rows_per_block = ((512 * 1024) / (k_tiles * 64 * 2)).max(32) / 32 * 32;
        let col_pairs = np / 32;
        let blocks = |cols: std::ops::Range<usize>| {
            // SAFETY: a call writes only columns [32 cols.start, 32 cols.end) of C, disjoint
            // between tasks, inside the extent the caller guarantees.
            unsafe { amx_blocks(pa, pb, k_tiles, m, n, mp, rows_per_block, cols, c_addr as *mut f32, ldc, accumulate) }
        };
        if !parallel {
            return blocks(0..col_pairs);
        }
        let threads = rayon::current_num_threads().max(1);
        let chunk = col_pairs.div_ceil(threads * 2).max(1);
        (0..col_pairs).into_par_iter().step_by(chunk).for_each(|j0| blocks(j0..(j0 + chunk).min(col_pairs)));
    })
}

/// C (+)= A B in exact f32 on this thread (the gemm crate candle uses, no threading).
///
/// # Safety
/// As [`matmul_bf16_raw`].
pub unsafe fn matmul_f32_raw(a: MatRef, b: MatRef, c: *mut f32, ldc: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul_f32: A is {m}x{k} but B is {}x{n}", b.rows);
    if m == 0 || n == 0 {
        return;
    }
    // gemm computes dst = alpha dst + beta lhs rhs (dst read only when read_dst).
    gemm::gemm(m, n, k, c, 1, ldc as isize, accumulate, a.data.as_ptr(), a.col_stride as isize, a.row_stride as isize,
        b.data.as_ptr(), b.col_stride as isize, b.row_stride as isize, 1.0f32, 1.0f32, false, false, false, gemm::Parallelism::None);
}

/// C (+)= A B on this thread, in bf16 x bf16 -> f32 on AMX when `bf16`, else exact f32.
///
/// # Safety
/// As [`matmul_bf16_raw`]; the views' extents must lie inside their slices.
pub unsafe fn matmul_serial_raw(a: MatRef, b: MatRef, c: *mut f32, ldc: usize, accumulate: bool, bf16: bool) {
    if bf16 {
        matmul_bf16_raw(a, b, c, ldc, accumulate, false)
    } else {
        matmul_exact_raw(a, b, c, ldc, accumulate, false)
    }
}

/// Exact f32 C (+)= A B: the AVX-512 kernel where the CPU has it, else the gemm crate (serial).
///
/// # Safety
/// As [`matmul_bf16_raw`].
pub unsafe fn matmul_exact_raw(a: MatRef, b: MatRef, c: *mut f32, ldc: usize, accumulate: bool, parallel: bool) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm_f32::available() {
        return crate::gemm_f32::matmul_f32(a, b, c, ldc, accumulate, parallel);
    }
    matmul_f32_raw(a, b, c, ldc, accumulate)
}

/// A B as a new row-major (m x n) Vec in exact f32 (parallel where the AVX-512 kernel runs).
pub fn product_f32(a: MatRef, b: MatRef) -> Vec<f32> {
    let (m, n) = (a.rows, b.cols);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: with accumulate = false both kernels write every element of the m x n result
    // before any read; only then is the length set.
    unsafe {
        matmul_exact_raw(a, b, c.as_mut_ptr(), n, false, true);
        c.set_len(m * n);
    }
    c
}

/// Zero, load or store accumulator tile `t` (0..4 = tmm0..tmm3): tile registers are named in the
/// instruction, so each needs its own `asm!`.
macro_rules! tile_op {
    ($t:expr, $fmt0:literal, $fmt1:literal, $fmt2:literal, $fmt3:literal, $($args:tt)*) => {
        match $t {
            0 => asm!($fmt0, $($args)*),
            1 => asm!($fmt1, $($args)*),
            2 => asm!($fmt2, $($args)*),
            _ => asm!($fmt3, $($args)*),
        }
    };
}

/// Compute the 32x32 C blocks of column pairs `cols` for all rows, on the calling thread.
/// Tiles wholly inside C are loaded from (when accumulating) and stored to C directly; edge
/// tiles go through a scratch tile.
#[allow(clippy::too_many_arguments)]
unsafe fn amx_blocks(pa: &[u16], pb: &[u16], k_tiles: usize, m: usize, n: usize, mp: usize, rows_per_block: usize,
    cols: std::ops::Range<usize>, c: *mut f32, ldc: usize, accumulate: bool) {
    use std::arch::asm;
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    let mut scratch = [0f32; 256];
    let stride = 64usize;
    let c_stride = ldc * 4;
    asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
    let panel = k_tiles * TILE;
    for i_block in (0..mp).step_by(rows_per_block) {
        for j in cols.clone() {
            let b0 = pb.as_ptr().add(2 * j * panel);
            let b1 = b0.add(panel);
            for i in (i_block..(i_block + rows_per_block).min(mp)).step_by(32) {
                let a0 = pa.as_ptr().add((i / 16) * panel);
                let a1 = a0.add(panel);
                // Tile t holds rows i + 16 (t / 2) and columns 32 j + 16 (t % 2).
                let corner = |t: usize| (i + 16 * (t / 2), 32 * j + 16 * (t % 2));
                let inside = |t: usize| {
                    let (r0, c0) = corner(t);
                    r0 + 16 <= m && c0 + 16 <= n
                };
                for t in 0..4 {
                    let (r0, c0) = corner(t);
                    if accumulate && inside(t) {
                        let src = c.add(r0 * ldc + c0);
                        tile_op!(t, "tileloadd tmm0, [{p} + {s}*1]", "tileloadd tmm1, [{p} + {s}*1]",
                            "tileloadd tmm2, [{p} + {s}*1]", "tileloadd tmm3, [{p} + {s}*1]",
                            p = in(reg) src, s = in(reg) c_stride, options(nostack, readonly));
                    } else {
                        tile_op!(t, "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    }
                }
                for kb in 0..k_tiles {
                    let off = kb * TILE;
                    asm!(
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tileloadd tmm6, [{b0} + {s}*1]",
                        "tileloadd tmm7, [{b1} + {s}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(off), a1 = in(reg) a1.add(off),
                        b0 = in(reg) b0.add(off), b1 = in(reg) b1.add(off), s = in(reg) stride,
                        options(nostack, readonly),
                    );
                }
                for t in 0..4 {
                    let (r0, c0) = corner(t);
                    if inside(t) {
                        let dst = c.add(r0 * ldc + c0);
                        tile_op!(t, "tilestored [{p} + {s}*1], tmm0", "tilestored [{p} + {s}*1], tmm1",
                            "tilestored [{p} + {s}*1], tmm2", "tilestored [{p} + {s}*1], tmm3",
                            p = in(reg) dst, s = in(reg) c_stride, options(nostack));
                        continue;
                    }
                    if r0 >= m || c0 >= n {
                        continue;
                    }
                    let sp = scratch.as_mut_ptr();
                    tile_op!(t, "tilestored [{p} + {s}*1], tmm0", "tilestored [{p} + {s}*1], tmm1",
                        "tilestored [{p} + {s}*1], tmm2", "tilestored [{p} + {s}*1], tmm3",
                        p = in(reg) sp, s = in(reg) stride, options(nostack));
                    let width = (n - c0).min(16);
                    for r in 0..(m - r0).min(16) {
                        let dst = std::slice::from_raw_parts_mut(c.add((r0 + r) * ldc + c0), width);
                        let src = &scratch[r * 16..r * 16 + width];
                        if accumulate {
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        } else {
                            dst.copy_from_slice(src);
                        }
                    }
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_bf16(x: f32) -> f64 {
        f32::from_bits((bf16_bits(x) as u32) << 16) as f64
    }

    /// Which product `check` runs.
    #[derive(Clone, Copy, PartialEq)]
    enum Path {
        Bf16Parallel,
        Bf16Serial,
        F32Serial,
    }

    fn check(m: usize, k: usize, n: usize, a_t: bool, b_t: bool, accumulate: bool, path: Path) {
        let a_data: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 31.0).collect();
        let b_data: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 29.0).collect();
        let a = if a_t { MatRef::new(&a_data, k, m).t() } else { MatRef::new(&a_data, m, k) };
        let b = if b_t { MatRef::new(&b_data, n, k).t() } else { MatRef::new(&b_data, k, n) };
        let ldc = n + 3;
        let mut c = vec![0.5f32; m * ldc];
        match path {
            Path::Bf16Parallel => matmul_bf16(a, b, &mut c, ldc, accumulate),
            // SAFETY: c holds m rows of ldc values.
            Path::Bf16Serial => unsafe { matmul_serial_raw(a, b, c.as_mut_ptr(), ldc, accumulate, true) },
            Path::F32Serial => unsafe { matmul_serial_raw(a, b, c.as_mut_ptr(), ldc, accumulate, false) },
        }
        let round = |x: f32| if path == Path::F32Serial { x as f64 } else { round_bf16(x) };
        for r in 0..m {
            for col in 0..n {
                let mut want = if accumulate { 0.5f64 } else { 0.0 };
                let mut scale = 0.0f64;
                for p in 0..k {
                    let term = round(a.at(r, p)) * round(b.at(p, col));
                    want += term;
                    scale += term.abs();
                }
                let got = c[r * ldc + col] as f64;
                assert!((got - want).abs() <= 1e-5 * (scale + 1.0), "{m}x{k}x{n} at ({r},{col}): {got} vs {want}");
            }
            for col in n..ldc {
                assert_eq!(c[r * ldc + col], 0.5, "padding column {col} of row {r} written");
            }
        }
    }

    #[test]
    fn blocked_products_match() {
        // K above KC_MAX (two K blocks accumulate), and M or N above one block at that K.
        let rows = PACK_LIMIT / KC_MAX + 76;
        if amx_available() {
            check(rows, KC_MAX + 104, 40, false, true, false, Path::Bf16Parallel);
            check(40, KC_MAX + 104, rows, true, false, true, Path::Bf16Parallel);
        }
    }

    #[test]
    fn register_transpose_transposes() {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            let m: [[u32; 16]; 16] = std::array::from_fn(|r| std::array::from_fn(|c| (r * 16 + c) as u32));
            let t = simd::transpose16_for_test(&m);
            for r in 0..16 {
                for c in 0..16 {
                    assert_eq!(t[c][r], m[r][c], "({r},{c})");
                }
            }
        }
    }

    #[test]
    fn simd_packing_equals_scalar_packing() {
        #[cfg(target_arch = "x86_64")]
        if simd::available() {
            for &(rows, cols) in &[(1, 1), (16, 32), (33, 70), (17, 5), (64, 96)] {
                let data: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 31.0).collect();
                for transposed in [false, true] {
                    let m = if transposed { MatRef::new(&data, cols, rows).t() } else { MatRef::new(&data, rows, cols) };
                    // As A (rows x k) and as B (k x cols).
                    let k_tiles = m.cols.div_ceil(32);
                    let len = round_up(m.rows, 32) / 16 * k_tiles * TILE;
                    let (mut fast, mut slow) = (vec![7u16; len], vec![9u16; len]);
                    pack_a(&m, &mut fast, k_tiles, false);
                    pack_a_scalar(&m, &mut slow, k_tiles, false);
                    assert_eq!(fast, slow, "pack_a {rows}x{cols} transposed {transposed}");
                    let k_tiles = m.rows.div_ceil(32);
                    let len = round_up(m.cols, 32) / 16 * k_tiles * TILE;
                    let (mut fast, mut slow) = (vec![7u16; len], vec![9u16; len]);
                    pack_b(&m, &mut fast, k_tiles, true);
                    pack_b_scalar(&m, &mut slow, k_tiles, true);
                    assert_eq!(fast, slow, "pack_b {rows}x{cols} transposed {transposed}");
                }
            }
        }
    }

    #[test]
    fn every_path_matches_f64_on_its_rounded_inputs() {
        let paths: &[Path] = if amx_available() {
            &[Path::Bf16Parallel, Path::Bf16Serial, Path::F32Serial]
        } else {
            eprintln!("AMX-BF16 not available on this CPU: checking the f32 path only");
            &[Path::F32Serial]
        };
        for &path in paths {
            for &(m, k, n) in &[(1, 1, 1), (16, 32, 16), (33, 70, 17), (64, 64, 96), (100, 300, 50), (7, 5, 130)] {
                for &(a_t, b_t) in &[(false, false), (false, true), (true, false), (true, true)] {
                    check(m, k, n, a_t, b_t, false, path);
                    check(m, k, n, a_t, b_t, true, path);
                }
            }
        }
    }
}
