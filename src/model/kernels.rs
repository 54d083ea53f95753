//! Hand-written CPU loops for the inference hot paths that candle runs as several passes: the
//! SwiGLU gate and the masked, scaled softmax of attention scores. Both need `exp`, which glibc
//! computes one scalar at a time (4 % of a prefill on the default model); here it is a
//! branch-free polynomial that the compiler vectorises, and each loop is compiled a second time
//! for AVX2+FMA, picked at run time.

use std::mem::MaybeUninit;

/// `e^x` to about 1 ulp for `x` in `[-86, 88]`; inputs outside are clamped (below: about
/// 4e-38 instead of a smaller number; callers that need exact zeros write them).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // e^x = 2^n e^r with n = round(x log2 e), |r| <= ln2/2 (Cody-Waite split of ln2), and the
    // Cephes minimax polynomial for e^r.
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer and leaves n in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-86.0, 88.0);
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let n_bits = t.to_bits().wrapping_sub(SHIFT.to_bits());
    let y = f32::from_bits(er.to_bits().wrapping_add(n_bits << 23));
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// A vector of `n` values written by `fill`: saves zeroing memory that is overwritten at once.
///
/// # Safety
/// `fill` must write every one of the `n` values.
pub unsafe fn filled(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    fill(&mut v.spare_capacity_mut()[..n]);
    // SAFETY: `fill` initialised all `n` values (this function's contract).
    unsafe { v.set_len(n) };
    v
}

/// Run `$body` (a block using the function's arguments) compiled for AVX2+FMA when the CPU has
/// them, generic otherwise.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn generic($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    generic($($a),*)
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            generic($($a),*)
        }
    };
}

multiversion! {
    /// `out = silu(g) * u`, elementwise (`out` may be uninitialised: every element is written).
    pub fn silu_mul(out: &mut [MaybeUninit<f32>], g: &[f32], u: &[f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(g).zip(u) {
            o.write(x / (1.0 + exp(-x)) * y);
        }
    }
}

multiversion! {
    /// The gradients of [`silu_mul`] given the output's `dy`: with `sig = sigmoid(g)`,
    /// `dg = dy u sig (1 + g (1 - sig))` and `du = dy g sig`.
    pub fn silu_mul_bwd(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        for i in 0..dg.len() {
            let (x, d) = (g[i], dy[i]);
            let sig = 1.0 / (1.0 + exp(-x));
            dg[i] = d * u[i] * sig * (1.0 + x * (1.0 - sig));
            du[i] = d * x * sig;
        }
    }
}

/// Lanes of the manual reductions (float reductions do not vectorise on their own).
const LANES: usize = 16;

multiversion! {
    /// Softmax of `scale * row` (`scale > 0`) over the keys `lo..hi`; the other entries of
    /// `out` get 0 (`out` may be uninitialised: every element is written).
    pub fn masked_softmax_row(out: &mut [MaybeUninit<f32>], row: &[f32], scale: f32, lo: usize, hi: usize) {
        let keys = &row[lo..hi];
        let mut m = [f32::NEG_INFINITY; LANES];
        let chunks = keys.chunks_exact(LANES);
        let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for c in chunks {
            for (m, &v) in m.iter_mut().zip(c) {
                *m = m.max(v);
            }
        }
        max = m.iter().fold(max, |a, &b| a.max(b)) * scale;
        let (head, rest) = out.split_at_mut(lo);
        let (mid, tail) = rest.split_at_mut(hi - lo);
        for o in head.iter_mut().chain(tail.iter_mut()) {
            o.write(0.0);
        }
        for (o, &v) in mid.iter_mut().zip(keys) {
            o.write(exp(v * scale - max));
        }
        // SAFETY: every element of `mid` was written just above.
        let mid = unsafe { &mut *(mid as *mut [MaybeUninit<f32>] as *mut [f32]) };
        let mut acc = [0f32; LANES];
        let chunks = mid.chunks_exact(LANES);
        let mut sum: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        sum += acc.iter().sum::<f32>();
        let inv = 1.0 / sum;
        for o in mid.iter_mut() {
            *o *= inv;
        }
    }
}

multiversion! {
    /// RMSNorm of one row: `out = x / sqrt(mean(x^2) + eps) * w` (`out` may be uninitialised).
    pub fn rms_norm_row(out: &mut [MaybeUninit<f32>], x: &[f32], w: &[f32], eps: f32) {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let mut sum: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v * v;
            }
        }
        sum += acc.iter().sum::<f32>();
        let m = (sum / x.len() as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
            o.write(v / m * w);
        }
    }
}

