//! LatentQA's semantics (Pan, Chen, Steinhardt 2024), derived from the chat template and the
//! tokenizer, never from per-model tables: read prompts, verb masks, decoder prompts, patch
//! spans, labels, and the patched loss.
//!
//! - [`format`](mod@format): the read prompt (what the target reads, which positions are
//!   patched, the verb masks) and the decoder prompt (`"? " * k` placeholders, the fixed reply,
//!   question/answer turns as the `reflect` role, label positions);
//! - [`loss`](mod@loss): the patched forward of a left-padded batch (target up to the read
//!   layer, its activations written over the decoder's placeholders) and the decoder's
//!   cross-entropy, differentiable into the decoder and, for control, into the target.

pub mod decoder;
pub mod format;
pub mod layers;
pub mod loss;
pub mod read;

pub use format::{
    decoder_dialog, decoder_prompt, decoder_prompt_from_dialog, layer_question, read_prompt,
    DecoderPrompt, ReadPrompt,
};
pub use layers::{Injection, LayerPlan};
pub use loss::{
    gather_patches, latentqa_loss, latentqa_loss_with_hooks, latentqa_token_nll, patch_vectors,
    patched_token_nll, read_vectors, LossConfig, LossOutput, PatchedBatch, PatchedExample,
    TokenNll,
};

use crate::chat::Message;
use serde::{Deserialize, Serialize};

/// Which part of a read prompt is *not* patched into the decoder (the "verb" of the paper).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerbMask {
    /// Patch everything after the first token (reading, control, and one-turn prompts).
    None,
    /// Mask the system prompt.
    System,
    /// Mask from the first user turn up to the second user turn (the control turn and reply).
    User,
}

/// Which decoder turns carry labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Labels {
    /// Every decoder assistant turn: the fixed reply and the answer (training).
    AllAssistantTurns,
    /// The final answer only (reading and control).
    LastAnswer,
}

/// A read dialog: the target model is run on it, and its activations are patched into the
/// decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReadDialog {
    pub messages: Vec<Message>,
    /// Add the template's generation prompt after the last message.
    pub add_generation_prompt: bool,
    pub mask: VerbMask,
}

/// What a decoder's placeholders receive when it scores or answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// The target's activations on the dialog (the reading itself).
    #[default]
    Read,
    /// Nothing: the same decoder prompt with the placeholders' own residual (the no-activation
    /// baseline of an evaluation: what the decoder answers from the question alone).
    None,
}

impl Activations {
    /// `"read"` or `"none"`, as scripts name them.
    pub fn parse(name: &str) -> crate::Result<Self> {
        match name {
            "read" => Ok(Activations::Read),
            "none" => Ok(Activations::None),
            _ => Err(crate::Error::invalid(format!(
                "unknown activations {name:?}: expected \"read\" or \"none\""
            ))),
        }
    }
}

/// The fixed first decoder assistant turn of the paper.
pub const BASE_REPLY: &str = "Sure, I've analyzed the assistant.";
/// The decoder's name for the assistant role.
pub const DECODER_ROLE: &str = "reflect";
