//! A model's tokenizer and chat template, loaded together: the template's end-of-turn token
//! joins the tokenizer's end-of-generation ids (see [`ChatTemplate::end_of_turn_id`]).

use std::path::Path;

use candle_core::quantized::gguf_file;

use super::template::ChatTemplate;
use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// The tokenizer of a GGUF file ([`Tokenizer::from_gguf`]) and its chat template
/// (`tokenizer.chat_template`, `None` when absent), the template's end-of-turn token added to
/// the tokenizer's eos ids. `path` names the file in errors.
pub fn load_gguf(
    ct: &gguf_file::Content,
    path: &Path,
) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer = Tokenizer::from_gguf(ct, path)?;
    let template = if ct.metadata.contains_key("tokenizer.chat_template") {
        Some(ChatTemplate::from_gguf(ct, &tokenizer, path)?)
    } else {
        None
    };
    Ok(joined(tokenizer, template))
}

/// A Hugging Face tokenizer ([`Tokenizer::from_files`]) and the chat template of its
/// `tokenizer_config.json` ([`ChatTemplate::from_tokenizer_config`]; `None` without a config
/// or a template), the template's end-of-turn token added to the tokenizer's eos ids.
pub fn load_files(
    tokenizer_json: &Path,
    tokenizer_config: Option<&Path>,
) -> Result<(Tokenizer, Option<ChatTemplate>)> {
    let tokenizer = Tokenizer::from_files(tokenizer_json, tokenizer_config)?;
    let template = match tokenizer_config {
        Some(p) => ChatTemplate::from_tokenizer_config(p, &tokenizer)?,
        None => None,
    };
    Ok(joined(tokenizer, template))
}

/// `tokenizer` with `template`'s end-of-turn id among its eos ids (after those it declares).
fn joined(
    mut tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
) -> (Tokenizer, Option<ChatTemplate>) {
    if let Some(id) = template.as_ref().and_then(|t| t.end_of_turn_id(&tokenizer)) {
        tokenizer.add_eos_id(id);
    }
    (tokenizer, template)
}
