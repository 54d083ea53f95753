//! Reading: ask a decoder questions about the target's activations on dialogs.
//!
//! For each dialog the target runs once (up to the read layer); its activations over the
//! patched span become the placeholders of one decoder prompt per question, and all questions
//! of the dialog are answered as one left-padded batch. Generation uses the KV cache: the
//! patches sit at prompt positions, so they are in the cached keys and values (the paper's code
//! turns the cache off and recomputes the whole prompt for every new token; the answers are the
//! same, see the tests).

use super::decoder::Decoder;
use super::format::{decoder_prompt, read_prompt, DecoderPrompt, ReadPrompt};
use super::loss::read_vectors;
use super::{Activations, Labels, ReadDialog};
use crate::chat::Message;
use crate::generate::{generate, GenOptions};
use crate::hooks::{HookPoint, Hooks, Patch, Positions};
use crate::{Error, Result};
use candle_core::Tensor;

/// How questions are answered. The default has no stop tokens; [`Decoder::ask_options`]
/// fills in the target's.
#[derive(Clone, Debug)]
pub struct AskOptions {
    /// Sampling and length of the answers. Each question samples with its own generator
    /// (seeded from `seed` and the question), so batching does not change answers.
    pub gen: GenOptions,
    /// Read this layer of the target instead of the decoder's trained one.
    pub read_layer: Option<usize>,
    /// Patch every position (the paper's reading code) instead of applying the verb mask of
    /// training (system prompt, or the turns before the second user turn, not patched).
    pub patch_all: bool,
    /// [`Activations::None`]: answer with nothing written at the placeholders (the
    /// no-activation baseline).
    pub activations: Activations,
}

impl Default for AskOptions {
    fn default() -> Self {
        AskOptions {
            gen: GenOptions {
                max_new_tokens: 64,
                ..GenOptions::default()
            },
            read_layer: None,
            patch_all: false,
            activations: Activations::Read,
        }
    }
}

/// The sampling seed of one question: answers depend on the seed and the question, not on
/// which other questions share the batch (FNV-1a over the text, mixed with the seed).
fn question_seed(seed: u64, question: &str) -> u64 {
    crate::rng::fnv1a(crate::rng::FNV_OFFSET ^ seed, question.as_bytes())
}

/// What the decoder saw of one dialog: the read prompt and the activations patched in.
#[derive(Clone, Debug)]
pub struct Reading {
    pub read: ReadPrompt,
    /// The target's block read.
    pub layer: usize,
    /// `[n_patch, d]`: the target's activations, in the order they are patched.
    pub vectors: Tensor,
}

impl Decoder {
    /// The read prompt of a dialog, as [`Decoder::read_dialog`] builds it.
    pub fn read_prompt(&self, dialog: &[Message], patch_all: bool) -> Result<ReadPrompt> {
        if dialog.is_empty() {
            return Err(Error::invalid("the dialog has no messages"));
        }
        let lm = &self.target;
        read_prompt(
            lm.template()?,
            &lm.tokenizer,
            &Self::read_dialog(dialog, patch_all),
        )
    }

    /// Run the target once on `dialog` and take the activations the decoder reads.
    pub fn read(
        &self,
        dialog: &[Message],
        patch_all: bool,
        read_layer: Option<usize>,
    ) -> Result<Reading> {
        let read = self.read_prompt(dialog, patch_all)?;
        self.read_prompt_at(read, read_layer)
    }

    /// [`Decoder::read`] of a read dialog as given (its mask and generation prompt kept).
    pub fn read_of(&self, dialog: &ReadDialog, read_layer: Option<usize>) -> Result<Reading> {
        let lm = &self.target;
        let read = read_prompt(lm.template()?, &lm.tokenizer, dialog)?;
        self.read_prompt_at(read, read_layer)
    }

    fn read_prompt_at(&self, read: ReadPrompt, read_layer: Option<usize>) -> Result<Reading> {
        let mut cfg = self.loss_config(false);
        cfg.layers = cfg.layers.with(read_layer, None);
        let vectors = read_vectors(&self.target.model, &[&read], &cfg, None)?
            .pop()
            .ok_or_else(|| Error::invalid("the target returned no activations"))?;
        Ok(Reading {
            read,
            layer: cfg.layers.read,
            vectors,
        })
    }

