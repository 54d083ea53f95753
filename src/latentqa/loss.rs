//! The LatentQA loss: the decoder's cross-entropy on its answer, given the target's activations
//! patched over its placeholders.
//!
//! For each example, the *target* model reads the read prompt; the residual stream after block
//! `read_layer` (`blocks.{read}.hook_resid_post`, HF's `hidden_states[read + 1]`) at the patch
//! positions is taken. The *decoder* runs on its prompt with those vectors replacing its
//! residual stream after block `write_layer` at the placeholder positions, and is scored on
//! the label tokens (the paper's `latent_qa`, with `module_setup =
//! "read-vary_write-fixed_n-fixed"`). Examples are batched with left padding; each row gets
//! positions `0..len` of its own (the paper's `shift_position_ids` only adds a constant offset
//! to all positions of a row, which RoPE does not see).
//!
//! Everything is differentiable when asked: in the decoder (training LatentQA's decoder, "LIT"),
//! and through the patched activations into the target (control: steering the target by
//! descending the decoder's loss on a desired answer).

use super::format::{DecoderPrompt, ReadPrompt};
use super::layers::LayerPlan;
use super::Activations;
use crate::hooks::{HookPoint, Hooks, Patch, Positions};
use crate::model::{token_nll, Input, Logits, Model};
use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// One example: what the target reads, and the decoder prompt its activations go into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchedExample {
    pub read: ReadPrompt,
    pub decoder: DecoderPrompt,
}

impl PatchedExample {
    /// Pair a read prompt with a decoder prompt, checking that the decoder has one placeholder
    /// per patched activation and that every label has a position before it.
    pub fn new(read: ReadPrompt, decoder: DecoderPrompt) -> Result<Self> {
        if read.patch_positions.len() != decoder.write_positions.len() {
            return Err(Error::invalid(format!(
                "the read prompt patches {} activations but the decoder prompt has {} \
                 placeholders",
                read.patch_positions.len(),
                decoder.write_positions.len()
            )));
        }
        let (rl, dl) = (read.ids.len(), decoder.ids.len());
        let bad_read = read
            .patch_positions
            .iter()
            .chain(read.first_from.iter())
            .find(|&&p| p >= rl);
        if let Some(p) = bad_read {
            return Err(Error::invalid(format!(
                "read position {p} is outside a read prompt of {rl} tokens"
            )));
        }
        if let Some(p) = decoder.write_positions.iter().find(|&&p| p >= dl) {
            return Err(Error::invalid(format!(
                "placeholder position {p} is outside a decoder prompt of {dl} tokens"
            )));
        }
        if let Some(t) = decoder.label_positions.iter().find(|&&t| t == 0 || t >= dl) {
            return Err(Error::invalid(format!(
                "label position {t} is not in 1..{dl} (a label is predicted from the position \
                 before it)"
            )));
        }
        Ok(PatchedExample { read, decoder })
    }
}

/// A batch of examples, run left-padded (read prompts in one target batch, decoder prompts in
/// one decoder batch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchedBatch {
    pub examples: Vec<PatchedExample>,
}

impl PatchedBatch {
    /// A batch of at least one example.
    pub fn new(examples: Vec<PatchedExample>) -> Result<Self> {
        if examples.is_empty() {
            return Err(Error::invalid(
                "a LatentQA batch needs at least one example",
            ));
        }
        Ok(PatchedBatch { examples })
    }

    /// The number of label tokens in the batch.
    pub fn n_label_tokens(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.decoder.label_positions.len())
            .sum()
    }
}

/// How the loss is computed.
#[derive(Clone, Debug)]
pub struct LossConfig {
    /// The target's block read (`blocks.{read}.hook_resid_post`) and the decoder's block
    /// overwritten at the placeholders.
    pub layers: LayerPlan,
    /// The token that left-pads both batches (masked out everywhere).
    pub pad_id: u32,
    /// Use differentiable ops in both forwards (needed for any backward).
    pub differentiable: bool,
    /// Keep the graph from the loss into the target (control/steering). When false the read
    /// activations are detached (training the decoder only).
    pub grad_through_target: bool,
    /// Apply [`ReadPrompt::first_from`] (the paper's `mask_verbs=True`, used in training).
    pub use_first_from: bool,
    /// LoRA dropout in the decoder's forward (training); `None` in evaluation.
    pub dropout: Option<crate::model::Dropout>,
    /// Recompute each block in the backward pass instead of keeping its intermediates
    /// ([`crate::model::recompute`]); the backward must be `recompute::backward`.
    pub recompute: bool,
}

