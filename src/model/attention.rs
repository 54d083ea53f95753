//! Causal self-attention of one layer as one graph node, for training on the CPU (f32, no KV
//! cache): `y = softmax(scale q k^T + mask) v`, heads merged, over `(q, k, v)`.
//!
//! Built from candle's ops, attention is a dozen nodes (the grouped-query reshapes, `k^T`, two
//! batched products, the softmax, the transposes back), and candle's backward starts every
//! node's gradient from zeros and adds to it. Here the backward recomputes each head's
//! probabilities (a product of `[s, hd]` by `[hd, s]`, small beside the projections) and writes
//! `dq`, `dk` and `dv` once.
//!
//! Per head `h` (query head `h` reads KV head `h / rep`), with `P = softmax(scale S + mask)`,
//! `S = q k^T`:
//! - `dv = P^T dy`, `dP = dy v^T`
//! - `dS = scale P (dP - rowsum(P dP))`
//! - `dq = dS k`, `dk = dS^T q`
//!
//! The KV heads' gradients are summed over the query heads that share them.

use super::gemm::{matmul, product, product_to, Mat};
use super::kernels;
use super::ops::{f32_slice, first_key, with_f32};
use super::packed::Shared;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Causal attention of `q` `[b, s, heads * hd]` over `k`, `v` `[b, s, kv_heads * hd]` (the
/// projections' layout), queries and keys rotated by half-rotation RoPE inside (`cos`/`sin`
/// `[b, s, hd/2]`), with each row's left padding `pads` and an optional sliding `window`; the
/// output `[b, s, heads * hd]`.
pub(super) struct CausalAttention {
    pub heads: usize,
    pub kv_heads: usize,
    pub scale: f32,
    pub pads: Vec<usize>,
    pub window: Option<usize>,
    /// RoPE cos and sin `[b, s, hd/2]` (constants of the positions).
    pub rope: Option<(Tensor, Tensor)>,
}

struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    s: usize,
    hd: usize,
}

impl Dims {
    /// The query heads that share a KV head.
    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
}

impl CausalAttention {
    fn dims(&self, q: &Shape, k: &Shape, v: &Shape) -> Result<Dims> {
        let (b, s, qw) = q.dims3()?;
        let (bk, sk, kw) = k.dims3()?;
        let (nh, nkv) = (self.heads, self.kv_heads);
        let ok = nh > 0
            && nkv > 0
            && nh % nkv == 0
            && qw % nh == 0
            && (bk, sk) == (b, s)
            && kw == nkv * (qw / nh)
            && v.dims() == k.dims()
            && self.pads.len() == b
            && (qw / nh) % 2 == 0
            && self.rope.as_ref().is_none_or(|(c, sn)| {
                // cos/sin [b, s, hd/2]
                c.elem_count() == b * s * (qw / nh) / 2 && sn.elem_count() == c.elem_count()
            });
        if !ok {
            candle_core::bail!(
                "causal-attention: q {q:?}, k {k:?}, v {v:?} for {nh} heads on {nkv} KV heads \
                 with {} row pads and RoPE tables of {:?} values",
                self.pads.len(),
                self.rope.as_ref().map(|(c, _)| c.elem_count())
            );
        }
        Ok(Dims {
            b,
            nh,
            nkv,
            s,
            hd: qw / nh,
        })
    }

    /// The rotated `[s, hd]` block of head `head` of row `bi` of `x` (`[b, s, heads * hd]`).
    fn rotated(
        &self,
        d: &Dims,
        x: &[f32],
        heads: usize,
        bi: usize,
        head: usize,
        cs: (&[f32], &[f32]),
    ) -> Vec<f32> {
        let (s, hd) = (d.s, d.hd);
        let half = hd / 2;
        let src = &x[bi * s * heads * hd + head * hd..];
        let (c, sn) = match cs.0.is_empty() {
            true => (cs.0, cs.1),
            false => (
                &cs.0[bi * s * half..][..s * half],
                &cs.1[bi * s * half..][..s * half],
            ),
        };
        // SAFETY: split_head writes every element of its [s, hd] block.
        unsafe {
            kernels::filled(s * hd, |o| {
                kernels::split_head(o, src, heads * hd, hd, c, sn)
            })
        }
    }

