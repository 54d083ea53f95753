//! Frozen f32 weights packed once, at load time, for the CPU matmul microkernels.
//!
//! candle's CPU matmul (the gemm crate) computes `x @ W^T` as `y^T = W x^T`, and on every call
//! and every thread it first copies ("packs") the weight into panels of `MR` output features
//! laid out `[k][MR]`, so that its microkernel reads them sequentially. On the default model
//! that copy was 13 % of a prefill, and both threads packed the whole weight. The weights of a
//! frozen layer never change, so lqa packs them once and drives gemm's own microkernels over
//! the packed panels: no packing at run time, and each thread reads only its share of the
//! weight. The same panels serve the backward pass (`dx = dy @ W`) of training and control.
//!
//! Used for f32 weights on x86-64 CPUs with AVX2+FMA (AVX-512 when present); elsewhere the
//! model keeps plain layouts and candle's matmul. `LQA_PACKED=0` turns packing off (for A/B
//! measurements).

use super::huge_buf::HugeBuf;
use super::transpose::transpose;
use crate::threads::on_threads;
use gemm_common::microkernel::MicroKernelFn;
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Columns (tokens) per microkernel tile.
const NR: usize = 6;
/// Most of the reduction dimension one microkernel call covers.
const MAX_KC: usize = 2048;
/// Bytes of activations (a block of tokens × kc) kept hot while a thread sweeps its panels.
const X_BLOCK_BYTES: usize = 1 << 20;
/// Below this many multiply-adds a matmul runs on one thread.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// One family of gemm microkernels: `ukr[rows / lanes - 1][cols - 1]` computes a tile of up to
/// `mr` rows and `NR` columns.
pub struct Kernel {
    ukr: &'static [[MicroKernelFn<f32>; NR]],
    mr: usize,
    lanes: usize,
}

impl Kernel {
    /// One tile: `dst[i, j] (+)= sum_l lhs[i, l] rhs[l, j]` for `i < mm <= mr`, `j < nn <= NR`,
    /// `l < kc`, where `lhs[i, l]` is at `lhs + l * mr + i` (a panel: rows contiguous, and read
    /// `ceil(mm / lanes) * lanes` wide), `rhs[l, j]` at `rhs + l + j * rhs_cs` and `dst[i, j]`
    /// at `dst + i + j * dst_cs`. Stores when `accumulate` is false, adds otherwise.
    ///
    /// # Safety
    /// Every address named above must be valid to read (lhs, rhs) or write (dst).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        mm: usize,
        nn: usize,
        kc: usize,
        dst: *mut f32,
        dst_cs: usize,
        lhs: *const f32,
        rhs: *const f32,
        rhs_cs: usize,
        accumulate: bool,
    ) {
        let (alpha, status) = if accumulate { (1.0, 1) } else { (0.0, 0) };
        (self.ukr[mm.div_ceil(self.lanes) - 1][nn - 1])(
            mm,
            nn,
            kc,
            dst,
            lhs,
            rhs,
            dst_cs as isize,
            1,
            self.mr as isize,
            1,
            rhs_cs as isize,
            alpha,
            1.0,
            status,
            false,
            false,
            false,
            std::ptr::null(),
        );
    }
}

/// The best microkernels this CPU runs, or `None` where packing is not used.
pub fn kernel() -> Option<&'static Kernel> {
    static K: OnceLock<Option<Kernel>> = OnceLock::new();
    K.get_or_init(|| {
        if std::env::var("LQA_PACKED").is_ok_and(|v| v == "0") {
            return None;
        }
        detect()
    })
    .as_ref()
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Option<Kernel> {
    if super::isa::avx512() {
        return Some(Kernel {
            ukr: &gemm_f32::microkernel::avx512f::f32::UKR,
            mr: 64,
            lanes: 16,
        });
    }
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return Some(Kernel {
            ukr: &gemm_f32::microkernel::fma::f32::UKR,
            mr: 16,
            lanes: 8,
        });
    }
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Option<Kernel> {
    None
}

