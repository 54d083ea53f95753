//! The training toolkit shared by LIT ([`crate::lit`]) and control ([`crate::control`]):
//!
//! - [`optim`]: AdamW with checkpointable state, gradient clipping and accumulation, the cosine
//!   learning-rate schedule, and an EMA of the weights.
//! - [`plot`]: self-contained SVG line charts of loss curves.
//! - [`run`]: the run directory (metrics.jsonl, atomic checkpoints, the loss plot), the one
//!   resume rule (a checkpoint made with another config is an error naming the fields), and the
//!   step loop (`on_step`, stop, checkpoint on schedule, on a stop and at the end).

pub mod optim;
pub mod plot;
pub mod run;