    /// The decoder prompt that asks `question` about `n_patch` activations of the target's
    /// block `read_layer`, ending with the decoder's generation prompt.
    pub fn question_prompt(
        &self,
        n_patch: usize,
        question: &str,
        read_layer: usize,
    ) -> Result<DecoderPrompt> {
        let lm = &self.target;
        decoder_prompt(
            lm.template()?,
            &lm.tokenizer,
            n_patch,
            &[(self.meta.question(question, read_layer), String::new())],
            Labels::LastAnswer,
            true,
        )
    }

    /// Answer each question about the activations of one reading, as one left-padded batch:
    /// the generated tokens of each answer (a final stop token included).
    /// [`Activations::None`] writes nothing at the placeholders.
    pub fn answer_tokens(
        &self,
        reading: &Reading,
        questions: &[String],
        gen: &GenOptions,
        activations: Activations,
    ) -> Result<Vec<Vec<u32>>> {
        if questions.is_empty() {
            return Ok(Vec::new());
        }
        let n = reading.read.n_patch();
        crate::hooks::check_finite(
            &format!(
                "the activations patched at the decoder's {}",
                HookPoint::resid_post(self.meta.layers.write)
            ),
            &reading.vectors,
        )?;
        let prompts = questions
            .iter()
            .map(|q| self.question_prompt(n, q, reading.layer))
            .collect::<Result<Vec<_>>>()?;
        let mut hooks = Hooks::new();
        for (r, p) in prompts.iter().enumerate() {
            if activations == Activations::None {
                break;
            }
            hooks.patches.push(Patch {
                point: HookPoint::resid_post(self.meta.layers.write),
                mode: self.meta.layers.inject.patch_mode(),
                value: reading.vectors.clone(),
                positions: Positions::List(p.write_positions.clone()),
                rows: Some(vec![r]),
            });
        }
        let ids: Vec<Vec<u32>> = prompts.into_iter().map(|p| p.ids).collect();
        let mut gen = gen.clone();
        gen.row_seeds = questions
            .iter()
            .map(|q| question_seed(gen.seed, q))
            .collect();
        generate(
            &self.model,
            &ids,
            self.target.pad_id(),
            &gen,
            Some(&mut hooks),
        )
    }

    /// [`AskOptions::default`] with the target's end-of-turn tokens as stop tokens.
    pub fn ask_options(&self) -> AskOptions {
        let mut o = AskOptions::default();
        o.gen.stop_ids = self.target.stop_ids();
        o
    }

    /// [`Decoder::answer_tokens`] as text (the stop token dropped, whitespace trimmed).
    pub fn answer(
        &self,
        reading: &Reading,
        questions: &[String],
        gen: &GenOptions,
        activations: Activations,
    ) -> Result<Vec<String>> {
        let stops = &gen.stop_ids;
        self.answer_tokens(reading, questions, gen, activations)?
            .iter()
            .map(|toks| {
                let toks: &[u32] = match toks.last() {
                    Some(t) if stops.contains(t) => &toks[..toks.len() - 1],
                    _ => toks,
                };
                Ok(self.target.tokenizer.decode(toks)?.trim().to_string())
            })
            .collect()
    }

    /// [`Decoder::ask`] as tokens: `tokens[i][j]` answers question `j` about dialog `i`.
    pub fn ask_tokens(
        &self,
        dialogs: &[Vec<Message>],
        questions: &[String],
        opts: &AskOptions,
    ) -> Result<Vec<Vec<Vec<u32>>>> {
        self.each_reading(dialogs, opts, |r| {
            self.answer_tokens(r, questions, &opts.gen, opts.activations)
        })
    }

    fn each_reading<T>(
        &self,
        dialogs: &[Vec<Message>],
        opts: &AskOptions,
        f: impl Fn(&Reading) -> Result<T>,
    ) -> Result<Vec<T>> {
        dialogs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                crate::interrupt::check()?;
                let reading = self
                    .read(d, opts.patch_all, opts.read_layer)
                    .map_err(|e| e.context(format!("dialog {i}")))?;
                f(&reading)
            })
            .collect()
    }

    /// Ask every question about every dialog: the target runs once per dialog, and the
    /// questions of a dialog are answered as one batch. `answers[i][j]` answers question `j`
    /// about dialog `i`.
    pub fn ask(
        &self,
        dialogs: &[Vec<Message>],
        questions: &[String],
        opts: &AskOptions,
    ) -> Result<Vec<Vec<String>>> {
        self.each_reading(dialogs, opts, |r| {
            self.answer(r, questions, &opts.gen, opts.activations)
        })
    }
}
