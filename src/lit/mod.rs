//! LIT (LatentQA interpretability tuning): training a decoder to answer questions about a target
//! model's activations.
//!
//! - [`data`]: the LatentQA data (read dialogs and their QA pairs), label splits, and
//!   length-bucketed, resumable batching.
//! - [`trainer`]: the LIT step and run, on the shared toolkit in [`crate::train`].

pub mod data;
pub mod eval;
pub mod trainer;
