//! Optimisation for training a decoder: AdamW with checkpointable state, global gradient-norm
//! clipping, gradient accumulation over micro-batches, the cosine learning-rate schedule with
//! warm-up, and an exponential moving average (EMA) of the weights.
//!
//! Everything follows PyTorch's (and Hugging Face's) definitions, so that hyper-parameters from
//! the paper's code carry over unchanged:
//!
//! - [`AdamW`] is `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, no
//!   AMSGrad), one parameter group.
//! - [`clip_grad_norm`] is `torch.nn.utils.clip_grad_norm_` with the L2 norm.
//! - [`cosine_lr`] is `transformers.get_cosine_schedule_with_warmup`, with an optional floor.
//!
//! Updates are computed on detached tensors and written with [`Var::set`], so they never enter
//! an autograd graph. Optimizer and EMA state is kept in f32 for f32, f16 and bf16 variables and
//! in f64 for f64 variables ([`state_dtype`]): never less precise than f32.

use crate::util::atomic_write;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// The dtype optimizer and EMA state is kept in for a variable of dtype `dtype`: f64 for f64,
/// else f32.
pub fn state_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// A detached copy of a variable's current value that later [`Var::set`] calls cannot change
/// (a plain `detach` shares the variable's storage).
fn snapshot(var: &Var) -> Result<Tensor> {
    Ok(var.as_tensor().detach().copy()?)
}

/// AdamW's hyper-parameters (PyTorch's names and defaults, except `weight_decay`, whose
/// PyTorch default is also 0.01).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    fn default() -> Self {
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The AdamW optimizer (`torch.optim.AdamW`, one parameter group, no AMSGrad), with state that
/// can be saved and resumed bit-exactly.
///
/// For each variable `p` with gradient `g`, step `t` (counted from 1):
///
/// ```text
/// p ← p · (1 − lr·wd)
/// m ← β1·m + (1 − β1)·g
/// v ← β2·v + (1 − β2)·g²
/// p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + eps)
/// ```
///
/// A variable without a gradient in the [`GradStore`] is left alone (as PyTorch skips a
/// parameter whose `.grad` is `None`). The step count is shared by all variables, so a
/// variable that misses some steps gets the shared count's bias correction, where PyTorch keeps
/// a count per parameter; the two agree whenever every variable has a gradient at every step.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    /// First and second moments, one per variable, in [`state_dtype`].
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    params: AdamWParams,
    step: usize,
}

impl AdamW {
    /// An optimizer for named variables, with zero moments and step count 0. Names must be
    /// distinct (they key the saved state).
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<AdamW> {
        let mut seen = std::collections::HashSet::new();
        for (name, _) in &vars {
            if !seen.insert(name.as_str()) {
                return Err(Error::invalid(format!(
                    "AdamW: variable name `{name}` is given twice"
                )));
            }
        }
        let zeros = |var: &Var| var.zeros_like()?.to_dtype(state_dtype(var.dtype()));
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            params,
            step: 0,
        })
    }

    /// One AdamW step with the gradients in `grads` (see the type's docs).
    ///
    /// A NaN or infinite gradient is an error naming the variable and its first bad index, and
    /// nothing is updated (the run stops with its weights and checkpoint as they were).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        for (name, var) in &self.vars {
            if let Some(grad) = grads.get(var) {
                super::run::check_finite_grad(name, grad, self.step + 1)?;
            }
        }
        self.step += 1;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let t = self.step as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(var) else {
                continue;
            };
            if var.elem_count() == 0 {
                continue;
            }
            let sd = self.m[i].dtype();
            let g = grad.detach().to_dtype(sd)?;
            let p = var.as_tensor().detach().to_dtype(sd)?;
            let p = p.affine(1.0 - lr * weight_decay, 0.0)?;
            let m = (self.m[i].affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            let v = (self.v[i].affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let denom = (v.sqrt()? / bias2_sqrt)?.affine(1.0, eps)?;
            let p = (p - (m.div(&denom)? * step_size)?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Set the learning rate used by the next steps (e.g. from [`cosine_lr`]).
    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    pub fn lr(&self) -> f64 {
        self.params.lr
    }

    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    /// The number of steps taken (restored by [`AdamW::load_state`]).
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The variables, with their names.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The moments, keyed `"{name}.m"` and `"{name}.v"`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("{name}.m"), self.m[i].clone());
            out.insert(format!("{name}.v"), self.v[i].clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state_tensors`] and the step count. Every variable's
    /// two moments must be in `map`, with the variable's shape; other entries are ignored.
    /// Moments are moved to the variable's device and [`state_dtype`].
    pub fn load_state(&mut self, map: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut m = Vec::with_capacity(self.vars.len());
        let mut v = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (suffix, out) in [("m", &mut m), ("v", &mut v)] {
                let key = format!("{name}.{suffix}");
                let t = map
                    .get(&key)
                    .ok_or_else(|| Error::invalid(format!("AdamW state: no tensor `{key}`")))?;
                if t.dims() != var.dims() {
                    return Err(Error::invalid(format!(
                        "AdamW state: `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                out.push(
                    t.to_device(var.device())?
                        .to_dtype(state_dtype(var.dtype()))?
                        .detach(),
                );
            }
        }
        self.m = m;
        self.v = v;
        self.step = step;
        Ok(())
    }

    /// Save the moments and step count as one safetensors file (the step, the learning rate
    /// and the hyper-parameters in its metadata), written atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "lqa-adamw".to_string());
        meta.insert("step".to_string(), self.step.to_string());
        let p = &self.params;
        meta.insert(
            "params".to_string(),
            serde_json::json!({
                "lr": p.lr, "beta1": p.beta1, "beta2": p.beta2,
                "eps": p.eps, "weight_decay": p.weight_decay,
            })
            .to_string(),
        );
        save_safetensors(path, &self.state_tensors(), meta)
    }

    /// Restore the state saved by [`AdamW::save`] (moments and step count; the learning rate
    /// and hyper-parameters are this optimizer's own).
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let (map, meta) = load_safetensors(path)?;
        if meta.get("format").map(String::as_str) != Some("lqa-adamw") {
            return Err(Error::bad_file(path, "not an lqa AdamW state file"));
        }
        let step = meta
            .get("step")
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| Error::bad_file(path, "no valid `step` in the metadata"))?;
        self.load_state(&map, step)
            .map_err(|e| Error::bad_file(path, e))
    }
}