/// A raw pointer the worker threads may share: each writes a disjoint set of tiles.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub(crate) *mut f32);
// SAFETY: only used to write disjoint tiles of one buffer from the threads of one parallel
// region, which ends before the buffer is used again.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer `i` elements on (a method, so that closures capture the `Send` wrapper).
    ///
    /// # Safety
    /// As [`pointer::add`].
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

/// A forward's cut into jobs (see [`PackedWeight::forward_many`]).
#[derive(Clone, Copy)]
struct Plan {
    kc: usize,
    panels: usize,
    tiles: usize,
    block: usize,
    jobs: usize,
}

/// A frozen weight `W` `[n, k]` (HF layout: `n` outputs, `k` inputs) stored as
/// `ceil(n / mr)` panels, each `[k][mr]` (the panel's `mr` output features contiguous for every
/// input), the last panel zero-padded.
#[derive(Clone)]
pub struct PackedWeight {
    data: Arc<HugeBuf>,
    n: usize,
    k: usize,
    kernel: &'static Kernel,
    /// `W^T` `[k, n]` packed the same way, made at the first backward (see
    /// [`PackedWeight::backward`]); shared by the clones.
    transposed: Arc<OnceLock<PackedWeight>>,
}

/// Whether backward passes multiply by a packed copy of `W^T` (the default) rather than
/// transposing their operands around the forward's panels. `LQA_PACKED_BACKWARD=0` keeps one
/// copy of each weight (for f32 training of models whose weights fit in memory only once).
fn transposed_backward() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LQA_PACKED_BACKWARD").is_ok_and(|v| v == "0"))
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedWeight[{}, {}] (panels of {})",
            self.n, self.k, self.kernel.mr
        )
    }
}