multiversion! {
    /// One head of one sequence, from the projection's layout to the attention layout: token
    /// `i`'s `hd` values at `x[i * stride..]` go to `out[i * hd..]`, rotated by half-rotation
    /// RoPE with `cos`/`sin` (`[s, hd/2]`, as candle's `rope` computes it) unless they are
    /// empty (`out` may be uninitialised).
    pub fn split_head(out: &mut [MaybeUninit<f32>], x: &[f32], stride: usize, hd: usize, cos: &[f32], sin: &[f32]) {
        let half = hd / 2;
        for (i, o) in out.chunks_exact_mut(hd).enumerate() {
            let src = &x[i * stride..][..hd];
            if cos.is_empty() {
                for (o, &v) in o.iter_mut().zip(src) {
                    o.write(v);
                }
                continue;
            }
            let (c, sn) = (&cos[i * half..][..half], &sin[i * half..][..half]);
            let (x1, x2) = src.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            for j in 0..half {
                o1[j].write(x1[j] * c[j] - x2[j] * sn[j]);
                o2[j].write(x1[j] * sn[j] + x2[j] * c[j]);
            }
        }
    }
}

multiversion! {
    /// The input gradient of [`rms_norm_row`]: with `r = 1 / sqrt(mean(x^2) + eps)`,
    /// `dx = r (w dy) - x r^3 mean(w dy x)`, added to `dx` when `add`.
    pub fn rms_norm_row_bwd(dx: &mut [f32], x: &[f32], w: &[f32], dy: &[f32], eps: f32, add: bool) {
        let (mut acc, mut dot) = ([0f32; LANES], [0f32; LANES]);
        let n = x.len();
        let body = n - n % LANES;
        for i in (0..body).step_by(LANES) {
            for l in 0..LANES {
                let v = x[i + l];
                acc[l] += v * v;
                dot[l] += w[i + l] * dy[i + l] * v;
            }
        }
        let (mut sum, mut wdx) = (0f32, 0f32);
        for i in body..n {
            sum += x[i] * x[i];
            wdx += w[i] * dy[i] * x[i];
        }
        sum += acc.iter().sum::<f32>();
        wdx += dot.iter().sum::<f32>();
        let r = 1.0 / (sum / n as f32 + eps).sqrt();
        let c = r * r * r * wdx / n as f32;
        match add {
            true => {
                for i in 0..n {
                    dx[i] += r * w[i] * dy[i] - x[i] * c;
                }
            }
            false => {
                for i in 0..n {
                    dx[i] = r * w[i] * dy[i] - x[i] * c;
                }
            }
        }
    }
}

multiversion! {
    /// The scores' gradient of one row of [`masked_softmax_row`] from its output `p` and the
    /// output's gradient `dp`: `scale p (dp - sum(p dp))` (zero where `p` is).
    pub fn softmax_row_bwd(ds: &mut [f32], p: &[f32], dp: &[f32], scale: f32) {
        let mut acc = [0f32; LANES];
        let n = p.len();
        let body = n - n % LANES;
        for i in (0..body).step_by(LANES) {
            for l in 0..LANES {
                acc[l] += p[i + l] * dp[i + l];
            }
        }
        let mut dot: f32 = (body..n).map(|i| p[i] * dp[i]).sum();
        dot += acc.iter().sum::<f32>();
        for i in 0..n {
            ds[i] = scale * p[i] * (dp[i] - dot);
        }
    }
}