/// Write tensors and string metadata as a safetensors file, atomically.
fn save_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = safetensors::serialize(sorted, Some(meta))
        .map_err(|e| Error::bad_file(path, format!("cannot serialise: {e}")))?;
    atomic_write(path, &bytes)
}

/// Read a safetensors file's tensors (on the CPU) and metadata.
fn load_safetensors(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let map = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::bad_file(path, e))?;
    Ok((map, meta))
}

/// Clip gradients by their global L2 norm, as `torch.nn.utils.clip_grad_norm_`: the norm of
/// all the vars' gradients together (accumulated in f64; a var without a gradient counts as
/// zero) is computed, and when `max_norm / (norm + 1e-6) < 1` every gradient is multiplied by
/// that factor in place. Returns the norm before clipping.
///
/// A non-finite norm (a NaN or infinite gradient) is returned as is and the gradients are left
/// untouched: the caller should skip the step.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for var in vars {
        if let Some(g) = grads.get(var) {
            let sq = g.detach().to_dtype(DType::F64)?.sqr()?.sum_all()?;
            let sq = match &total {
                // the sums live on the gradients' devices; bring them together on the first
                Some(t) => (t + sq.to_device(t.device())?)?,
                None => sq,
            };
            total = Some(sq);
        }
    }
    let norm = match total {
        Some(t) => t.to_scalar::<f64>()?.sqrt(),
        None => 0.0,
    };
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.remove(var) {
                grads.insert(var, g.affine(coef, 0.0)?.detach());
            }
        }
    }
    Ok(norm)
}

/// Sums the gradients of a fixed list of variables over several micro-batches (keeping only
/// those, not the intermediate tensors' gradients a backward pass also returns), for gradient
/// accumulation:
///
/// ```ignore
/// let mut acc = GradAccumulator::new(&vars);
/// for micro in batch { acc.add(&loss(micro)?.backward()?)?; }
/// let grads = acc.mean()?;            // or acc.finish(1.0 / n_tokens)
/// clip_grad_norm(&mut grads, &vars, 1.0)?;
/// opt.step(&grads)?;
/// ```
///
/// Sums are kept in [`state_dtype`] (f32 for half-precision variables) and handed back in the
/// variables' dtype.
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    count: usize,
}

impl GradAccumulator {
    pub fn new(vars: &[Var]) -> GradAccumulator {
        GradAccumulator {
            vars: vars.to_vec(),
            sums: vec![None; vars.len()],
            count: 0,
        }
    }

