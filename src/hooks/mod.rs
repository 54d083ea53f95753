//! Hook points, named as TransformerLens names them, and the hooks that act there.
//!
//! A [`HookPoint`] is a named site in the forward pass (`blocks.15.hook_resid_post`). A hook can
//! *capture* the activation there (return it to the caller), *patch* it (replace it, or add to
//! it, at given positions of given batch rows: activation patching, steering vectors), or run a
//! Rust closure that returns a new tensor. A forward with no hooks pays nothing for them.
//!
//! Positions are token indices in a row's own (unpadded) sequence, so that a patch means the
//! same thing in a left-padded batch and in a single row, and during KV-cache generation.

use crate::{Error, Result};
use candle_core::{Tensor, D};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// What is hooked inside a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// Input of block i (`blocks.{i}.hook_resid_pre`).
    ResidPre,
    /// Output of block i's attention, before the residual add (`blocks.{i}.hook_attn_out`).
    AttnOut,
    /// Residual stream between attention and MLP (`blocks.{i}.hook_resid_mid`).
    ResidMid,
    /// Output of block i's MLP (`blocks.{i}.hook_mlp_out`).
    MlpOut,
    /// Output of block i (`blocks.{i}.hook_resid_post`; HF's `hidden_states[i + 1]`).
    ResidPost,
}

impl Site {
    /// Every block site, in forward order.
    pub const ALL: [Site; 5] = [
        Site::ResidPre,
        Site::AttnOut,
        Site::ResidMid,
        Site::MlpOut,
        Site::ResidPost,
    ];

    /// TransformerLens's name of the site inside `blocks.{i}.`.
    pub fn name(self) -> &'static str {
        match self {
            Site::ResidPre => "hook_resid_pre",
            Site::AttnOut => "hook_attn_out",
            Site::ResidMid => "hook_resid_mid",
            Site::MlpOut => "hook_mlp_out",
            Site::ResidPost => "hook_resid_post",
        }
    }
}

/// A named site in the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// Token embeddings, before block 0 (`hook_embed`).
    Embed,
    /// A site of block `layer` (`blocks.{layer}.hook_*`).
    Block(usize, Site),
    /// After the final RMSNorm, before the unembedding (`hook_final_norm`).
    FinalNorm,
}

impl HookPoint {
    pub fn embed() -> Self {
        HookPoint::Embed
    }
    pub fn final_norm() -> Self {
        HookPoint::FinalNorm
    }
    pub fn block(layer: usize, site: Site) -> Self {
        HookPoint::Block(layer, site)
    }
    pub fn resid_post(layer: usize) -> Self {
        HookPoint::Block(layer, Site::ResidPost)
    }

    /// Parse a TransformerLens-style name, checking the layer against `n_layers`.
    pub fn parse(name: &str, n_layers: usize) -> Result<Self> {
        let bad = || {
            Error::invalid(format!(
                "unknown hook point `{name}`: expected hook_embed, hook_final_norm or \
                 blocks.{{i}}.hook_{{resid_pre,attn_out,resid_mid,mlp_out,resid_post}} with i < {n_layers}"
            ))
        };
        match name {
            "hook_embed" => return Ok(HookPoint::Embed),
            "hook_final_norm" | "ln_final.hook_normalized" => return Ok(HookPoint::FinalNorm),
            _ => {}
        }
        let rest = name.strip_prefix("blocks.").ok_or_else(bad)?;
        let (idx, site) = rest.split_once('.').ok_or_else(bad)?;
        let layer: usize = idx.parse().map_err(|_| bad())?;
        if layer >= n_layers {
            return Err(Error::invalid(format!(
                "hook point `{name}`: layer {layer} is out of range, the model has {n_layers} layers (0..{})",
                n_layers.saturating_sub(1)
            )));
        }
        let site = Site::ALL
            .into_iter()
            .find(|s| s.name() == site)
            .ok_or_else(bad)?;
        Ok(HookPoint::Block(layer, site))
    }

    /// Every hook point of a model of `n_layers`, in forward order.
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let mut v = vec![HookPoint::Embed];
        v.extend((0..n_layers).flat_map(|i| Site::ALL.map(|s| HookPoint::Block(i, s))));
        v.push(HookPoint::FinalNorm);
        v
    }

    /// The last block this point needs run (used to stop a forward early).
    pub fn last_layer_needed(&self, n_layers: usize) -> usize {
        match *self {
            HookPoint::Block(l, _) => l,
            HookPoint::Embed => 0,
            HookPoint::FinalNorm => n_layers.saturating_sub(1),
        }
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => write!(f, "hook_embed"),
            HookPoint::FinalNorm => write!(f, "hook_final_norm"),
            HookPoint::Block(l, s) => write!(f, "blocks.{l}.{}", s.name()),
        }
    }
}

