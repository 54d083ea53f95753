//! A trained decoder as a user holds it: the target model, the decoder (the target's weights
//! plus a LoRA adapter), and the layers it reads and writes. Scores answers to questions about
//! the target's activations on a dialog.

use super::format::{decoder_prompt, layer_question, read_prompt};
use super::layers::{Injection, LayerPlan};
use super::loss::{latentqa_token_nll, LossConfig, PatchedBatch, PatchedExample};
use super::{Activations, Labels, ReadDialog, VerbMask};
use crate::chat::Message;
use crate::lm::LanguageModel;
use crate::lora::Adapter;
use crate::model::Model;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `lqa_decoder.json`, written next to a decoder's PEFT files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecoderMeta {
    /// The model the decoder was trained on (and reads).
    pub base_model: String,
    /// Written flat, as `read_layer`, `write_layer` and `injection`.
    #[serde(flatten)]
    pub layers: LayerPlan,
    /// The read layers the decoder was trained on, when more than one: its prompts then name
    /// the layer they carry (`"Layer: L"`, see [`layer_question`]), and `layers.read` is the
    /// one read by default. Empty: `layers.read` alone, unnamed (the paper's decoders).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_layers: Vec<usize>,
}

impl DecoderMeta {
    /// The metadata of a decoder trained on `read_layers` (the middle one read by default).
    pub fn new(base_model: &str, read_layers: &[usize], write: usize, inject: Injection) -> Self {
        let mut layers: Vec<usize> = read_layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        let read = layers
            .get(layers.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(0);
        DecoderMeta {
            base_model: base_model.to_string(),
            layers: LayerPlan::new(read, write).injecting(inject),
            read_layers: if layers.len() > 1 { layers } else { Vec::new() },
        }
    }

    /// Whether the decoder's prompts name the read layer.
    pub fn names_layer(&self) -> bool {
        self.read_layers.len() > 1
    }

    /// `question` as this decoder is asked it about activations of `read_layer`.
    pub fn question(&self, question: &str, read_layer: usize) -> String {
        layer_question(self.names_layer().then_some(read_layer), question)
    }
}

pub const META_FILE: &str = "lqa_decoder.json";

/// The decoder shipped for `model_name` (`decoders/MODEL/`, found as in [`crate::assets`]).
pub fn shipped_decoder_dir(model_name: &str) -> Option<PathBuf> {
    crate::assets::decoder_dir(model_name, None)
}

/// The decoder shipped for `model_name`, looked for next to the script in `script_dir` first;
/// an error saying how to get one when there is none.
pub fn find_shipped_decoder(model_name: &str, script_dir: Option<&Path>) -> Result<PathBuf> {
    crate::assets::decoder_dir(model_name, script_dir).ok_or_else(|| {
        Error::invalid(format!(
            "no decoder is shipped for `{model_name}`: train one with scripts/train_decoder.rhai \
             and pass its directory"
        ))
    })
}

pub struct Decoder {
    pub target: Arc<LanguageModel>,
    /// The decoder: the target's weights with the adapter folded in (frozen; on quantized
    /// weights the adapter stays unmerged).
    pub model: Model,
    pub meta: DecoderMeta,
    pub path: PathBuf,
}

impl Decoder {
    /// Load the decoder at `dir` (PEFT files + `lqa_decoder.json`), or the shipped one for the
    /// target when `dir` is `None`.
    pub fn load(target: Arc<LanguageModel>, dir: Option<&Path>) -> Result<Self> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => find_shipped_decoder(&target.name, None)?,
        };
        let meta_path = dir.join(META_FILE);
        let meta: DecoderMeta = if meta_path.exists() {
            let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
            serde_json::from_str(&text).map_err(|e| Error::bad_file(&meta_path, e))?
        } else {
            // a plain PEFT adapter: the paper's layers scaled to this model
            DecoderMeta {
                base_model: target.name.clone(),
                layers: LayerPlan::default_for(target.model.n_layers()),
                read_layers: Vec::new(),
            }
        };
        let n = target.model.n_layers();
        if let Some(l) = meta.read_layers.iter().find(|&&l| l >= n) {
            return Err(Error::bad_file(
                &meta_path,
                format!("read layer {l} of `read_layers` does not fit a model of {n} layers"),
            ));
        }
        if let Err(e) = meta.layers.check(n) {
            return Err(Error::bad_file(&meta_path, e));
        }
        let mut model = target.model.clone();
        let adapter = Adapter::load_peft(&dir, &model)?;
        adapter.attach(&mut model)?;
        // the decoder is frozen once trained: fold the adapter into its weights (float
        // weights only: a quantized weight keeps it unmerged, see `Adapter::merged`)
        let model = Adapter::merged(&model)?;
        Ok(Decoder {
            target,
            model,
            meta,
            path: dir,
        })
    }

    /// A decoder that is the target itself with no adapter (the base model as its own decoder).
    pub fn untrained(target: Arc<LanguageModel>, read_layer: usize, write_layer: usize) -> Self {
        let model = target.model.clone();
        Decoder {
            meta: DecoderMeta {
                base_model: target.name.clone(),
                layers: LayerPlan::new(read_layer, write_layer),
                read_layers: Vec::new(),
            },
            target,
            model,
            path: PathBuf::new(),
        }
    }

    /// The read dialog of a conversation: the generation prompt is added when the last turn is
    /// the user's; the verb mask of training applies unless `patch_all`.
    pub fn read_dialog(messages: &[Message], patch_all: bool) -> ReadDialog {
        let add_generation_prompt = messages.last().is_some_and(|m| m.role == "user");
        let mask = if patch_all {
            VerbMask::None
        } else if messages.first().is_some_and(|m| m.role == "system") {
            VerbMask::System
        } else {
            VerbMask::User
        };
        ReadDialog {
            messages: messages.to_vec(),
            add_generation_prompt,
            mask,
        }
    }

    /// Build the patched example for (dialog, question, answer), labels on the answer only
    /// (the question as asked about the default read layer).
    pub fn example(
        &self,
        dialog: &[Message],
        question: &str,
        answer: &str,
        patch_all: bool,
    ) -> Result<PatchedExample> {
        self.example_of(&Self::read_dialog(dialog, patch_all), question, answer)
    }

    /// [`Decoder::example`] for a read dialog as given (its mask and generation prompt kept).
    pub fn example_of(
        &self,
        read: &ReadDialog,
        question: &str,
        answer: &str,
    ) -> Result<PatchedExample> {
        let lm = &self.target;
        let template = lm.template()?;
        let read = read_prompt(template, &lm.tokenizer, read)?;
        let dec = decoder_prompt(
            template,
            &lm.tokenizer,
            read.n_patch(),
            &[(
                self.meta.question(question, self.meta.layers.read),
                answer.to_string(),
            )],
            Labels::LastAnswer,
            false,
        )?;
        PatchedExample::new(read, dec)
    }

    pub fn loss_config(&self, patch_all: bool) -> LossConfig {
        LossConfig {
            layers: self.meta.layers,
            pad_id: self.target.pad_id(),
            differentiable: false,
            grad_through_target: false,
            use_first_from: !patch_all,
            dropout: None,
            recompute: false,
        }
    }

    /// Mean NLL (nats per answer token) of each `(dialog, question, answer)`, as one batch.
    pub fn score_many(
        &self,
        items: &[(Vec<Message>, String, String)],
        patch_all: bool,
    ) -> Result<Vec<f64>> {
        let reads: Vec<(ReadDialog, String, String)> = items
            .iter()
            .map(|(d, q, a)| (Self::read_dialog(d, patch_all), q.clone(), a.clone()))
            .collect();
        self.score_reads(&reads, Activations::Read)
    }

    /// Mean NLL (nats per answer token) of each `(read dialog, question, answer)`, as one
    /// batch, with the activations given by `activations` ([`Activations::None`]: the
    /// no-activation baseline). The first patched vector comes from position 1 when the read
    /// dialog masks a control (as in training).
    pub fn score_reads(
        &self,
        items: &[(ReadDialog, String, String)],
        activations: Activations,
    ) -> Result<Vec<f64>> {
        let examples = items
            .iter()
            .map(|(d, q, a)| self.example_of(d, q, a))
            .collect::<Result<Vec<_>>>()?;
        let batch = PatchedBatch::new(examples)?;
        let nll = latentqa_token_nll(
            &self.target.model,
            &self.model,
            &batch,
            &self.loss_config(false),
            activations,
        )?;
        Ok(nll
            .iter()
            .map(|v| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64)
            .collect())
    }

    /// Mean NLL (nats per answer token) of `answer` to `question` about the target's
    /// activations on `dialog`.
    pub fn score(
        &self,
        dialog: &[Message],
        question: &str,
        answer: &str,
        patch_all: bool,
    ) -> Result<f64> {
        Ok(self.score_many(
            &[(dialog.to_vec(), question.into(), answer.into())],
            patch_all,
        )?[0])
    }
}