    /// Add one micro-batch's gradients (variables without one are unchanged).
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(var) {
                let g = g.detach().to_dtype(state_dtype(var.dtype()))?;
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g,
                });
            }
        }
        self.count += 1;
        Ok(())
    }

    /// The number of [`GradAccumulator::add`] calls since the last finish.
    pub fn micro_batches(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The sums times `scale`, as a [`GradStore`] holding the variables that received a
    /// gradient; resets the accumulator.
    pub fn finish(&mut self, scale: f64) -> Result<GradStore> {
        let mut out = GradStore::default();
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                let s = if scale == 1.0 {
                    s
                } else {
                    s.affine(scale, 0.0)?
                };
                out.insert(var, s.to_dtype(var.dtype())?.detach());
            }
        }
        self.count = 0;
        Ok(out)
    }

    /// The mean over the micro-batches added ([`GradAccumulator::finish`] with `1 / n`).
    pub fn mean(&mut self) -> Result<GradStore> {
        let n = self.count.max(1);
        self.finish(1.0 / n as f64)
    }
}

/// The learning rate at `step` (from 0): a linear warm-up from 0 to `base_lr` over `warmup`
/// steps, then a cosine decay to `base_lr * min_ratio` at `total`, where it stays. With
/// `min_ratio = 0` this is `transformers.get_cosine_schedule_with_warmup` (before `total`).
pub fn cosine_lr(step: usize, base_lr: f64, warmup: usize, total: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return base_lr * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    base_lr * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// An exponential moving average of variables' values: `shadow ← decay·shadow + (1 − decay)·var`
/// at each [`Ema::update`]. [`Ema::swap`] exchanges the variables' values with the averages
/// (to evaluate or save the averaged weights; swap again to go back).
pub struct Ema {
    decay: f64,
    vars: Vec<(String, Var)>,
    /// One average per variable, in [`state_dtype`].
    shadow: Vec<Tensor>,
    /// Whether the variables currently hold the averages.
    swapped: bool,
}

impl Ema {
    /// Start the averages at the variables' current values.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Ema> {
        if !(0.0..=1.0).contains(&decay) {
            return Err(Error::invalid(format!(
                "EMA decay must be in [0, 1], got {decay}"
            )));
        }
        let shadow = vars
            .iter()
            .map(|(_, v)| Ok(snapshot(v)?.to_dtype(state_dtype(v.dtype()))?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Ema {
            decay,
            vars: vars.to_vec(),
            shadow,
            swapped: false,
        })
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Whether the variables hold the averages (after an odd number of [`Ema::swap`]s).
    pub fn is_swapped(&self) -> bool {
        self.swapped
    }

    /// Fold the variables' current values into the averages. An error while swapped (the
    /// variables hold the averages, not the trained values).
    pub fn update(&mut self) -> Result<()> {
        if self.swapped {
            return Err(Error::invalid(
                "EMA update while the averages are swapped in; swap back first",
            ));
        }
        for ((_, var), s) in self.vars.iter().zip(self.shadow.iter_mut()) {
            let x = var.as_tensor().detach().to_dtype(s.dtype())?;
            *s = (s.affine(self.decay, 0.0)? + x.affine(1.0 - self.decay, 0.0)?)?;
        }
        Ok(())
    }

    /// Exchange the variables' values and the averages.
    pub fn swap(&mut self) -> Result<()> {
        for ((_, var), s) in self.vars.iter().zip(self.shadow.iter_mut()) {
            let current = snapshot(var)?.to_dtype(s.dtype())?;
            var.set(&s.to_dtype(var.dtype())?)?;
            *s = current;
        }
        self.swapped = !self.swapped;
        Ok(())
    }

    /// The averages keyed by variable name (when swapped in, the values they stand in for).
    /// Not swapped, this is the averaged weights themselves, ready to save as the model's.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .zip(&self.shadow)
            .map(|((name, _), s)| (name.clone(), s.clone()))
            .collect()
    }

    /// Restore the averages from [`Ema::state_tensors`] (every variable's name must be in
    /// `map`, with its shape). Only allowed while not swapped.
    pub fn load_state(&mut self, map: &HashMap<String, Tensor>) -> Result<()> {
        if self.swapped {
            return Err(Error::invalid(
                "EMA load_state while swapped; swap back first",
            ));
        }
        let mut shadow = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            let t = map
                .get(name)
                .ok_or_else(|| Error::invalid(format!("EMA state: no tensor `{name}`")))?;
            if t.dims() != var.dims() {
                return Err(Error::invalid(format!(
                    "EMA state: `{name}` has shape {:?}, the variable {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            shadow.push(
                t.to_device(var.device())?
                    .to_dtype(state_dtype(var.dtype()))?
                    .copy()?,
            );
        }
        self.shadow = shadow;
        Ok(())
    }
}
