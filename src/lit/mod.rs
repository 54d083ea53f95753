//! LIT (LatentQA interpretability tuning): training a decoder to answer questions about a target
//! model's activations.
//!
//! - [`data`]: the LatentQA data (read dialogs and their QA pairs), label splits, and
//!   length-bucketed, resumable batching.

pub mod data;
pub mod optim;
pub mod plot;
pub mod trainer;