/// Replace the activation, or add to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchMode {
    /// `h <- v`.
    Replace,
    /// `h <- h + v`.
    Add,
    /// `h <- h + ||h|| v / ||v||` (norms over `d_model`, per position): `v`'s direction at the
    /// norm of the activation it joins (Activation Oracles' injection). A zero `v` adds nothing.
    AddNormMatched,
}

impl PatchMode {
    /// The script function that makes a patch of this mode.
    pub fn verb(self) -> &'static str {
        match self {
            PatchMode::Replace => "patch",
            PatchMode::Add => "add",
            PatchMode::AddNormMatched => "add_norm_matched",
        }
    }
}

/// Which positions of a row a patch touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Every position, including tokens generated later (a steering vector).
    All,
    /// These token indices of the row's own unpadded sequence, in this order.
    List(Vec<usize>),
}

impl Positions {
    /// The positions `relative` (`None`: all) in a row of `len` tokens; a negative position
    /// counts from the row's end (`-1` is its last token). A position outside the row is an
    /// error naming it.
    pub fn resolve(relative: Option<&[i64]>, len: usize) -> Result<Self> {
        let Some(ps) = relative else {
            return Ok(Positions::All);
        };
        ps.iter()
            .map(|&p| {
                let q = if p < 0 { len as i64 + p } else { p };
                if q < 0 || q as usize >= len {
                    Err(Error::invalid(format!(
                        "position {p} is outside the prompt of {len} tokens"
                    )))
                } else {
                    Ok(q as usize)
                }
            })
            .collect::<Result<_>>()
            .map(Positions::List)
    }
}

/// Replace or add a value at a hook point.
///
/// `value` is `[d]` (the same vector at every position) or `[n, d]` (one vector per listed
/// position, `n == positions.len()`). `rows` limits the patch to those batch rows (all when
/// `None`). The value may carry a gradient: patching is differentiable with respect to it.
#[derive(Clone, Debug)]
pub struct Patch {
    pub point: HookPoint,
    pub mode: PatchMode,
    pub value: Tensor,
    pub positions: Positions,
    pub rows: Option<Vec<usize>>,
}

/// A closure run at a hook point: gets the activation `[batch, seq, d]` and may return a new one.
pub type HookFn =
    Arc<dyn Fn(&HookPoint, &Tensor, &HookCtx) -> Result<Option<Tensor>> + Send + Sync>;

/// What a hook knows of the rows it sees.
#[derive(Clone, Debug)]
pub struct HookCtx {
    /// Left padding of each row.
    pub pads: Vec<usize>,
    /// Index, in the padded sequence, of the first column of this forward chunk (KV cache).
    pub offset: usize,
}

impl HookCtx {
    /// Column, in this chunk, of a row's unpadded token position, if the chunk holds it.
    pub fn column(&self, row: usize, pos: usize, chunk_len: usize) -> Option<usize> {
        let abs = self.pads[row] + pos;
        (abs >= self.offset && abs < self.offset + chunk_len).then(|| abs - self.offset)
    }
}

/// The hooks of one forward (or one generation).
#[derive(Default, Clone)]
pub struct Hooks {
    pub patches: Vec<Patch>,
    pub captures: Vec<HookPoint>,
    pub fns: Vec<(HookPoint, HookFn)>,
    /// Captured activations `[batch, seq, d]`, padded as the batch was. During KV-cache
    /// generation, chunks are concatenated along the sequence.
    pub captured: HashMap<HookPoint, Tensor>,
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn capture(mut self, p: HookPoint) -> Self {
        self.captures.push(p);
        self
    }
    pub fn patch(mut self, p: Patch) -> Self {
        self.patches.push(p);
        self
    }
    pub fn is_empty(&self) -> bool {
        self.patches.is_empty() && self.captures.is_empty() && self.fns.is_empty()
    }
    /// The last block that anything here needs.
    pub fn last_layer_needed(&self, n_layers: usize) -> usize {
        self.captures
            .iter()
            .map(|p| p.last_layer_needed(n_layers))
            .max()
            .unwrap_or(0)
    }
    /// Whether anything here acts at `p`.
    pub fn touches(&self, p: &HookPoint) -> bool {
        self.captures.contains(p)
            || self.patches.iter().any(|x| &x.point == p)
            || self.fns.iter().any(|(q, _)| q == p)
    }

