//! Text generation: greedy or sampled (temperature, top-p, seed), batched with left padding,
//! with a KV cache (or full recomputation, to check the cache), stopping on end tokens. Hooks
//! stay in force: a patch at prompt positions is in the cached keys/values; a patch at all
//! positions (a steering vector) also acts on every new token.

use crate::hooks::Hooks;
use crate::model::{Input, KvCache, Logits, Model};
use crate::rng::{Rng, SeedableRng, StdRng};
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};

#[derive(Clone, Debug)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling threshold (1 = off).
    pub top_p: f64,
    pub seed: u64,
    /// One seed per batch row, so that a row samples the same tokens whatever else is in the
    /// batch. Empty: all rows share one generator seeded with `seed`.
    pub row_seeds: Vec<u64>,
    /// Generation of a row stops after it emits one of these (the token is kept).
    pub stop_ids: Vec<u32>,
    /// Use the KV cache (default). Without it every step recomputes the whole sequence.
    pub use_cache: bool,
    /// The type the KV cache stores keys and values in (`F16`/`BF16`: half the bytes of f32,
    /// each rounded once as it is stored); `None`: the model's compute type.
    pub kv_dtype: Option<DType>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            row_seeds: vec![],
            stop_ids: vec![],
            use_cache: true,
            kv_dtype: None,
        }
    }
}

/// Pick the next token from one row's logits `[vocab]`.
fn pick(logits: &[f32], opts: &GenOptions, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            })
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let t = opts.temperature as f32;
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l - max) / t).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    if !total.is_finite() || total <= 0.0 {
        return argmax();
    }
    probs.iter_mut().for_each(|p| p.1 /= total);
    if opts.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            acc += p.1;
            if acc >= opts.top_p as f32 {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep);
        let s: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= s);
    }
    let r: f32 = rng.gen();
    let mut acc = 0.0;
    for (i, p) in &probs {
        acc += p;
        if r < acc {
            return *i as u32;
        }
    }
    probs.last().map(|p| p.0 as u32).unwrap_or_else(argmax)
}

/// Generate continuations of each prompt (token ids). Returns the new tokens of each row.
pub fn generate(
    model: &Model,
    prompts: &[Vec<u32>],
    pad_id: u32,
    opts: &GenOptions,
    mut hooks: Option<&mut Hooks>,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let mut out: Vec<Vec<u32>> = vec![vec![]; b];
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut done = vec![false; b];
    if !opts.row_seeds.is_empty() && opts.row_seeds.len() != b {
        return Err(Error::invalid(format!(
            "{} row seeds for a batch of {b}",
            opts.row_seeds.len()
        )));
    }
    let mut shared = StdRng::seed_from_u64(opts.seed);
    let mut own: Vec<StdRng> = opts
        .row_seeds
        .iter()
        .map(|&s| StdRng::seed_from_u64(s))
        .collect();
    let mut input = Input::left_padded(prompts, pad_id, model.device())?.with_logits(Logits::Last);
    let pads = input.pads.clone();
    let mut cache = KvCache::with_dtype(model.n_layers(), opts.kv_dtype);
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    for step in 0..opts.max_new_tokens {
        crate::interrupt::check()?;
        let logits = if opts.use_cache {
            model.forward(&input, Some(&mut cache), hooks.as_deref_mut())?
        } else {
            if let Some(h) = hooks.as_deref_mut() {
                h.captured.clear();
            }
            let full = Input::left_padded(&seqs, pad_id, model.device())?.with_logits(Logits::Last);
            model.forward(&full, None, hooks.as_deref_mut())?
        }
        .logits
        .ok_or_else(|| Error::invalid("no logits"))?;
        // Greedy on a GPU: the argmax there, so that only the token ids come back, not
        // [batch, vocab] logits each step.
        let on_device = opts.temperature <= 0.0 && !logits.device().is_cpu();
        let (rows, argmax): (Vec<Vec<f32>>, Vec<u32>) = if on_device {
            (vec![], logits.argmax(D::Minus1)?.to_vec1()?)
        } else {
            (logits.to_dtype(DType::F32)?.to_vec2()?, vec![])
        };
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            let tok = if done[r] {
                pad_id
            } else if on_device {
                argmax[r]
            } else {
                let rng = if own.is_empty() {
                    &mut shared
                } else {
                    &mut own[r]
                };
                pick(&rows[r], opts, rng)
            };
            if !done[r] {
                out[r].push(tok);
                seqs[r].push(tok);
                if opts.stop_ids.contains(&tok) {
                    done[r] = true;
                }
            }
            next.push(tok);
        }
        if done.iter().all(|&d| d) || step + 1 == opts.max_new_tokens {
            break;
        }
        let offset = input.offset + input.ids.dim(1)?;
        input = Input {
            ids: Tensor::from_vec(next, (b, 1), model.device())?,
            pads: pads.clone(),
            offset,
            logits: Logits::Last,
            differentiable: false,
            stop_after_layer: None,
            dropout: None,
            recompute: false,
        };
    }
    Ok(out)
}
