//! LIT (LatentQA interpretability tuning): training a decoder to answer questions about a target
//! model's activations.
//!
//! - [`data`]: the LatentQA data (read dialogs and their QA pairs), label splits, and
//!   length-bucketed, resumable batching.
//! - [`mixture`]: the extra kinds of training data (context prediction, yes/no
//!   classification) and how much of each a run draws.
//! - [`eval`]: does a decoder read? Losses and accuracies with true, mismatched and no
//!   activations.
//! - [`trainer`]: the LIT step and run, on the shared toolkit in [`crate::train`].

pub mod data;
pub mod eval;
pub mod mixture;
pub mod trainer;