    /// Run every hook registered at `point` on `x` (`[batch, seq, d]`).
    pub fn apply(&mut self, point: HookPoint, x: Tensor, ctx: &HookCtx) -> Result<Tensor> {
        if !self.touches(&point) {
            return Ok(x);
        }
        let mut x = x;
        for p in self.patches.iter().filter(|p| p.point == point) {
            x = apply_patch(p, &x, ctx)?;
        }
        for (q, f) in self.fns.iter() {
            if *q == point {
                if let Some(y) = f(&point, &x, ctx)? {
                    if y.dims() != x.dims() {
                        return Err(Error::invalid(format!(
                            "hook at {point} returned shape {:?}, expected {:?}",
                            y.dims(),
                            x.dims()
                        )));
                    }
                    x = y;
                }
            }
        }
        if self.captures.contains(&point) {
            let v = match self.captured.remove(&point) {
                Some(prev) => Tensor::cat(&[&prev, &x], 1)?,
                None => x.clone(),
            };
            self.captured.insert(point, v);
        }
        Ok(x)
    }
}

/// The index (one entry per dimension) and value of the first NaN or infinite element of `t`,
/// if any.
pub fn first_non_finite(t: &Tensor) -> Result<Option<(Vec<usize>, f32)>> {
    let flat: Vec<f32> = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    let Some(i) = flat.iter().position(|x| !x.is_finite()) else {
        return Ok(None);
    };
    let mut index = vec![0; t.rank()];
    let mut rest = i;
    for (k, &n) in t.dims().iter().enumerate().rev() {
        index[k] = rest % n;
        rest /= n;
    }
    Ok(Some((index, flat[i])))
}

/// An error naming `what` (the hook, the steering vector...) and the first bad index if `t`
/// holds a NaN or an infinity: such a value entering the model would silently turn every
/// later activation into NaN.
pub fn check_finite(what: &str, t: &Tensor) -> Result<()> {
    if t.dtype().is_int() {
        return Ok(());
    }
    match first_non_finite(t)? {
        None => Ok(()),
        Some((index, x)) => {
            let parts: Vec<String> = index.iter().map(usize::to_string).collect();
            Err(Error::invalid(format!(
                "{what}: the value holds {x} at index [{}] (shape {:?}); a non-finite value \
                 would turn every later activation into NaN",
                parts.join(", "),
                t.dims()
            )))
        }
    }
}

/// Apply one patch to `[batch, seq, d]`. Differentiable in both `x` and the patch value: rows
/// are rebuilt from slices with `cat`, never written in place.
fn apply_patch(p: &Patch, x: &Tensor, ctx: &HookCtx) -> Result<Tensor> {
    let (b, s, d) = x.dims3()?;
    // a value made elsewhere (a script's vector on the CPU) joins the model's device
    let value = p.value.to_device(x.device())?.to_dtype(x.dtype())?;
    let vdims = value.dims().to_vec();
    let per_pos = match vdims.as_slice() {
        [vd] if *vd == d => false,
        [n, vd] if *vd == d => {
            if let Positions::List(l) = &p.positions {
                if l.len() != *n {
                    return Err(Error::invalid(format!(
                        "patch at {}: value has {n} rows but {} positions were given",
                        p.point,
                        l.len()
                    )));
                }
            } else {
                return Err(Error::invalid(format!(
                    "patch at {}: a [n, d] value needs a list of n positions",
                    p.point
                )));
            }
            true
        }
        _ => {
            return Err(Error::invalid(format!(
            "patch at {}: value shape {:?} does not fit d_model {d} (expected [{d}] or [n, {d}])",
            p.point, vdims
        )))
        }
    };
    let rows: Vec<usize> = match &p.rows {
        Some(r) => r.clone(),
        None => (0..b).collect(),
    };
    if let Some(&r) = rows.iter().find(|&&r| r >= b) {
        return Err(Error::invalid(format!(
            "patch at {}: row {r} is out of range for a batch of {b}",
            p.point
        )));
    }
    let mut out_rows: Vec<Tensor> = Vec::with_capacity(b);
    let mut changed = false;
    for row in 0..b {
        let xr = x.get(row)?; // [s, d]
        if !rows.contains(&row) {
            out_rows.push(xr);
            continue;
        }
        // (column in chunk, value vector) pairs for this row
        let cols: Vec<(usize, Tensor)> = match &p.positions {
            Positions::All => {
                let start = ctx.pads[row].saturating_sub(ctx.offset).min(s);
                (start..s)
                    .map(|c| Ok((c, value.clone())))
                    .collect::<Result<_>>()?
            }
            Positions::List(list) => {
                let mut v = Vec::new();
                for (i, &pos) in list.iter().enumerate() {
                    if let Some(c) = ctx.column(row, pos, s) {
                        let val = if per_pos {
                            value.get(i)?
                        } else {
                            value.clone()
                        };
                        v.push((c, val));
                    }
                }
                v
            }
        };
        if cols.is_empty() {
            out_rows.push(xr);
            continue;
        }
        changed = true;
        out_rows.push(patch_row(&xr, cols, p.mode)?);
    }
    if !changed {
        return Ok(x.clone());
    }
    Ok(Tensor::stack(&out_rows, 0)?)
}