/// The loss of a batch.
#[derive(Clone, Debug)]
pub struct LossOutput {
    /// Scalar f32: the mean NLL over all label tokens of the batch (as HF's loss on a padded
    /// batch: not the mean of the per-example means).
    pub loss: Tensor,
    /// The number of label tokens the mean is over.
    pub n_label_tokens: usize,
    /// Mean NLL of each example (NaN for an example without labels).
    pub per_example: Vec<f32>,
}

/// Per-token NLL of a batch's labels.
#[derive(Clone, Debug)]
pub struct TokenNll {
    /// `[n_label_tokens]` f32: each label token's NLL, examples in order, labels in position
    /// order.
    pub nll: Tensor,
    /// The number of label tokens of each example.
    pub counts: Vec<usize>,
}

/// Run the target on the batch's read prompts up to the read layer and return each example's
/// patch, `[n_patch, d]`: the read layer's output at [`ReadPrompt::patch_positions`], the first
/// taken from [`ReadPrompt::first_from`] when `cfg.use_first_from`. `target_hooks` run in the
/// target's forward (e.g. a steering vector, or an `Add` patch at the read layer), before the
/// activations are taken. Detached unless `cfg.grad_through_target`.
pub fn patch_vectors(
    target: &Model,
    batch: &PatchedBatch,
    cfg: &LossConfig,
    target_hooks: Option<&mut Hooks>,
) -> Result<Vec<Tensor>> {
    let reads: Vec<&ReadPrompt> = batch.examples.iter().map(|e| &e.read).collect();
    read_vectors(target, &reads, cfg, target_hooks)
}

/// [`patch_vectors`] for bare read prompts (reading needs no decoder prompt to get them):
/// one left-padded target forward up to `cfg.layers.read`.
pub fn read_vectors(
    target: &Model,
    reads: &[&ReadPrompt],
    cfg: &LossConfig,
    target_hooks: Option<&mut Hooks>,
) -> Result<Vec<Tensor>> {
    if reads.is_empty() {
        return Ok(Vec::new());
    }
    if cfg.layers.read >= target.n_layers() {
        return Err(Error::invalid(format!(
            "read layer {} is out of range: the target has {} layers",
            cfg.layers.read,
            target.n_layers()
        )));
    }
    let mut target_hooks = target_hooks;
    let mut patches = read_at(target, reads, cfg, target_hooks.as_deref_mut())?;
    if !cfg.layers.contrast {
        return Ok(patches);
    }
    // Contrast reading: masked reads minus the same stimulus read without the masked turns.
    let mut masked = Vec::new();
    let mut bases = Vec::new();
    for (i, r) in reads.iter().enumerate() {
        if r.verb_len == 0 {
            continue;
        }
        let Some(base) = &r.baseline else {
            return Err(Error::invalid(
                "contrast reading: the stimulus is not the same tokens without the masked \
                 turns (the template renders it differently), so nothing can be subtracted",
            ));
        };
        let shift = r.ids.len() - base.len();
        bases.push(ReadPrompt {
            ids: base.clone(),
            verb_len: 0,
            patch_positions: r.patch_positions.iter().map(|p| p - shift).collect(),
            first_from: r.first_from,
            baseline: None,
        });
        masked.push(i);
    }
    if masked.is_empty() {
        return Ok(patches);
    }
    let base_reads: Vec<&ReadPrompt> = bases.iter().collect();
    let base_patches = read_at(target, &base_reads, cfg, target_hooks)?;
    for (i, b) in masked.into_iter().zip(base_patches) {
        // The paper's first vector (taken from position 1, before any masked turn) carries
        // nothing the masked turns changed: zero.
        let delta = (&patches[i] - b)?; // [n_patch, d]
        patches[i] = match reads[i].first_from {
            Some(_) if cfg.use_first_from => {
                let (n, d) = delta.dims2()?;
                let zero = Tensor::zeros((1, d), delta.dtype(), delta.device())?;
                Tensor::cat(&[&zero, &delta.narrow(0, 1, n - 1)?], 0)?
            }
            _ => delta,
        };
    }
    Ok(patches)
}