    /// The probabilities `[s, s]` of `q_h k_h^T` (rotated blocks) for row `bi`.
    fn probs(&self, d: &Dims, qh: &[f32], kh: &[f32], bi: usize) -> Vec<f32> {
        let (s, hd) = (d.s, d.hd);
        let scores = matmul((s, s, hd), Mat::rows(qh, hd), Mat::t(kh, hd), 1.0, false);
        let pad = self.pads[bi];
        // SAFETY: every row of the output is written by masked_softmax_row.
        unsafe {
            kernels::filled(s * s, |p| {
                for (i, (row, out)) in scores.chunks(s).zip(p.chunks_mut(s)).enumerate() {
                    kernels::masked_softmax_row(
                        out,
                        row,
                        self.scale,
                        first_key(pad, i, self.window),
                        i + 1,
                    );
                }
            })
        }
    }

    /// `f(cos, sin)` with the RoPE tables as slices (empty without RoPE).
    fn with_rope<R>(&self, f: impl FnOnce((&[f32], &[f32])) -> Result<R>) -> Result<R> {
        match &self.rope {
            Some((c, sn)) => with_f32(c, "causal-attention (cos)", |c| {
                with_f32(sn, "causal-attention (sin)", |sn| f((c, sn)))
            }),
            None => f((&[], &[])),
        }
    }

