//! Matrix products with bf16 inputs and f32 accumulation on Intel AMX (the `--matmul bf16` path).
//!
//! Why: a training step is mostly matrix products, and in f32 a CPU core does at best 32 FMAs per
//! cycle (candle's gemm crate reaches ~175-200 GFLOP/s on this 2-core VM). AMX tiles multiply
//! bf16 pairs with f32 accumulation at up to 16x that rate: `tdpbf16ps` alone measured
//! ~3.5 TFLOP/s per core here. Inputs stay f32 in memory; they are rounded to bf16 (round to
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

/// Pack A (m x k) into tiles [m/16][k/32] of 16 rows x 32 bf16, zero padded to m % 32 == 0.
fn pack_a(a: &MatRef, packed: &mut [u16], k_tiles: usize, parallel: bool) {
    let (m, k) = (a.rows, a.cols);
    for_each_panel(packed, k_tiles * TILE, parallel, |mb, panel| {
        let rows = (mb * 16)..((mb + 1) * 16).min(m);
        if rows.is_empty() {
            return; // padding rows stay zero
        }
        if a.col_stride == 1 {
            for r in rows {
                let src = &a.data[r * a.row_stride..r * a.row_stride + k];
                for (kb, chunk) in src.chunks(32).enumerate() {
                    let dst = &mut panel[kb * TILE + (r % 16) * 32..][..chunk.len()];
                    for (d, &s) in dst.iter_mut().zip(chunk) {
                        *d = bf16_bits(s);
                    }
                }
            }
        } else if a.row_stride == 1 {
            // Columns of A are contiguous (A is a transposed view): walk K outer, rows inner.
            let (r0, height) = (rows.start, rows.len());
            for p in 0..k {
                let (kb, kc) = (p / 32, p % 32);
                let src = &a.data[p * a.col_stride + r0..][..height];
                for (r, &x) in src.iter().enumerate() {
                    panel[kb * TILE + r * 32 + kc] = bf16_bits(x);
                }
            }
        } else {
            for p in 0..k {
                for r in rows.clone() {
                    panel[(p / 32) * TILE + (r % 16) * 32 + p % 32] = bf16_bits(a.at(r, p));
                }
            }
        }
    });
}

/// Two f32 as one VNNI pair: `lo` (even K) in the low half, `hi` (odd K) in the high half.
#[inline(always)]
fn bf16_pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
}