/// `h + ||h|| v / max(||v||, 1e-12)`, norms over the last dim (`[n, d]` each); differentiable
/// in both.
pub fn add_norm_matched(h: &Tensor, v: &Tensor) -> Result<Tensor> {
    let norm = |t: &Tensor| -> Result<Tensor> { Ok(t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?) };
    let scale = norm(h)?.broadcast_div(&norm(v)?.maximum(1e-12)?)?; // [n, 1]
    Ok((h + v.broadcast_mul(&scale)?)?)
}

/// Rebuild one row `[s, d]` with new vectors at the given columns, grouping contiguous runs.
fn patch_row(xr: &Tensor, mut cols: Vec<(usize, Tensor)>, mode: PatchMode) -> Result<Tensor> {
    let s = xr.dim(0)?;
    cols.sort_by_key(|(c, _)| *c);
    cols.dedup_by_key(|(c, _)| *c);
    let mut pieces: Vec<Tensor> = Vec::new();
    let mut cur = 0;
    let mut i = 0;
    while i < cols.len() {
        let start = cols[i].0;
        let mut end = start + 1;
        let mut run = vec![cols[i].1.unsqueeze(0)?];
        i += 1;
        while i < cols.len() && cols[i].0 == end {
            run.push(cols[i].1.unsqueeze(0)?);
            end += 1;
            i += 1;
        }
        if start > cur {
            pieces.push(xr.narrow(0, cur, start - cur)?);
        }
        let vals = Tensor::cat(&run, 0)?;
        let new = match mode {
            PatchMode::Replace => vals,
            PatchMode::Add => (xr.narrow(0, start, end - start)? + vals)?,
            PatchMode::AddNormMatched => {
                let h = xr.narrow(0, start, end - start)?; // [n, d]
                add_norm_matched(&h, &vals)?
            }
        };
        pieces.push(new);
        cur = end;
    }
    if cur < s {
        pieces.push(xr.narrow(0, cur, s - cur)?);
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

#[cfg(test)]
mod norm_matched_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The gradient of `w . (h + ||h|| v/||v||)` in `v` and `h`, against central differences.
    #[test]
    fn add_norm_matched_is_differentiable_in_v_and_h() {
        let dev = Device::Cpu;
        let hv: Vec<f64> = (0..12)
            .map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.7 + 0.1)
            .collect();
        let vv: Vec<f64> = (0..12)
            .map(|i| ((i * 3 % 7) as f64 - 3.0) * 1.3 + 0.2)
            .collect();
        let wv: Vec<f64> = (0..12).map(|i| ((i * 5 % 11) as f64 - 5.0) * 0.4).collect();
        let w = Tensor::from_vec(wv.clone(), (3, 4), &dev).unwrap();
        let f = |h: &[f64], v: &[f64]| -> f64 {
            let h = Tensor::from_vec(h.to_vec(), (3, 4), &dev).unwrap();
            let v = Tensor::from_vec(v.to_vec(), (3, 4), &dev).unwrap();
            let out = add_norm_matched(&h, &v).unwrap();
            (out * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = Var::from_vec(hv.clone(), (3, 4), &dev).unwrap();
        let v = Var::from_vec(vv.clone(), (3, 4), &dev).unwrap();
        let out = add_norm_matched(h.as_tensor(), v.as_tensor()).unwrap();
        let loss = (out * &w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        for (var, base, is_v) in [(&v, &vv, true), (&h, &hv, false)] {
            let grad: Vec<f64> = g
                .get(var.as_tensor())
                .expect("a gradient")
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for i in 0..12 {
                let eps = 1e-6;
                let (mut p, mut m) = (base.clone(), base.clone());
                p[i] += eps;
                m[i] -= eps;
                let fd = if is_v {
                    (f(&hv, &p) - f(&hv, &m)) / (2.0 * eps)
                } else {
                    (f(&p, &vv) - f(&m, &vv)) / (2.0 * eps)
                };
                assert!(
                    (grad[i] - fd).abs() < 1e-6,
                    "{} {i}: {} vs {fd}",
                    if is_v { "v" } else { "h" },
                    grad[i]
                );
            }
        }
    }
}