    /// Head `hh` of row `bi`: `y_h = P v_h`, written into `y` `[b, s, nh * hd]`.
    fn head_forward(
        &self,
        d: &Dims,
        (q, k, v): (&[f32], &[f32], &[f32]),
        cs: (&[f32], &[f32]),
        t: usize,
        y: Shared,
    ) {
        let (s, hd, nh, nkv) = (d.s, d.hd, d.nh, d.nkv);
        let (bi, hh) = (t / nh, t % nh);
        let g = hh / d.rep();
        let qr = self.rotated(d, q, nh, bi, hh, cs);
        let kr = self.rotated(d, k, nkv, bi, g, cs);
        let p = self.probs(d, &qr, &kr, bi);
        // v_h: s rows of hd values at row stride nkv*hd inside row bi of v
        let vh = Mat::strided(&v[bi * s * nkv * hd + g * hd..], nkv * hd);
        // SAFETY: this task writes columns hh*hd..(hh+1)*hd of row bi's s tokens of y, which no
        // other task writes.
        unsafe {
            let dst = y.at(bi * s * nh * hd + hh * hd);
            product_to(
                (s, hd, s),
                dst,
                nh * hd,
                false,
                Mat::rows(&p, s),
                vh,
                1.0,
                false,
            );
        }
    }
}

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(lq.shape(), lk.shape(), lv.shape())?;
        let qkv = (
            f32_slice(sq, lq, "causal-attention")?,
            f32_slice(sk, lk, "causal-attention")?,
            f32_slice(sv, lv, "causal-attention")?,
        );
        let mut y = vec![0f32; d.b * d.s * d.nh * d.hd];
        let out = Shared(y.as_mut_ptr());
        self.with_rope(|cs| {
            (0..d.b * d.nh)
                .into_par_iter()
                .for_each(|t| self.head_forward(&d, qkv, cs, t, out));
            Ok(())
        })?;
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.s, d.nh * d.hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(q.shape(), k.shape(), v.shape())?;
        let (dq, dk, dv) = with_f32(q, "causal-attention", |q| {
            with_f32(k, "causal-attention", |k| {
                with_f32(v, "causal-attention", |v| {
                    with_f32(dy, "causal-attention", |dy| {
                        self.with_rope(|cs| Ok(self.backward(&d, (q, k, v), dy, cs)))
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

impl CausalAttention {
    /// `dq`, `dk`, `dv` in the projections' layout (see the module doc).
    fn backward(
        &self,
        d: &Dims,
        (q, k, v): (&[f32], &[f32], &[f32]),
        dy: &[f32],
        cs: (&[f32], &[f32]),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (b, s, hd, nh, nkv, rep) = (d.b, d.s, d.hd, d.nh, d.nkv, d.rep());
        let head = s * hd;
        let half = hd / 2;
        // dq rotated back in place; dk, dv per query head (rotated for dk), summed below
        let mut dq = vec![0f32; b * s * nh * hd];
        let mut dk_h = vec![0f32; b * nh * head];
        let mut dv_h = vec![0f32; b * nh * head];
        let dq_out = Shared(dq.as_mut_ptr());
        dk_h.par_chunks_mut(head)
            .zip(dv_h.par_chunks_mut(head))
            .enumerate()
            .for_each(|(t, (dkh, dvh))| {
                let (bi, hh) = (t / nh, t % nh);
                let g = hh / rep;
                let qr = self.rotated(d, q, nh, bi, hh, cs);
                let kr = self.rotated(d, k, nkv, bi, g, cs);
                let p = self.probs(d, &qr, &kr, bi);
                // v_h, dy_h: s rows of hd values at their row stride inside row bi
                let vh = &v[bi * s * nkv * hd + g * hd..];
                let dyh = Mat::strided(&dy[bi * s * nh * hd + hh * hd..], nh * hd);
                // dv = P^T dy_h [s, hd]
                product((s, hd, s), dvh, false, Mat::t(&p, s), dyh, 1.0, false);
                // dP = dy_h v_h^T [s, s]
                let dp = matmul((s, s, hd), dyh, Mat::strided_t(vh, nkv * hd), 1.0, false);
                let mut ds = vec![0f32; s * s];
                for ((o, p), dp) in ds.chunks_mut(s).zip(p.chunks(s)).zip(dp.chunks(s)) {
                    kernels::softmax_row_bwd(o, p, dp, self.scale);
                }
                // dq (rotated) = dS k_r [s, hd]
                let dqr = matmul(
                    (s, hd, s),
                    Mat::rows(&ds, s),
                    Mat::rows(&kr, hd),
                    1.0,
                    false,
                );
                // dk (rotated) = dS^T q_r [s, hd]
                product(
                    (s, hd, s),
                    dkh,
                    false,
                    Mat::t(&ds, s),
                    Mat::rows(&qr, hd),
                    1.0,
                    false,
                );
                for i in 0..s {
                    // SAFETY: this task alone writes head hh's hd columns of row bi's tokens.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            dq_out.at((bi * s + i) * nh * hd + hh * hd),
                            hd,
                        )
                    };
                    let (c, sn) = match cs.0.is_empty() {
                        true => (cs.0, cs.1),
                        false => (
                            &cs.0[(bi * s + i) * half..][..half],
                            &cs.1[(bi * s + i) * half..][..half],
                        ),
                    };
                    kernels::merge_token(out, &dqr[i * hd..], hd, hd, c, sn);
                }
            });
        // each KV head's gradient: summed over the query heads that read it, rotated back
        let group = |h: &[f32], rotate: bool| -> Vec<f32> {
            let mut out = vec![0f32; b * s * nkv * hd];
            out.par_chunks_mut(nkv * hd).enumerate().for_each_init(
                || vec![0f32; hd],
                |sum, (row, o)| {
                    let (bi, i) = (row / s, row % s);
                    for (g, o) in o.chunks_mut(hd).enumerate() {
                        sum.fill(0.0);
                        for r in 0..rep {
                            let src = &h[(bi * nh + g * rep + r) * head + i * hd..][..hd];
                            for (a, x) in sum.iter_mut().zip(src) {
                                *a += x;
                            }
                        }
                        let (c, sn) = match rotate && !cs.0.is_empty() {
                            false => (&[][..], &[][..]),
                            true => (&cs.0[row * half..][..half], &cs.1[row * half..][..half]),
                        };
                        kernels::merge_token(o, sum, hd, hd, c, sn);
                    }
                },
            );
            out
        };
        (dq, group(&dk_h, true), group(&dv_h, false))
    }
}

/// Queries of one head per task of [`cached_attention`].
const QUERY_BLOCK: usize = 32;
/// Below this many multiply-adds [`cached_attention`] runs on one thread (a decode step's).
const ATTN_PARALLEL_MACS: usize = 1 << 18;

/// Inference attention over a KV cache (f32, CPU), without a graph: queries `q`
/// `[b, nh, s, hd]` (rotated) at positions `offset..offset + s` of the padded sequence, keys
/// and values `k`, `v` `[b, nkv, kv, hd]` with `kv == offset + s` (the cache after this chunk
/// was appended; each head's block `kcap`, `vcap >= kv` positions apart, as a cache's buffers
/// hold them), each row's left padding `pads` and an optional sliding `window`. Returns `y`
/// `[b, s, nh * hd]`, the heads merged as the output projection reads them.
///
/// Each task takes [`QUERY_BLOCK`] queries of one head and only the keys they may see (a
/// causal prefill skips the keys after its last query), computes their scores, the masked
/// softmax and the product with the values, and writes its rows of `y` in place: one pass
/// instead of candle's batched products, mask, softmax and transposes.
#[allow(clippy::too_many_arguments)]
pub(super) fn cached_attention(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (b, nh, nkv, s, hd): (usize, usize, usize, usize, usize),
    (kv, kcap, vcap): (usize, usize, usize),
    scale: f32,
    pads: &[usize],
    offset: usize,
    window: Option<usize>,
) -> Vec<f32> {
    assert!(
        q.len() == b * nh * s * hd
            && kcap >= kv
            && vcap >= kv
            && k.len() >= ((b * nkv).saturating_sub(1) * kcap + kv) * hd
            && v.len() >= ((b * nkv).saturating_sub(1) * vcap + kv) * hd
            && kv == offset + s
            && pads.len() == b
            && nkv > 0
            && nh % nkv == 0,
        "cached-attention: q {} k {} v {} values for [{b}, {nh}/{nkv}, {s}/{kv}, {hd}]",
        q.len(),
        k.len(),
        v.len()
    );
    let rep = nh / nkv;
    let blocks = s.div_ceil(QUERY_BLOCK);
    let mut y = vec![0f32; b * s * nh * hd];
    let out = Shared(y.as_mut_ptr());
    let task = |t: usize| {
        let (bh, qb) = (t / blocks, t % blocks);
        let (bi, hh) = (bh / nh, bh % nh);
        let g = hh / rep;
        let (i0, i1) = (qb * QUERY_BLOCK, (qb * QUERY_BLOCK + QUERY_BLOCK).min(s));
        let rows = i1 - i0;
        // the keys any of these queries sees: [lo, hi)
        let lo = super::ops::first_key(pads[bi], offset + i0, window);
        let hi = offset + i1;
        let keys = hi - lo;
        let qh = &q[(bh * s + i0) * hd..][..rows * hd];
        let kh = &k[((bi * nkv + g) * kcap + lo) * hd..][..keys * hd];
        let vh = &v[((bi * nkv + g) * vcap + lo) * hd..][..keys * hd];
        let scores = matmul(
            (rows, keys, hd),
            Mat::rows(qh, hd),
            Mat::t(kh, hd),
            1.0,
            false,
        );
        // SAFETY: every row of p is written by masked_softmax_row.
        let p = unsafe {
            kernels::filled(rows * keys, |p| {
                for (r, (o, row)) in p.chunks_mut(keys).zip(scores.chunks(keys)).enumerate() {
                    let pos = offset + i0 + r;
                    let first = super::ops::first_key(pads[bi], pos, window);
                    kernels::masked_softmax_row(o, row, scale, first - lo, pos + 1 - lo);
                }
            })
        };
        // SAFETY: this task alone writes columns hh*hd..(hh+1)*hd of rows i0..i1 of row bi
        // of y.
        unsafe {
            product_to(
                (rows, hd, keys),
                out.at((bi * s + i0) * nh * hd + hh * hd),
                nh * hd,
                false,
                Mat::rows(&p, keys),
                Mat::rows(vh, hd),
                1.0,
                false,
            );
        }
    };
    let tasks = b * nh * blocks;
    if b * nh * s * kv * hd < ATTN_PARALLEL_MACS {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::{attention_probs, first_key, split_heads, Scores};
    use crate::model::testing::{causal_mask, rel_diff, t};
    use candle_core::{DType, Var};

    /// Inference attention over a cache against a naive f64 softmax attention: a prefill that
    /// spans several query blocks (a partial last one, on the threads), a chunk after cached
    /// tokens and a single decoded token, with left padding, grouped heads and a sliding window.
    #[test]
    fn cached_attention_matches_naive_attention() {
        let (b, nh, nkv, hd) = (2usize, 4usize, 2usize, 16usize);
        let pads = [0usize, 4];
        let scale = 0.3f32;
        let val = |i: usize, seed: usize| (((i + seed) * 7919 % 211) as f32 - 105.0) / 80.0;
        for (offset, s) in [(0usize, 70usize), (5, 3), (39, 1)] {
            for window in [None, Some(9)] {
                let kv = offset + s;
                // a cache's buffers hold more positions than are filled
                let (kcap, vcap) = (kv + offset % 3, kv + offset % 5);
                let q: Vec<f32> = (0..b * nh * s * hd).map(|i| val(i, 1)).collect();
                let k: Vec<f32> = (0..b * nkv * kcap * hd).map(|i| val(i, 2)).collect();
                let v: Vec<f32> = (0..b * nkv * vcap * hd).map(|i| val(i, 3)).collect();
                let y = cached_attention(
                    (&q, &k, &v),
                    (b, nh, nkv, s, hd),
                    (kv, kcap, vcap),
                    scale,
                    &pads,
                    offset,
                    window,
                );
                let mut worst = 0f64;
                for bi in 0..b {
                    for h in 0..nh {
                        let g = h / (nh / nkv);
                        for i in 0..s {
                            let pos = offset + i;
                            let keys = first_key(pads[bi], pos, window)..pos + 1;
                            let qi = &q[((bi * nh + h) * s + i) * hd..][..hd];
                            let row = |j: usize, cap: usize| ((bi * nkv + g) * cap + j) * hd;
                            let sc: Vec<f64> = keys
                                .clone()
                                .map(|j| {
                                    let kj = &k[row(j, kcap)..][..hd];
                                    let dot: f64 =
                                        qi.iter().zip(kj).map(|(a, b)| (a * b) as f64).sum();
                                    dot * scale as f64
                                })
                                .collect();
                            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                            for c in 0..hd {
                                let want: f64 = keys
                                    .clone()
                                    .zip(&sc)
                                    .map(|(j, x)| (x - m).exp() / z * v[row(j, vcap) + c] as f64)
                                    .sum();
                                let got = y[(bi * s + i) * nh * hd + h * hd + c] as f64;
                                worst = worst.max((got - want).abs());
                            }
                        }
                    }
                }
                assert!(
                    worst < 1e-5,
                    "offset {offset}, {s} queries, window {window:?}: off by {worst}"
                );
            }
        }
    }

    /// The fused op (f32) against candle's composition in f64 (head split, RoPE, grouped heads,
    /// the mask tensor, the composed softmax): the output and the gradients of q, k and v in
    /// the projections' layout, with left padding, with and without RoPE and a sliding window.
    #[test]
    fn fused_attention_matches_the_composition_and_its_gradients() {
        let (b, nh, nkv, s, hd) = (2, 4, 2, 7, 8);
        let pads = vec![0usize, 3];
        let scale = 0.35;
        let (q, k, v) = (
            t(&[b, s, nh * hd], 1.0),
            t(&[b, s, nkv * hd], 2.0),
            t(&[b, s, nkv * hd], 3.0),
        );
        let (cos, sin) = (t(&[b, s, hd / 2], 5.0), t(&[b, s, hd / 2], 6.0));
        let c = t(&[b, s, nh * hd], 4.0);
        for (window, rope) in [(None, true), (Some(3), true), (None, false)] {
            let run = |dt: DType| {
                let vars: Vec<Var> = [&q, &k, &v]
                    .iter()
                    .map(|x| Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap())
                    .collect();
                let (q, k, v) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );
                let y = if dt == DType::F32 {
                    let op = CausalAttention {
                        heads: nh,
                        kv_heads: nkv,
                        scale: scale as f32,
                        pads: pads.clone(),
                        window,
                        rope: rope.then(|| (cos.clone(), sin.clone())),
                    };
                    q.apply_op3(k, v, op).unwrap()
                } else {
                    let mask = causal_mask(&pads, s, window).to_dtype(dt).unwrap();
                    let cs = (cos.to_dtype(dt).unwrap(), sin.to_dtype(dt).unwrap());
                    let cs = rope.then_some((&cs.0, &cs.1));
                    let q = split_heads(q, nh, cs, true).unwrap();
                    let k = split_heads(k, nkv, cs, true).unwrap();
                    let v = split_heads(v, nkv, None, true).unwrap();
                    let rep = nh / nkv;
                    let att = q
                        .reshape((b, nkv, rep * s, hd))
                        .unwrap()
                        .matmul(&k.t().unwrap())
                        .unwrap()
                        .reshape((b, nh, s, s))
                        .unwrap();
                    let how = Scores {
                        scale,
                        softcap: None,
                        window,
                    };
                    let p = attention_probs(&att, &how, Some(&mask), &pads, 0, true).unwrap();
                    p.reshape((b, nkv, rep * s, s))
                        .unwrap()
                        .matmul(&v)
                        .unwrap()
                        .reshape((b, nh, s, hd))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .reshape((b, s, nh * hd))
                        .unwrap()
                };
                let loss = (&y * c.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let mut out = vec![y.to_dtype(DType::F64).unwrap()];
                for x in &vars {
                    out.push(g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap());
                }
                out
            };
            let (f, c64) = (run(DType::F32), run(DType::F64));
            for (name, (f, c)) in ["y", "dq", "dk", "dv"].iter().zip(f.iter().zip(&c64)) {
                let r = rel_diff(f, c);
                assert!(
                    r < 1e-5,
                    "window {window:?}, rope {rope}: {name} differs by {r}"
                );
            }
        }
    }

    /// Shapes that do not fit (RoPE tables of another head size, heads that do not divide the
    /// width) are errors, not panics.
    #[test]
    fn mismatched_shapes_are_errors() {
        let (b, s, nh, nkv, hd) = (1, 5, 2, 1, 8);
        let (q, k) = (t(&[b, s, nh * hd], 1.0), t(&[b, s, nkv * hd], 2.0));
        let op = |heads: usize, half: usize| CausalAttention {
            heads,
            kv_heads: nkv,
            scale: 1.0,
            pads: vec![0],
            window: None,
            rope: Some((t(&[b, s, half], 3.0), t(&[b, s, half], 4.0))),
        };
        assert!(q.apply_op3(&k, &k, op(nh, hd / 2)).is_ok());
        let e = q.apply_op3(&k, &k, op(nh, hd / 2 - 1)).unwrap_err();
        assert!(e.to_string().contains("RoPE tables"), "{e}");
        assert!(q.apply_op3(&k, &k, op(3, hd / 2)).is_err());
    }
}
