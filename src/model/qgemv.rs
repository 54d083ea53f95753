//! Matrix-vector products straight from quantized blocks (decoding: one activation row against
//! a whole weight), with integer dot products, and the blocks' dequantization for the prefill's
//! f32 path.
//!
//! **Panels.** A weight kept for these kernels is repacked once, at load, into panels of
//! [`R`] = 16 rows: for each block column, the 16 rows' f16 scales `d` (and Q4_1's offsets
//! `m`) side by side, then the rows' quant bytes interleaved four at a time (group `g`, lane
//! `r`: bytes `4g..4g + 4` of row `r`'s block). One 64-byte load then holds four bytes of each
//! of 16 rows, so a single `vpdpbusd` (u8 x i8 into i32, AVX-512 VNNI) advances 16 rows' dot
//! products at once, each i32 lane one row; AVX2 does the same with `pmaddubsw`/`pmaddwd` on
//! two halves. The bytes are ggml's own, only moved: a panel weight takes the blocks' memory
//! and gives them back exactly ([`Panels::unpack_rows`]).
//!
//! **Arithmetic.** A block of 32 weights is `d u_i + m` with `u` the stored unsigned integer
//! (Q4_1: `u` the nibble, `m` stored; Q4_0: `m = -8 d`; Q8_0 on VNNI: `u = q + 128`,
//! `m = -128 d`). The activation row is split into two 8-bit terms per 32-block, `x ~ s (a +
//! b/254)` with `s = max|x| / 127`, `a = round(x / s)`, `b = round(254 (x - s a) / s)`, so
//! `|x - x^| <= max|x| / (127 * 508)` (~254 times below llama.cpp's one 8-bit term). A block's
//! share is `s (d (sum u a - c sum a) + d (sum u b - c sum b) / 254) [+ m s (sum a + sum b /
//! 254)]`, the integer parts exact, `c` the type's integer offset (8, 0, 128). The result is
//! `sum_i w_i x^_i` up to f32 rounding: its error against the f32 product is at most
//! `sum_b max|x|_b / (127 * 508) sum_{i in b} |w_i|` plus rounding (`tests/quantized.rs`
//! states it). AVX-512 (F, BW, VNNI) or AVX2+FMA+F16C, chosen at run time; `LQA_ISA=avx2`
//! forces the AVX2 kernels on an AVX-512 CPU (`super::isa`), `LQA_QGEMV=0` turns panels off
//! (then `super::quant` keeps ggml's blocks and takes its other paths, as on other CPUs and for
//! other types).
//!
//! ggml's block layouts (`repr(C)`): Q4_0 `{d: f16, qs: [u8; 16]}` (value `(q - 8) d`), Q4_1
//! `{d: f16, m: f16, qs: [u8; 16]}` (value `q d + m`), Q8_0 `{d: f16, qs: [i8; 32]}` (value
//! `q d`); a nibble byte `i` holds element `i` (low) and `i + 16` (high).

use candle_core::quantized::GgmlDType;

/// Elements per block of the types here.
const QK: usize = 32;

/// Rows per panel (the i32 lanes of a 512-bit register).
pub const R: usize = 16;

/// The instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX2, FMA and F16C: 8 lanes, `pmaddubsw`.
    Avx2,
    /// AVX-512 F, BW and VNNI (and the above): 16 lanes, `vpdpbusd`.
    Avx512,
}

/// The kernels' instruction set on this CPU (`LQA_ISA=avx2` lowers it, `LQA_QGEMV=0` turns it off), or
/// `None` where they don't run.
pub fn isa() -> Option<Isa> {
    static S: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *S.get_or_init(|| {
        if std::env::var("LQA_QGEMV").is_ok_and(|v| v == "0") {
            return None;
        }
        if super::isa::avx512() && cpu_has(Isa::Avx512) {
            Some(Isa::Avx512)
        } else {
            cpu_has(Isa::Avx2).then_some(Isa::Avx2)
        }
    })
}

/// Are weights of this type kept as [`Panels`] and multiplied here on this CPU?
pub fn supported(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0) && isa().is_some()
}

