//! LIT (LatentQA interpretability tuning): training a decoder to answer questions about a target
//! model's activations.
//!
//! - [`data`]: the LatentQA data (read dialogs and their QA pairs), label splits, and
//!   length-bucketed, resumable batching.
//! - [`optim`]: AdamW with checkpointable state, gradient clipping and accumulation, the cosine
//!   learning-rate schedule, and an EMA of the weights.
//! - [`plot`]: self-contained SVG line charts of loss curves.

pub mod data;
pub mod eval;
pub mod optim;
pub mod plot;
pub mod trainer;