/// One left-padded target forward up to `cfg.layers.read` on `reads`, gathered.
fn read_at(
    target: &Model,
    reads: &[&ReadPrompt],
    cfg: &LossConfig,
    target_hooks: Option<&mut Hooks>,
) -> Result<Vec<Tensor>> {
    let rows: Vec<Vec<u32>> = reads.iter().map(|r| r.ids.clone()).collect();
    let mut input =
        Input::left_padded(&rows, cfg.pad_id, target.device())?.with_logits(Logits::None);
    // The target needs differentiable ops only when the gradient flows into it (control); it
    // runs without LoRA dropout, as the paper leaves it in eval mode.
    input.differentiable = cfg.differentiable && cfg.grad_through_target;
    input.stop_after_layer = Some(cfg.layers.read);
    input.recompute = cfg.recompute;
    let hidden = target.forward(&input, None, target_hooks)?.hidden;
    let hidden = if cfg.grad_through_target {
        hidden
    } else {
        hidden.detach()
    };
    gather_patches(&hidden, &input.pads, reads, cfg.use_first_from)
}

/// Each read prompt's patch `[n_patch, d]` out of a left-padded `[batch, seq, d]` activation
/// (row `r` padded by `pads[r]`): [`ReadPrompt::patch_positions`], the first taken from
/// [`ReadPrompt::first_from`] when `use_first_from`. Differentiable in `hidden`.
pub fn gather_patches(
    hidden: &Tensor,
    pads: &[usize],
    reads: &[&ReadPrompt],
    use_first_from: bool,
) -> Result<Vec<Tensor>> {
    let (b, s, d) = hidden.dims3()?;
    let mut idx = Vec::new();
    let mut counts = Vec::with_capacity(b);
    for (r, read) in reads.iter().enumerate() {
        let pad = pads[r];
        for (j, &p) in read.patch_positions.iter().enumerate() {
            let p = match read.first_from {
                Some(f) if j == 0 && use_first_from => f,
                _ => p,
            };
            idx.push((r * s + pad + p) as u32);
        }
        counts.push(read.patch_positions.len());
    }
    let n = idx.len();
    let idx = Tensor::from_vec(idx, (n,), hidden.device())?;
    let all = hidden.reshape((b * s, d))?.index_select(&idx, 0)?;
    let mut out = Vec::with_capacity(b);
    let mut at = 0;
    for c in counts {
        out.push(all.narrow(0, at, c)?);
        at += c;
    }
    Ok(out)
}

/// Run the decoder on the batch's decoder prompts with `patches[i]` (`[n_patch_i, d]`) written
/// into example i's placeholders at `write_layer` (as `cfg.layers.inject` says), and return the
/// NLL of every label token (log-softmax in f32). Only label columns are unembedded.
/// `decoder_hooks` run too (the placeholder patches are added to them for this forward and
/// removed afterwards). `patches: None` writes nothing: the no-activation baseline, the same
/// prompts with the placeholders' own residual.
pub fn patched_token_nll(
    decoder: &Model,
    batch: &PatchedBatch,
    patches: Option<&[Tensor]>,
    cfg: &LossConfig,
    decoder_hooks: Option<&mut Hooks>,
) -> Result<TokenNll> {
    if cfg.layers.write >= decoder.n_layers() {
        return Err(Error::invalid(format!(
            "write layer {} is out of range: the decoder has {} layers",
            cfg.layers.write,
            decoder.n_layers()
        )));
    }
    if let Some(p) = patches.filter(|p| p.len() != batch.examples.len()) {
        return Err(Error::invalid(format!(
            "{} patches for {} examples",
            p.len(),
            batch.examples.len()
        )));
    }
    let counts: Vec<usize> = batch
        .examples
        .iter()
        .map(|e| e.decoder.label_positions.len())
        .collect();
    let total: usize = counts.iter().sum();
    if total == 0 {
        return Ok(TokenNll {
            nll: Tensor::zeros((0,), DType::F32, decoder.device())?,
            counts,
        });
    }
    let rows: Vec<Vec<u32>> = batch
        .examples
        .iter()
        .map(|e| e.decoder.ids.clone())
        .collect();
    let mut input = Input::left_padded(&rows, cfg.pad_id, decoder.device())?;
    input.differentiable = cfg.differentiable;
    input.recompute = cfg.recompute;
    let mut cols = Vec::with_capacity(rows.len());
    let mut targets = Vec::with_capacity(total);
    for (r, ex) in batch.examples.iter().enumerate() {
        let pad = input.pads[r];
        let dp = &ex.decoder;
        cols.push(
            dp.label_positions
                .iter()
                .map(|&t| pad + t - 1)
                .collect::<Vec<_>>(),
        );
        targets.extend(dp.label_positions.iter().map(|&t| dp.ids[t]));
    }
    input.logits = Logits::At(cols);

    let mut own = Hooks::new();
    let hooks = match decoder_hooks {
        Some(h) => h,
        None => &mut own,
    };
    let n_before = hooks.patches.len();
    for (r, (ex, value)) in batch
        .examples
        .iter()
        .zip(patches.unwrap_or_default())
        .enumerate()
    {
        if ex.decoder.write_positions.is_empty() {
            continue;
        }
        hooks.patches.push(Patch {
            point: HookPoint::resid_post(cfg.layers.write),
            mode: cfg.layers.inject.patch_mode(),
            value: value.clone(),
            positions: Positions::List(ex.decoder.write_positions.clone()),
            rows: Some(vec![r]),
        });
    }
    let out = decoder.forward(&input, None, Some(&mut *hooks));
    hooks.patches.truncate(n_before);
    let logits = out?
        .logits
        .ok_or_else(|| Error::invalid("the decoder returned no logits"))?;
    let nll = token_nll(&logits, &targets)?; // [total] f32
    Ok(TokenNll { nll, counts })
}