impl PackedWeight {
    /// Pack `w`, row-major `[n, k]`.
    pub fn pack(w: &[f32], n: usize, k: usize, kernel: &'static Kernel) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "PackedWeight::pack: {} values for [{n}, {k}]",
            w.len()
        );
        let mr = kernel.mr;
        let mut data = HugeBuf::zeros(n.div_ceil(mr) * k * mr);
        if k > 0 {
            data.par_chunks_mut(k * mr)
                .enumerate()
                .for_each(|(p, panel)| {
                    for r in 0..mr.min(n - p * mr) {
                        let row = &w[(p * mr + r) * k..][..k];
                        for (kk, &v) in row.iter().enumerate() {
                            panel[kk * mr + r] = v;
                        }
                    }
                });
        }
        PackedWeight {
            data: Arc::new(data),
            n,
            k,
            kernel,
            transposed: Arc::new(OnceLock::new()),
        }
    }

    /// `W^T` packed (made once, on the first call): `dy @ W` is its forward.
    fn transposed(&self) -> &PackedWeight {
        self.transposed.get_or_init(|| {
            let (n, k) = (self.n, self.k);
            let w = self.unpack(); // [n, k]
            let mut wt = vec![0f32; k * n]; // [k, n]
            if n > 0 && k > 0 {
                // SAFETY: w holds n rows of k values; wt holds k rows of n values.
                unsafe { transpose(w.as_ptr(), k, wt.as_mut_ptr(), n, n, k) };
            }
            PackedWeight::pack(&wt, k, n, self.kernel)
        })
    }

    /// Outputs (rows of `W`).
    pub fn n(&self) -> usize {
        self.n
    }
    /// Inputs (columns of `W`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// `W` row-major `[n, k]`.
    pub fn unpack(&self) -> Vec<f32> {
        let (n, k, mr) = (self.n, self.k, self.kernel.mr);
        let mut w = vec![0f32; n * k];
        if k > 0 {
            w.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
                let panel = &self.data[(o / mr) * k * mr..];
                for (kk, v) in row.iter_mut().enumerate() {
                    *v = panel[kk * mr + o % mr];
                }
            });
        }
        w
    }

    fn threads(&self, m: usize, jobs: usize) -> usize {
        if m * self.n * self.k < PARALLEL_MIN_MACS {
            1
        } else {
            crate::threads::num_threads().min(jobs).max(1)
        }
    }

    /// `y = x @ W^T`: `x` row-major `[m, k]`, `y` row-major `[m, n]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        Self::forward_many(&[self], x, m).pop().unwrap_or_default()
    }

    /// `x @ W_w^T` for several weights of one input (a layer's q, k and v): one parallel
    /// region in which every thread takes its share of every weight's tiles (decoding runs
    /// hundreds of products per token, and every region is a hand-off between threads).
    pub fn forward_many(ws: &[&PackedWeight], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let Some(k) = ws.first().map(|w| w.k) else {
            return Vec::new();
        };
        for w in ws {
            assert!(
                w.k == k && x.len() == m * k,
                "PackedWeight::forward: x has {} values, not [{m}, {}]",
                x.len(),
                w.k
            );
        }
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(m * w.n)).collect();
        if m == 0 || k == 0 {
            return ws.iter().map(|w| vec![0f32; m * w.n]).collect();
        }
        let plans: Vec<Plan> = ws.iter().map(|w| w.plan(m)).collect();
        let macs: usize = ws.iter().map(|w| w.n).sum::<usize>() * m * k;
        let jobs = plans.iter().map(|p| p.jobs).max().unwrap_or(1);
        let nt = if macs < PARALLEL_MIN_MACS {
            1
        } else {
            crate::threads::num_threads().min(jobs).max(1)
        };
        let dsts: Vec<Shared> = ys.iter_mut().map(|y| Shared(y.as_mut_ptr())).collect();
        on_threads(nt, |t| {
            for ((w, plan), dst) in ws.iter().zip(&plans).zip(&dsts) {
                // SAFETY: dst is w's y, [m, n] with that capacity; thread t writes only the
                // tiles of its job range.
                unsafe { w.forward_part(plan, x, m, *dst, t, nt) };
            }
        });
        for (y, w) in ys.iter_mut().zip(ws) {
            // SAFETY: the jobs cover every (row, column) of y: every tile of every panel, and
            // each tile's first k-block stores (alpha 0) before later blocks accumulate.
            unsafe { y.set_len(m * w.n) };
        }
        ys
    }

    /// How a forward of `m` rows is cut into jobs.
    fn plan(&self, m: usize) -> Plan {
        let (n, k) = (self.n, self.k);
        let kc = k.div_ceil(k.div_ceil(MAX_KC));
        let panels = n.div_ceil(self.kernel.mr);
        let tiles = m.div_ceil(NR);
        // Tokens in blocks whose activations stay in L2 while a thread sweeps its panels.
        let block = (X_BLOCK_BYTES / (kc * 4 * NR)).max(1);
        let block = tiles.div_ceil(tiles.div_ceil(block));
        // Jobs are tiles, ordered (token block, panel, tile): contiguous ranges per thread.
        Plan {
            kc,
            panels,
            tiles,
            block,
            jobs: panels * tiles,
        }
    }

    /// Thread `t` of `nt`'s share of the forward: jobs `[jobs t / nt, jobs (t + 1) / nt)`.
    ///
    /// # Safety
    /// `dst` points at `m n` writable values; no other thread runs the same share.
    unsafe fn forward_part(
        &self,
        plan: &Plan,
        x: &[f32],
        m: usize,
        dst: Shared,
        t: usize,
        nt: usize,
    ) {
        let (n, k) = (self.n, self.k);
        let kern = self.kernel;
        let mr = kern.mr;
        let Plan {
            kc,
            panels,
            tiles,
            block,
            jobs,
        } = *plan;
        let w = &self.data[..];
        let (j0, j1) = (jobs * t / nt, jobs * (t + 1) / nt);
        let mut kb = 0;
        while kb < k {
            let kcb = kc.min(k - kb);
            for job in j0..j1 {
                // job -> (token block b, panel p, tile j)
                let (b, rest) = (job / (panels * block), job % (panels * block));
                let in_block = block.min(tiles - b * block);
                let (p, j) = (rest / in_block, b * block + rest % in_block);
                let f = p * mr;
                let mm = mr.min(n - f);
                let tok = j * NR;
                let nn = NR.min(m - tok);
                // SAFETY: the panel holds `k * mr` values (zero-padded past `n`), the kernel
                // reads `ceil(mm / lanes) * lanes <= mr` of them per step for `kcb` steps from
                // `kb`; x rows `tok..tok + nn` hold `k` values each; the tile writes rows
                // `tok..tok + nn`, columns `f..f + mm` of y [m, n], and no other job writes them.
                unsafe {
                    kern.tile(
                        mm,
                        nn,
                        kcb,
                        dst.at(tok * n + f),
                        n,
                        w.as_ptr().add(p * k * mr + kb * mr),
                        x.as_ptr().add(tok * k + kb),
                        k,
                        kb > 0,
                    );
                }
            }
            kb += kcb;
        }
    }

    /// `dx = dy @ W`: `dy` row-major `[m, n]`, `dx` row-major `[m, k]` (the input gradient of
    /// [`PackedWeight::forward`]).
    ///
    /// The forward's panels hold `mr` outputs per input, so `dy @ W` over them reduces in
    /// chunks of `mr` and needs `dy` and `dx` transposed around the product (0.7-0.8 of the
    /// forward's GFLOPS on the default model's shapes, `cargo bench --bench products`). A
    /// packed copy of `W^T`, made at the first backward, turns the backward into a forward of
    /// it, at the cost of a second copy of the weight (see [`transposed_backward`]).
    pub fn backward(&self, dy: &[f32], m: usize) -> Vec<f32> {
        let n = self.n;
        assert_eq!(
            dy.len(),
            m * n,
            "PackedWeight::backward: dy has {} values, not [{m}, {n}]",
            dy.len()
        );
        if transposed_backward() {
            return self.transposed().forward(dy, m);
        }
        self.backward_over_forward_panels(dy, m)
    }

    /// [`PackedWeight::backward`] over the forward's panels (no second copy of the weight).
    fn backward_over_forward_panels(&self, dy: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        if m == 0 || k == 0 {
            return Vec::new();
        }
        if n == 0 {
            return vec![0f32; m * k];
        }
        let kern = self.kernel;
        let mr = kern.mr;
        // dy^T in token panels [tp][n][mr] (tokens contiguous), zero-padded past the last
        // token (`super::transpose`'s tiles).
        let tp = m.div_ceil(mr);
        let mp = tp * mr;
        // SAFETY: every panel element is written below (a token's value, or 0 past the last
        // token).
        let dyp = unsafe {
            super::kernels::filled(tp * n * mr, |dyp| {
                dyp.par_chunks_mut(n * mr)
                    .enumerate()
                    .for_each(|(q, panel)| {
                        let rows = mr.min(m - q * mr);
                        let out = panel.as_mut_ptr() as *mut f32;
                        // SAFETY: dy rows q*mr.. (rows of them, n wide) exist; the panel is
                        // [n][mr].
                        transpose(dy.as_ptr().add(q * mr * n), n, out, mr, rows, n);
                        if rows < mr {
                            for o in 0..n {
                                std::slice::from_raw_parts_mut(out.add(o * mr + rows), mr - rows)
                                    .fill(0.0);
                            }
                        }
                    });
            })
        };
        // dx^T [k][mp]: the microkernel writes token-contiguous tiles (every token column
        // below m of every row; the padding columns are never written nor read).
        let mut dxt: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(k * mp);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { dxt.set_len(k * mp) };
        let panels = n.div_ceil(mr);
        let cols = k.div_ceil(NR);
        let jobs = tp * cols;
        let nt = self.threads(m, jobs);
        let dst = Shared(dxt.as_mut_ptr() as *mut f32);
        let w = &self.data[..];
        let lhs = &dyp[..];
        let run = |t: usize| {
            for job in jobs * t / nt..jobs * (t + 1) / nt {
                let (q, c) = (job / cols, job % cols);
                let mm = mr.min(m - q * mr);
                let kk = c * NR;
                let nn = NR.min(k - kk);
                for p in 0..panels {
                    let kc = mr.min(n - p * mr);
                    // SAFETY: lhs reads token panel q, outputs p*mr..p*mr+kc, each a full
                    // `mr`-wide row (zero-padded); rhs reads panel p, inputs kk..kk+nn, its
                    // first kc features; the tile writes dx^T rows kk..kk+nn, tokens
                    // q*mr..q*mr+mm, which no other job writes.
                    unsafe {
                        kern.tile(
                            mm,
                            nn,
                            kc,
                            dst.at(kk * mp + q * mr),
                            mp,
                            lhs.as_ptr().add(q * n * mr + p * mr * mr),
                            w.as_ptr().add(p * k * mr + kk * mr),
                            mr,
                            p > 0,
                        );
                    }
                }
            }
        };
        on_threads(nt, run);
        // dx [m][k] from dx^T, TB tokens at a time.
        // SAFETY: the blocks cover every row of dx; each element of dxt read (token < m) was
        // written by a tile above.
        const TB: usize = 64;
        unsafe {
            super::kernels::filled(m * k, |dx| {
                dx.par_chunks_mut(k * TB)
                    .enumerate()
                    .for_each(|(tb, rows)| {
                        let nt = rows.len() / k;
                        // dx^T's rows are the k inputs, its columns tokens tb*TB..+nt
                        let src = (dxt.as_ptr() as *const f32).add(tb * TB);
                        transpose(src, mp, rows.as_mut_ptr() as *mut f32, k, k, nt);
                    });
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut g = crate::rng::Lcg64::new(seed);
        (0..n).map(|_| g.next_unit_f32() - 0.5).collect()
    }

    /// Several weights of one input in one region: each output exactly its own forward,
    /// including one weight too small to be split and one past MAX_KC.
    #[test]
    fn forward_many_equals_each_forward() {
        let Some(kern) = kernel() else {
            return;
        };
        for &(m, k) in &[(1usize, 96usize), (13, 2 * MAX_KC + 5)] {
            let ws: Vec<PackedWeight> = [(5usize, 1u64), (70, 2), (192, 3)]
                .iter()
                .map(|&(n, seed)| PackedWeight::pack(&rand(n * k, seed), n, k, kern))
                .collect();
            let x = rand(m * k, 9);
            let refs: Vec<&PackedWeight> = ws.iter().collect();
            let ys = PackedWeight::forward_many(&refs, &x, m);
            for (w, y) in ws.iter().zip(&ys) {
                assert_eq!(y, &w.forward(&x, m), "[{m}, {}, {k}]", w.n());
            }
        }
    }

    #[test]
    fn packed_matmuls_equal_the_naive_products_at_every_tail() {
        let Some(kern) = kernel() else {
            eprintln!("no packed kernel on this CPU: nothing to test");
            return;
        };
        // tails of every kind: n not a multiple of mr, m not a multiple of NR, k over MAX_KC
        for &(m, n, k) in &[
            (1, 5, 3),
            (7, 64, 16),
            (13, 70, 33),
            (128, 192, 96),
            (200, 130, 2 * MAX_KC + 5),
        ] {
            let w = rand(n * k, 1);
            let x = rand(m * k, 2);
            let dy = rand(m * n, 3);
            let pw = PackedWeight::pack(&w, n, k, kern);
            assert_eq!(pw.unpack(), w);
            let y = pw.forward(&x, m);
            let dx = pw.backward_over_forward_panels(&dy, m);
            let dxt = pw.transposed().forward(&dy, m);
            for t in 0..m {
                for o in 0..n {
                    let r: f64 = (0..k)
                        .map(|i| x[t * k + i] as f64 * w[o * k + i] as f64)
                        .sum();
                    let got = y[t * n + o] as f64;
                    assert!(
                        (got - r).abs() < 1e-4 * (1.0 + r.abs()) * (k as f64).sqrt(),
                        "forward [{m},{n},{k}] at ({t},{o}): {got} vs {r}"
                    );
                }
                for i in 0..k {
                    let r: f64 = (0..n)
                        .map(|o| dy[t * n + o] as f64 * w[o * k + i] as f64)
                        .sum();
                    for (how, dx) in [("over the forward's panels", &dx), ("by W^T", &dxt)] {
                        let got = dx[t * k + i] as f64;
                        assert!(
                            (got - r).abs() < 1e-4 * (1.0 + r.abs()) * (n as f64).sqrt(),
                            "backward {how} [{m},{n},{k}] at ({t},{i}): {got} vs {r}"
                        );
                    }
                }
            }
        }
    }
}