/// Can this CPU run the kernels of `isa` (whatever `LQA_QGEMV` says)?
pub fn cpu_has(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match isa {
            Isa::Avx2 => avx2,
            Isa::Avx512 => {
                avx2 && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        false
    }
}

/// Panels of a task at most (64 rows): fewer where that splits a weight's panels evenly
/// over the threads (see [`task_panels`]).
const TASK_PANELS: usize = 4;

/// Panels per parallel task for `panels` panels: about four tasks per thread, so that few
/// threads idle in the last round (a [192, 576] projection is 12 panels: 3 tasks of 4 on 2
/// threads leave one idle half the time; 6 of 2 do not; the default model's decode moved
/// within the noise).
fn task_panels(panels: usize) -> usize {
    let tasks = crate::threads::num_threads().max(1) * 4;
    panels.div_ceil(tasks).clamp(1, TASK_PANELS)
}

/// A weight `[n, k]` of Q4_0, Q4_1 or Q8_0 repacked into panels of [`R`] rows (module doc).
/// Rows past `n` in the last panel are zero blocks.
pub struct Panels {
    t: GgmlDType,
    n: usize,
    k: usize,
    bytes: Vec<u8>,
}

/// Bytes of a block's header: the f16 scale, and Q4_1's f16 offset.
fn header_bytes(t: GgmlDType) -> usize {
    match t {
        GgmlDType::Q4_1 => 4,
        _ => 2,
    }
}

impl Panels {
    /// Repack `n` rows of `k` values given as ggml's row-major blocks of type `t`.
    pub fn pack(t: GgmlDType, blocks: &[u8], n: usize, k: usize) -> candle_core::Result<Self> {
        Self::pack_rows(t, blocks, n, k, None)
    }

    /// [`Panels::pack`] with the rows reordered as they are packed: row `i` of the result is
    /// row `from[i]` of `blocks` (llama.cpp's q/k permutation undone on the way, exactly).
    pub fn pack_rows(
        t: GgmlDType,
        blocks: &[u8],
        n: usize,
        k: usize,
        from: Option<&[usize]>,
    ) -> candle_core::Result<Self> {
        if let Some(f) = from {
            if f.len() != n || f.iter().any(|&r| r >= n) {
                candle_core::bail!("panels: a bad row permutation of {n} rows");
            }
        }
        let known = matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0);
        let bsize = t.type_size();
        if !known || !k.is_multiple_of(QK) || blocks.len() != n * k / QK * bsize {
            candle_core::bail!("panels: {} bytes are not [{n}, {k}] of {t:?}", blocks.len());
        }
        let nb = k / QK;
        let (hb, rb) = (header_bytes(t), nb * bsize);
        let mut bytes = vec![0u8; n.div_ceil(R) * nb * R * bsize];
        // panels in parallel (an 8B model's 4.5 GB repack at load)
        let pack_panel = |(p, panel): (usize, &mut [u8])| {
            for (b, col) in panel.chunks_mut(R * bsize).enumerate() {
                for r in 0..R.min(n - p * R) {
                    let row = from.map_or(p * R + r, |f| f[p * R + r]);
                    let blk = &blocks[row * rb + b * bsize..][..bsize];
                    col[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                    if hb == 4 {
                        col[2 * R + 2 * r..2 * R + 2 * r + 2].copy_from_slice(&blk[2..4]);
                    }
                    for (g, q) in blk[hb..].chunks(4).enumerate() {
                        let at = hb * R + g * 4 * R + 4 * r;
                        col[at..at + 4].copy_from_slice(q);
                    }
                }
            }
        };
        crate::threads::install(|| {
            use rayon::prelude::*;
            bytes
                .par_chunks_mut(nb * R * bsize)
                .enumerate()
                .for_each(pack_panel)
        });
        Ok(Panels { t, n, k, bytes })
    }

    /// Rows `[r0, r1)` back as ggml's row-major blocks (exact).
    pub fn unpack_rows(&self, r0: usize, r1: usize) -> Vec<u8> {
        let bsize = self.t.type_size();
        let nb = self.k / QK;
        let hb = header_bytes(self.t);
        let mut out = vec![0u8; (r1 - r0) * nb * bsize];
        for (i, row) in out.chunks_mut(nb * bsize).enumerate() {
            let (p, r) = ((r0 + i) / R, (r0 + i) % R);
            for (b, blk) in row.chunks_mut(bsize).enumerate() {
                let col = &self.bytes[(p * nb + b) * R * bsize..][..R * bsize];
                blk[..2].copy_from_slice(&col[2 * r..2 * r + 2]);
                if hb == 4 {
                    blk[2..4].copy_from_slice(&col[2 * R + 2 * r..2 * R + 2 * r + 2]);
                }
                for (g, q) in blk[hb..].chunks_mut(4).enumerate() {
                    let at = hb * R + g * 4 * R + 4 * r;
                    q.copy_from_slice(&col[at..at + 4]);
                }
            }
        }
        out
    }

    /// Rows `[r0, r1)` (`r0` a multiple of [`R`]) dequantized k-major: returns `(out, ld)`
    /// with row `r0 + i`, column `c` at `out[c * ld + i]` (`ld`: the rows rounded up to
    /// whole panels). Exactly the values of the blocks' [`dequantize`].
    pub fn dequantize_rows_t(
        &self,
        r0: usize,
        r1: usize,
    ) -> candle_core::Result<(Vec<f32>, usize)> {
        if !r0.is_multiple_of(R) || r0 > r1 || r1 > self.n || isa().is_none() {
            candle_core::bail!("panels: rows {r0}..{r1} of [{}, {}]", self.n, self.k);
        }
        let (p0, p1) = (r0 / R, r1.div_ceil(R));
        let ld = (p1 - p0) * R;
        let mut out = vec![0f32; self.k * ld];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` found AVX2, FMA and F16C; panels p0..p1 exist (r1 <= n), `out` is
        // k * ld.
        unsafe {
            x86::dequantize_panels_t(self.t, &self.bytes, self.k, (p0, p1), &mut out, ld);
        }
        Ok((out, ld))
    }

    pub fn dtype(&self) -> GgmlDType {
        self.t
    }
    /// Bytes held (the blocks, and the last panel's padding rows).
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// `y = W x`, `x` `[k]`, `y` `[n]`, with the kernels of this CPU ([`isa`]).
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) -> candle_core::Result<()> {
        self.gemm(x, 1, y)
    }

    /// `y = x W^T` for a few rows, `x` `[m, k]`, `y` `[m, n]`: each panel is read from memory
    /// once and multiplied into every row while it is in the cache.
    pub fn gemm(&self, x: &[f32], m: usize, y: &mut [f32]) -> candle_core::Result<()> {
        match isa() {
            Some(isa) => self.gemm_on(isa, x, m, y),
            None => candle_core::bail!("qgemv: no kernel on this CPU"),
        }
    }

    /// [`Panels::gemv`] with the kernels of `isa` (tests and benchmarks compare the two on one CPU).
    pub fn gemv_on(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> candle_core::Result<()> {
        self.gemm_on(isa, x, 1, y)
    }

    /// [`Panels::gemm`] with the kernels of `isa`.
    pub fn gemm_on(&self, isa: Isa, x: &[f32], m: usize, y: &mut [f32]) -> candle_core::Result<()> {
        gemm_many_on(isa, &[self], x, m, &mut [y])
    }

    /// The integer offset `c` of the kernels' unsigned quants for this type (module doc).
    fn offset(&self, isa: Isa) -> i32 {
        match (self.t, isa) {
            (GgmlDType::Q4_0, _) => 8,
            (GgmlDType::Q8_0, Isa::Avx512) => 128,
            _ => 0,
        }
    }

    /// One panel `panel` (index `p`) against the rows `xq`, into `out` (`[m, n]`).
    ///
    /// # Safety
    /// `cpu_has(isa)`; `xq` was split from rows of `k` values with this type's offset; `out`
    /// points at `m n` values of which this call alone writes panel `p`'s rows.
    unsafe fn panel_rows(&self, isa: Isa, p: usize, xq: &[Split], out: super::packed::Shared) {
        let pbytes = self.k / QK * R * self.t.type_size();
        let panel = &self.bytes[p * pbytes..(p + 1) * pbytes];
        let r0 = p * R;
        let rows = R.min(self.n - r0);
        for (i, xi) in xq.iter().enumerate() {
            let mut o = [0f32; R];
            #[cfg(target_arch = "x86_64")]
            {
                use x86::{Q4_0, Q4_1, Q8_0};
                match (isa, self.t) {
                    (Isa::Avx512, GgmlDType::Q4_0) => x86::panel_512::<Q4_0>(panel, xi, &mut o),
                    (Isa::Avx512, GgmlDType::Q4_1) => x86::panel_512::<Q4_1>(panel, xi, &mut o),
                    (Isa::Avx512, _) => x86::panel_512::<Q8_0>(panel, xi, &mut o),
                    (Isa::Avx2, GgmlDType::Q4_0) => x86::panel_256::<Q4_0>(panel, xi, &mut o),
                    (Isa::Avx2, GgmlDType::Q4_1) => x86::panel_256::<Q4_1>(panel, xi, &mut o),
                    (Isa::Avx2, _) => x86::panel_256::<Q8_0>(panel, xi, &mut o),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (panel, xi, isa);
            std::ptr::copy_nonoverlapping(o.as_ptr(), out.at(i * self.n + r0), rows);
        }
    }
}

/// `ys[w] = x W_w^T` for several weights with the same input (a layer's q, k and v), `x`
/// `[m, k]`, `ys[w]` `[m, n_w]`: one parallel region for all of them (decoding runs hundreds
/// of these products per token, and every region is a hand-off between threads), the
/// activation split once per integer offset.
pub fn gemm_many(
    ws: &[&Panels],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
) -> candle_core::Result<()> {
    match isa() {
        Some(isa) => gemm_many_on(isa, ws, x, m, ys),
        None => candle_core::bail!("qgemv: no kernel on this CPU"),
    }
}

/// [`gemm_many`] with the kernels of `isa`.
pub fn gemm_many_on(
    isa: Isa,
    ws: &[&Panels],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
) -> candle_core::Result<()> {
    use rayon::prelude::*;
    if !cpu_has(isa) {
        candle_core::bail!("qgemv: this CPU has no {isa:?}");
    }
    let Some(k) = ws.first().map(|w| w.k) else {
        return Ok(());
    };
    if ws.len() != ys.len() {
        candle_core::bail!("qgemv: {} weights but {} outputs", ws.len(), ys.len());
    }
    for (w, y) in ws.iter().zip(ys.iter()) {
        if w.k != k || x.len() != m * k || y.len() != m * w.n {
            candle_core::bail!(
                "qgemv: x of {} and y of {} for {m} rows and W [{}, {}]",
                x.len(),
                y.len(),
                w.n,
                w.k
            );
        }
    }
    // the rows split once per integer offset the weights need
    let mut splits: Vec<(i32, Vec<Split>)> = Vec::new();
    for w in ws {
        let c = w.offset(isa);
        if !splits.iter().any(|(sc, _)| *sc == c) {
            splits.push((c, x.chunks(k).map(|xi| Split::new(xi, c)).collect()));
        }
    }
    let outs: Vec<super::packed::Shared> = ys
        .iter_mut()
        .map(|y| super::packed::Shared(y.as_mut_ptr()))
        .collect();
    // every weight's tasks: (weight, first panel, panels)
    let mut tasks = Vec::new();
    for (wi, w) in ws.iter().enumerate() {
        let panels = w.n.div_ceil(R);
        let tp = task_panels(panels);
        tasks.extend((0..panels).step_by(tp).map(|p| (wi, p, tp.min(panels - p))));
    }
    crate::threads::install(|| {
        tasks.par_iter().for_each(|&(wi, p0, np)| {
            let w = ws[wi];
            let c = w.offset(isa);
            let xq = &splits
                .iter()
                .find(|(sc, _)| *sc == c)
                .expect("split above")
                .1;
            for p in p0..p0 + np {
                // SAFETY: `cpu_has` checked the features; `xq` was split from x's rows of k
                // with w's offset; outs[wi] is w's [m, n] output, and panel p belongs to this
                // task alone.
                unsafe { w.panel_rows(isa, p, xq, outs[wi]) };
            }
        });
    });
    Ok(())
}

/// `v` to the nearest integer, halves away from zero (`f32::round` is a libm call).
#[inline]
fn round(v: f32) -> i32 {
    (v + 0.5f32.copysign(v)) as i32
}

/// An activation row in two 8-bit terms per 32-block (module doc), with the per-block sums
/// the kernels need.
struct Split {
    /// `a` and `b`, 32 per block, as little-endian 4-byte words (the kernels broadcast them).
    a: Vec<i32>,
    b: Vec<i32>,
    /// `s` per block.
    s: Vec<f32>,
    /// `c sum a`, `c sum b` per block (the integer offset of the weight's quants).
    off_a: Vec<i32>,
    off_b: Vec<i32>,
    /// `sum x^ = s (sum a + sum b / 254)` per block (Q4_1's offset term).
    sum: Vec<f32>,
}

impl Split {
    fn new(x: &[f32], c: i32) -> Self {
        let nb = x.len() / QK;
        let mut a8 = vec![0i8; x.len()];
        let mut b8 = vec![0i8; x.len()];
        let (mut s, mut off_a, mut off_b, mut sum) = (
            Vec::with_capacity(nb),
            Vec::with_capacity(nb),
            Vec::with_capacity(nb),
            Vec::with_capacity(nb),
        );
        for ((xb, ab), bb) in x.chunks(QK).zip(a8.chunks_mut(QK)).zip(b8.chunks_mut(QK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (mut sa, mut sb) = (0i32, 0i32);
            let d = amax / 127.0;
            if amax > 0.0 && amax.is_finite() {
                let inv = 127.0 / amax;
                for ((&v, qa), qb) in xb.iter().zip(ab.iter_mut()).zip(bb.iter_mut()) {
                    let a = round(v * inv).clamp(-127, 127);
                    let b = round((v - d * a as f32) * inv * 254.0).clamp(-127, 127);
                    (*qa, *qb) = (a as i8, b as i8);
                    (sa, sb) = (sa + a, sb + b);
                }
            }
            s.push(if amax.is_finite() { d } else { amax });
            off_a.push(c * sa);
            off_b.push(c * sb);
            sum.push(d * (sa as f32 + sb as f32 / 254.0));
        }
        let words = |v: Vec<i8>| -> Vec<i32> {
            v.chunks(4)
                .map(|w| i32::from_le_bytes([w[0] as u8, w[1] as u8, w[2] as u8, w[3] as u8]))
                .collect()
        };
        Split {
            a: words(a8),
            b: words(b8),
            s,
            off_a,
            off_b,
            sum,
        }
    }
}

/// Dequantize whole blocks `w` of type `t` (ggml's layout) into `out` (one f32 per element),
/// exactly as candle's `dequantize` does (the same roundings), with AVX2.
pub fn dequantize(t: GgmlDType, w: &[u8], out: &mut [f32]) -> candle_core::Result<()> {
    let bsize = t.type_size();
    if !supported(t) || !w.len().is_multiple_of(bsize) || out.len() != w.len() / bsize * QK {
        candle_core::bail!(
            "qgemv dequantize: {t:?}, {} bytes into {}",
            w.len(),
            out.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `supported` checked AVX2, FMA and F16C; `out` has 32 values per block of `w`.
    unsafe {
        x86::dequantize(t, w, out);
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GgmlDType, Split, QK, R};
    use std::arch::x86_64::*;

    /// Bytes ahead of the block column in use that the kernels ask the cache for, every line
    /// of it (decoding streams every weight from memory; the default model's `native` decode:
    /// none 39-47 tok/s, one line per column 52, every line 1024 ahead 75-84, 2048 ahead 61-71;
    /// an Intel Xeon with AVX-512, 2 threads, alternating).
    const PREFETCH: usize = 1024;

    /// The little-endian f16 at `p` as f32 (exact: every f16 is an f32).
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let h = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// A Q4 block's 16 nibble bytes as two registers of signed bytes, elements 0-15 and
    /// 16-31: `q - 8` for Q4_0, `q` for Q4_1 (`MIN`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles<const MIN: bool>(qs: *const u8) -> (__m128i, __m128i) {
        let mask = _mm_set1_epi8(0x0F);
        let qs = _mm_loadu_si128(qs as *const __m128i);
        let lo = _mm_and_si128(qs, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
        if MIN {
            (lo, hi)
        } else {
            let eight = _mm_set1_epi8(8);
            (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight))
        }
    }

    /// Eight signed bytes (the low 8 of `q`) as f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn f8(q: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }

    /// One block of Q4_0, Q4_1 or Q8_0 at `p` to 32 f32 at `o` as candle's `to_float` forms
    /// them (`(q - 8) d`, `q d + m`, `q d`: the same roundings).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_block(t: GgmlDType, p: *const u8, o: *mut f32) {
        let d = _mm256_set1_ps(f16_at(p));
        let (q0, q1, m) = match t {
            GgmlDType::Q8_0 => (
                _mm_loadu_si128(p.add(2) as *const __m128i),
                _mm_loadu_si128(p.add(18) as *const __m128i),
                None,
            ),
            GgmlDType::Q4_1 => {
                let (lo, hi) = nibbles::<true>(p.add(4));
                (lo, hi, Some(_mm256_set1_ps(f16_at(p.add(2)))))
            }
            _ => {
                let (lo, hi) = nibbles::<false>(p.add(2));
                (lo, hi, None)
            }
        };
        let w = |q: __m128i| {
            let v = _mm256_mul_ps(f8(q), d);
            match m {
                Some(m) => _mm256_add_ps(v, m),
                None => v,
            }
        };
        _mm256_storeu_ps(o, w(q0));
        _mm256_storeu_ps(o.add(8), w(_mm_srli_si128(q0, 8)));
        _mm256_storeu_ps(o.add(16), w(q1));
        _mm256_storeu_ps(o.add(24), w(_mm_srli_si128(q1, 8)));
    }

    /// Blocks of Q4_0, Q4_1 or Q8_0 (ggml's layout) to f32, as [`dequantize_block`].
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `out` has 32 values per block of `w`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize(t: GgmlDType, w: &[u8], out: &mut [f32]) {
        for (blk, o) in w.chunks_exact(t.type_size()).zip(out.chunks_exact_mut(QK)) {
            dequantize_block(t, blk.as_ptr(), o.as_mut_ptr());
        }
    }

    /// Panels `p0..p1` of `bytes` (`[n, k]` of type `t`) to f32, k-major: the value of row
    /// `16 (p - p0) + r`, column `c` at `out[c * ld + 16 (p - p0) + r]` (`ld` at least
    /// `16 (p1 - p0)`). Lanes are rows, so no byte is gathered: each four-byte group of 8 rows
    /// gives 8 columns of them. The same roundings as [`dequantize_block`].
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `bytes` holds panels up to `p1`, `out` `k ld` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize_panels_t(
        t: GgmlDType,
        bytes: &[u8],
        k: usize,
        (p0, p1): (usize, usize),
        out: &mut [f32],
        ld: usize,
    ) {
        let bsize = t.type_size();
        let hb = super::header_bytes(t);
        let nb = k / QK;
        let low = _mm256_set1_epi32(0x0F);
        let eight = _mm256_set1_epi32(8);
        let o = out.as_mut_ptr();
        for p in p0..p1 {
            for b in 0..nb {
                let col = bytes.as_ptr().add((p * nb + b) * R * bsize);
                for h in 0..2 {
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(col.add(16 * h) as *const __m128i));
                    let m = (hb == 4)
                        .then(|| _mm256_cvtph_ps(_mm_loadu_si128(col.add(2 * R + 16 * h) as _)));
                    // the value of 8 rows' integers `q` at column `c`
                    let put = |q: __m256i, c: usize| {
                        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                        let v = match m {
                            Some(m) => _mm256_add_ps(v, m),
                            None => v,
                        };
                        _mm256_storeu_ps(o.add((b * QK + c) * ld + 16 * (p - p0) + 8 * h), v);
                    };
                    for g in 0..(bsize - hb) / 4 {
                        let v = _mm256_loadu_si256(col.add(hb * R + 64 * g + 32 * h) as _);
                        macro_rules! byte {
                            ($j:literal) => {
                                match t {
                                    GgmlDType::Q8_0 => put(
                                        _mm256_srai_epi32::<24>(
                                            _mm256_slli_epi32::<{ 24 - 8 * $j }>(v),
                                        ),
                                        4 * g + $j,
                                    ),
                                    _ => {
                                        let lo = _mm256_and_si256(
                                            _mm256_srli_epi32::<{ 8 * $j }>(v),
                                            low,
                                        );
                                        let hi = _mm256_and_si256(
                                            _mm256_srli_epi32::<{ 8 * $j + 4 }>(v),
                                            low,
                                        );
                                        let (lo, hi) = match t {
                                            GgmlDType::Q4_0 => (
                                                _mm256_sub_epi32(lo, eight),
                                                _mm256_sub_epi32(hi, eight),
                                            ),
                                            _ => (lo, hi),
                                        };
                                        put(lo, 4 * g + $j);
                                        put(hi, 16 + 4 * g + $j);
                                    }
                                }
                            };
                        }
                        byte!(0);
                        byte!(1);
                        byte!(2);
                        byte!(3);
                    }
                }
            }
        }
    }

    /// Block kinds, as the kernels' const parameter.
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q8_0: u8 = 2;

    /// Bytes per block of kind `K`, and of its header.
    const fn block_bytes<const K: u8>() -> (usize, usize) {
        match K {
            Q4_0 => (18, 2),
            Q4_1 => (20, 4),
            _ => (34, 2),
        }
    }

    /// Ask for the cache lines of the block column `PREFETCH` bytes ahead of `c`.
    #[inline]
    #[target_feature(enable = "sse")]
    unsafe fn prefetch(c: *const u8, col: usize) {
        let mut l = 0;
        while l < col {
            _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(PREFETCH + l) as *const i8);
            l += 64;
        }
    }

    /// One panel of kind `K` (nb block columns of [`R`] rows) against `x`: the 16 rows' dot
    /// products into `out`, each row an i32 lane of `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VNNI, AVX2, FMA and F16C are available; `panel` is whole block columns of
    /// kind `K` and `x` has one block per column.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn panel_512<const K: u8>(panel: &[u8], x: &Split, out: &mut [f32; R]) {
        let (bsize, hb) = block_bytes::<K>();
        let col = R * bsize;
        let nb = panel.len() / col;
        let p = panel.as_ptr();
        let (xa, xb) = (x.a.as_ptr(), x.b.as_ptr());
        let low = _mm512_set1_epi8(0x0F);
        let flip = _mm512_set1_epi8(-128);
        let inv254 = _mm512_set1_ps(1.0 / 254.0);
        let (mut y0, mut y1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..nb {
            let c = p.add(b * col);
            prefetch(c, col);
            let q = c.add(hb * R);
            // this block's activation words: 8 of `a`, 8 of `b`
            let (wa, wb) = (xa.add(8 * b), xb.add(8 * b));
            let z = _mm512_setzero_si512();
            // [16] i32 each: sum u a (two halves), sum u b (two halves)
            let (mut a0, mut a1, mut b0, mut b1) = (z, z, z, z);
            if K == Q8_0 {
                for g in (0..8).step_by(2) {
                    let v0 = _mm512_xor_si512(_mm512_loadu_si512(q.add(64 * g) as _), flip);
                    let v1 = _mm512_xor_si512(_mm512_loadu_si512(q.add(64 * g + 64) as _), flip);
                    a0 = _mm512_dpbusd_epi32(a0, v0, _mm512_set1_epi32(*wa.add(g)));
                    a1 = _mm512_dpbusd_epi32(a1, v1, _mm512_set1_epi32(*wa.add(g + 1)));
                    b0 = _mm512_dpbusd_epi32(b0, v0, _mm512_set1_epi32(*wb.add(g)));
                    b1 = _mm512_dpbusd_epi32(b1, v1, _mm512_set1_epi32(*wb.add(g + 1)));
                }
            } else {
                for g in 0..4 {
                    let v = _mm512_loadu_si512(q.add(64 * g) as _);
                    // elements 4g..4g+4 (low nibbles) and 16+4g.. (high) of each row
                    let lo = _mm512_and_si512(v, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                    a0 = _mm512_dpbusd_epi32(a0, lo, _mm512_set1_epi32(*wa.add(g)));
                    a1 = _mm512_dpbusd_epi32(a1, hi, _mm512_set1_epi32(*wa.add(4 + g)));
                    b0 = _mm512_dpbusd_epi32(b0, lo, _mm512_set1_epi32(*wb.add(g)));
                    b1 = _mm512_dpbusd_epi32(b1, hi, _mm512_set1_epi32(*wb.add(4 + g)));
                }
            }
            let ia = _mm512_sub_epi32(
                _mm512_add_epi32(a0, a1),
                _mm512_set1_epi32(*x.off_a.get_unchecked(b)),
            );
            let ib = _mm512_sub_epi32(
                _mm512_add_epi32(b0, b1),
                _mm512_set1_epi32(*x.off_b.get_unchecked(b)),
            );
            // sum u x^ - c sum x^, over s
            let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib), inv254, _mm512_cvtepi32_ps(ia));
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(c as *const __m256i));
            let s = _mm512_set1_ps(*x.s.get_unchecked(b));
            y0 = _mm512_fmadd_ps(d, _mm512_mul_ps(t, s), y0);
            if K == Q4_1 {
                let m = _mm512_cvtph_ps(_mm256_loadu_si256(c.add(2 * R) as *const __m256i));
                y1 = _mm512_fmadd_ps(m, _mm512_set1_ps(*x.sum.get_unchecked(b)), y1);
            }
        }
        _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(y0, y1));
    }

    /// `sum_j u_j v_j` over groups of four bytes into i32 lanes (`u` unsigned, `v` signed, no
    /// pair over `i16::MAX`: `u <= 128`, `|v| <= 127`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot4(u: __m256i, v: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), _mm256_set1_epi16(1))
    }

    /// The activation word at `w`, broadcast, with the signs of `v`'s bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sgn(w: *const i32, v: __m256i) -> __m256i {
        _mm256_sign_epi8(_mm256_set1_epi32(*w), v)
    }

    /// [`panel_512`] with AVX2: the panel's two halves of 8 rows, `pmaddubsw`/`pmaddwd`
    /// (Q8_0's signed quants by their magnitude, the activation taking their sign: `c` = 0).
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `panel` is whole block columns of kind `K` and `x`
    /// has one block per column.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel_256<const K: u8>(panel: &[u8], x: &Split, out: &mut [f32; R]) {
        let (bsize, hb) = block_bytes::<K>();
        let col = R * bsize;
        let nb = panel.len() / col;
        let p = panel.as_ptr();
        let (xa, xb) = (x.a.as_ptr(), x.b.as_ptr());
        let low = _mm256_set1_epi8(0x0F);
        let inv254 = _mm256_set1_ps(1.0 / 254.0);
        let zf = _mm256_setzero_ps();
        // [2 halves] of [8] f32: the scale term and Q4_1's offset term
        let mut y0 = [zf, zf];
        let mut y1 = [zf, zf];
        for b in 0..nb {
            let c = p.add(b * col);
            prefetch(c, col);
            let q = c.add(hb * R);
            let (wa, wb) = (xa.add(8 * b), xb.add(8 * b));
            let s = _mm256_set1_ps(*x.s.get_unchecked(b));
            for h in 0..2 {
                let z = _mm256_setzero_si256();
                let (mut a0, mut a1, mut b0, mut b1) = (z, z, z, z);
                if K == Q8_0 {
                    for g in (0..8).step_by(2) {
                        let v0 = _mm256_loadu_si256(q.add(64 * g + 32 * h) as _);
                        let v1 = _mm256_loadu_si256(q.add(64 * g + 64 + 32 * h) as _);
                        let (u0, u1) = (_mm256_abs_epi8(v0), _mm256_abs_epi8(v1));
                        a0 = _mm256_add_epi32(a0, dot4(u0, sgn(wa.add(g), v0)));
                        a1 = _mm256_add_epi32(a1, dot4(u1, sgn(wa.add(g + 1), v1)));
                        b0 = _mm256_add_epi32(b0, dot4(u0, sgn(wb.add(g), v0)));
                        b1 = _mm256_add_epi32(b1, dot4(u1, sgn(wb.add(g + 1), v1)));
                    }
                } else {
                    for g in 0..4 {
                        let v = _mm256_loadu_si256(q.add(64 * g + 32 * h) as _);
                        let lo = _mm256_and_si256(v, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                        a0 = _mm256_add_epi32(a0, dot4(lo, _mm256_set1_epi32(*wa.add(g))));
                        a1 = _mm256_add_epi32(a1, dot4(hi, _mm256_set1_epi32(*wa.add(4 + g))));
                        b0 = _mm256_add_epi32(b0, dot4(lo, _mm256_set1_epi32(*wb.add(g))));
                        b1 = _mm256_add_epi32(b1, dot4(hi, _mm256_set1_epi32(*wb.add(4 + g))));
                    }
                }
                let ia = _mm256_sub_epi32(
                    _mm256_add_epi32(a0, a1),
                    _mm256_set1_epi32(*x.off_a.get_unchecked(b)),
                );
                let ib = _mm256_sub_epi32(
                    _mm256_add_epi32(b0, b1),
                    _mm256_set1_epi32(*x.off_b.get_unchecked(b)),
                );
                let t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), inv254, _mm256_cvtepi32_ps(ia));
                let d = _mm256_cvtph_ps(_mm_loadu_si128(c.add(16 * h) as *const __m128i));
                y0[h] = _mm256_fmadd_ps(d, _mm256_mul_ps(t, s), y0[h]);
                if K == Q4_1 {
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(c.add(2 * R + 16 * h) as _));
                    y1[h] = _mm256_fmadd_ps(m, _mm256_set1_ps(*x.sum.get_unchecked(b)), y1[h]);
                }
            }
        }
        for h in 0..2 {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), _mm256_add_ps(y0[h], y1[h]));
        }
    }
}