multiversion! {
    /// The input gradient of [`split_head`] for one token: `dy` holds the token's `hd` values
    /// of each head at `dy[head * head_stride..]`; they go to `out` (`[heads * hd]`) rotated
    /// back (the transpose of the rotation: `sin` negated) unless `cos`/`sin` (`[hd/2]`) are
    /// empty.
    pub fn merge_token(out: &mut [f32], dy: &[f32], head_stride: usize, hd: usize, cos: &[f32], sin: &[f32]) {
        let half = hd / 2;
        for (head, o) in out.chunks_exact_mut(hd).enumerate() {
            let src = &dy[head * head_stride..][..hd];
            if cos.is_empty() {
                o.copy_from_slice(src);
                continue;
            }
            let (d1, d2) = src.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            for j in 0..half {
                o1[j] = d1[j] * cos[j] + d2[j] * sin[j];
                o2[j] = d2[j] * cos[j] - d1[j] * sin[j];
            }
        }
    }
}

multiversion! {
    /// `lse = log(sum(e^x))` over one row, the log-softmax's normaliser (`-inf` for an empty
    /// row).
    pub fn log_sum_exp_row(x: &[f32], lse: &mut f32) {
        let mut m = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for c in chunks {
            for (m, &v) in m.iter_mut().zip(c) {
                *m = m.max(v);
            }
        }
        max = m.iter().fold(max, |a, &b| a.max(b));
        if !max.is_finite() {
            *lse = max;
            return;
        }
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let mut sum: f32 = chunks.remainder().iter().map(|&v| exp(v - max)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += exp(v - max);
            }
        }
        sum += acc.iter().sum::<f32>();
        *lse = max + sum.ln();
    }
}

multiversion! {
    /// The logits' gradient of one row's `lse - x[target]` scaled by `g`:
    /// `dx = g (softmax(x) - onehot(target))`, with `softmax(x) = e^(x - lse)`.
    pub fn nll_row_bwd(dx: &mut [f32], x: &[f32], lse: f32, target: usize, g: f32) {
        for (d, &v) in dx.iter_mut().zip(x) {
            *d = g * exp(v - lse);
        }
        dx[target] -= g;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_on_its_range() {
        let mut worst = 0f64;
        let mut x = -86.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        // clamped, finite, and tiny or huge as they should be
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn masked_softmax_sums_to_one_over_its_keys_and_is_zero_elsewhere() {
        let row: Vec<f32> = (0..10).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let mut out = vec![MaybeUninit::new(f32::NAN); 10];
        masked_softmax_row(&mut out, &row, 0.5, 2, 7);
        let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        let e: Vec<f64> = (2..7).map(|j| (row[j] as f64 * 0.5).exp()).collect();
        let z: f64 = e.iter().sum();
        for j in 0..10 {
            let want = if (2..7).contains(&j) {
                e[j - 2] / z
            } else {
                0.0
            };
            assert!(
                (out[j] as f64 - want).abs() < 1e-6,
                "key {j}: {} vs {want}",
                out[j]
            );
        }
    }

    #[test]
    fn silu_mul_matches_the_formula() {
        let g: Vec<f32> = (0..100).map(|i| i as f32 * 0.37 - 20.0).collect();
        let u: Vec<f32> = (0..100).map(|i| 1.0 + i as f32 * 0.01).collect();
        let mut out = vec![MaybeUninit::new(f32::NAN); 100];
        silu_mul(&mut out, &g, &u);
        let out: Vec<f32> = out.iter().map(|v| unsafe { v.assume_init() }).collect();
        for i in 0..100 {
            let x = g[i] as f64;
            let want = x / (1.0 + (-x).exp()) * u[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{i}"
            );
        }
    }
}