/// The LatentQA loss of a batch, with hooks in either model (see [`latentqa_loss`]).
pub fn latentqa_loss_with_hooks(
    target: &Model,
    decoder: &Model,
    batch: &PatchedBatch,
    cfg: &LossConfig,
    target_hooks: Option<&mut Hooks>,
    decoder_hooks: Option<&mut Hooks>,
) -> Result<LossOutput> {
    let patches = patch_vectors(target, batch, cfg, target_hooks)?;
    let tn = patched_token_nll(decoder, batch, Some(&patches), cfg, decoder_hooks)?;
    let n = tn.counts.iter().sum::<usize>();
    if n == 0 {
        return Err(Error::invalid(
            "the batch has no label tokens: the loss is undefined",
        ));
    }
    let loss = tn.nll.mean_all()?;
    let per_example = per_example_means(&tn)?;
    Ok(LossOutput {
        loss,
        n_label_tokens: n,
        per_example,
    })
}

/// The LatentQA loss: the target reads each read prompt, its activations at the read layer
/// replace the decoder's placeholders at `write_layer`, and the loss is the decoder's mean
/// NLL over all label tokens of the batch (log-softmax in f32).
pub fn latentqa_loss(
    target: &Model,
    decoder: &Model,
    batch: &PatchedBatch,
    cfg: &LossConfig,
) -> Result<LossOutput> {
    latentqa_loss_with_hooks(target, decoder, batch, cfg, None, None)
}

/// Per-token NLL of each example's labels (in label order), for reading and scoring answers.
/// With [`Activations::None`] the target does not run and nothing is written (the
/// no-activation baseline).
pub fn latentqa_token_nll(
    target: &Model,
    decoder: &Model,
    batch: &PatchedBatch,
    cfg: &LossConfig,
    activations: Activations,
) -> Result<Vec<Vec<f32>>> {
    let patches = match activations {
        Activations::Read => Some(patch_vectors(target, batch, cfg, None)?),
        Activations::None => None,
    };
    let tn = patched_token_nll(decoder, batch, patches.as_deref(), cfg, None)?;
    let all: Vec<f32> = tn.nll.detach().to_vec1()?;
    let mut out = Vec::with_capacity(tn.counts.len());
    let mut at = 0;
    for c in tn.counts {
        out.push(all[at..at + c].to_vec());
        at += c;
    }
    Ok(out)
}

fn per_example_means(tn: &TokenNll) -> Result<Vec<f32>> {
    let all: Vec<f32> = tn.nll.detach().to_vec1()?;
    let mut out = Vec::with_capacity(tn.counts.len());
    let mut at = 0;
    for &c in &tn.counts {
        let s: f64 = all[at..at + c].iter().map(|&x| x as f64).sum();
        out.push(if c == 0 {
            f32::NAN
        } else {
            (s / c as f64) as f32
        });
        at += c;
    }
    Ok(out)
}