/// Pack B (k x n) into VNNI tiles [n/16][k/32]: (p, c) goes to pair row (p%32)/2, slot 2(c%16) + p%2.
/// Seen as u32, a tile is 16 pair rows x 16 columns, so both source layouts pack with plain
/// loops over u32 pairs that LLVM vectorizes.
fn pack_b(b: &MatRef, packed: &mut [u16], k_tiles: usize, parallel: bool) {
    let (k, n) = (b.rows, b.cols);
    for_each_panel(packed, k_tiles * TILE, parallel, |nb, panel| {
        // SAFETY: u16 -> u32 reinterpretation of an even-length, 4-byte aligned allocation
        // (the Vec<u16> comes from the global allocator, aligned to at least 8).
        let (head, panel32, tail) = unsafe { panel.align_to_mut::<u32>() };
        assert!(head.is_empty() && tail.is_empty(), "pack_b: packed buffer not 4-byte aligned");
        let c0 = nb * 16;
        let width = n.saturating_sub(c0).min(16);
        if width == 0 {
            return; // padding columns stay zero
        }
        let even = k / 2 * 2;
        if b.row_stride == 1 {
            // Each column of B is contiguous along K (B is a transposed row-major weight).
            for c in 0..width {
                let col = &b.data[(c0 + c) * b.col_stride..][..k];
                for (pp, pair) in col[..even].chunks_exact(2).enumerate() {
                    panel32[pp * 16 + c] = bf16_pair(pair[0], pair[1]);
                }
                if k % 2 == 1 {
                    panel32[(k / 2) * 16 + c] = bf16_pair(col[k - 1], 0.0);
                }
            }
        } else if b.col_stride == 1 {
            for p in (0..even).step_by(2) {
                let (r0, r1) = (&b.data[p * b.row_stride + c0..][..width], &b.data[(p + 1) * b.row_stride + c0..][..width]);
                let dst = &mut panel32[(p / 2) * 16..][..width];
                for ((d, &x0), &x1) in dst.iter_mut().zip(r0).zip(r1) {
                    *d = bf16_pair(x0, x1);
                }
            }
            if k % 2 == 1 {
                let r0 = &b.data[(k - 1) * b.row_stride + c0..][..width];
                for (d, &x0) in panel32[(k / 2) * 16..][..width].iter_mut().zip(r0) {
                    *d = bf16_pair(x0, 0.0);
                }
            }
        } else {
            for p in 0..k {
                for c in 0..width {
                    panel[(p / 2) * 32 + c * 2 + p % 2] = bf16_bits(b.at(p, c0 + c));
                }
            }
        }
    });
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
    let k_tiles = k.div_ceil(32);
    let (mp, np) = (round_up(m, 32), round_up(n, 32));
    let mut pa = vec![0u16; (mp / 16) * k_tiles * TILE];
    let mut pb = vec![0u16; (np / 16) * k_tiles * TILE];
    pack_a(&a, &mut pa, k_tiles, parallel);
    pack_b(&b, &mut pb, k_tiles, parallel);

    // Rows of A per L2 block: keep the packed A block near 512 KiB.
    let rows_per_block = ((512 * 1024) / (k_tiles * 64 * 2)).max(32) / 32 * 32;
    let col_pairs = np / 32;
    if !parallel {
        amx_blocks(&pa, &pb, k_tiles, m, n, mp, rows_per_block, 0..col_pairs, c, ldc, accumulate);
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = col_pairs.div_ceil(threads * 2).max(1);
    let c_addr = c as usize;
    (0..col_pairs).into_par_iter().step_by(chunk).for_each(|j0| {
        let j1 = (j0 + chunk).min(col_pairs);
        // SAFETY: each task writes only columns [32 j0, 32 j1) of C, disjoint from other tasks,
        // inside the extent the caller guarantees.
        unsafe { amx_blocks(&pa, &pb, k_tiles, m, n, mp, rows_per_block, j0..j1, c_addr as *mut f32, ldc, accumulate) };
    });
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
        matmul_f32_raw(a, b, c, ldc, accumulate)
    }
}

/// Compute the 32x32 C blocks of column pairs `cols` for all rows, on the calling thread.
#[allow(clippy::too_many_arguments)]
unsafe fn amx_blocks(pa: &[u16], pb: &[u16], k_tiles: usize, m: usize, n: usize, mp: usize, rows_per_block: usize,
    cols: std::ops::Range<usize>, c: *mut f32, ldc: usize, accumulate: bool) {
    use std::arch::asm;
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    let mut scratch = [[0f32; 256]; 4];
    let stride = 64usize;
    asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
    let panel = k_tiles * TILE;
    for i_block in (0..mp).step_by(rows_per_block) {
        for j in cols.clone() {
            let b0 = pb.as_ptr().add(2 * j * panel);
            let b1 = b0.add(panel);
            for i in (i_block..(i_block + rows_per_block).min(mp)).step_by(32) {
                let a0 = pa.as_ptr().add((i / 16) * panel);
                let a1 = a0.add(panel);
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
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
                asm!(
                    "tilestored [{p0} + {s}*1], tmm0",
                    "tilestored [{p1} + {s}*1], tmm1",
                    "tilestored [{p2} + {s}*1], tmm2",
                    "tilestored [{p3} + {s}*1], tmm3",
                    p0 = in(reg) scratch[0].as_mut_ptr(), p1 = in(reg) scratch[1].as_mut_ptr(),
                    p2 = in(reg) scratch[2].as_mut_ptr(), p3 = in(reg) scratch[3].as_mut_ptr(), s = in(reg) stride,
                    options(nostack),
                );
                // Tile t holds rows i + 16 (t / 2) and columns 32 j + 16 (t % 2).
                for (t, tile) in scratch.iter().enumerate() {
                    let (r0, c0) = (i + 16 * (t / 2), 32 * j + 16 * (t % 2));
                    if r0 >= m || c0 >= n {
                        continue;
                    }
                    let width = (n - c0).min(16);
                    for r in 0..(m - r0).min(16) {
                        let dst = std::slice::from_raw_parts_mut(c.add((r0 + r) * ldc + c0), width);
                        let src = &tile[r * 16..r * 16 + width];
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
