//! Chat templates: Hugging Face Jinja templates rendered with minijinja, as `transformers`'
//! `apply_chat_template` renders them, and the renderings derived from a template's shape.
//!
//! - `jinja`: the Jinja runtime (Python-compatible methods, `raise_exception`, `tojson`...);
//! - `template`: a compiled [`ChatTemplate`]: rendering a dialog, turn spans;
//! - `load`: a model's tokenizer and template loaded together (the end-of-turn id);
//! - [`Message`]: one chat message.
//!
//! The decoder prompt's renamed roles are LatentQA's: see [`crate::latentqa::format`].

mod jinja;
mod load;
mod message;
mod template;

pub use load::{load_files, load_gguf};
pub use message::Message;
pub use template::{ChatTemplate, TurnSpans};
