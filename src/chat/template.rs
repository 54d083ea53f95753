//! A compiled chat template: rendering a dialog as `transformers` does, and the renderings
//! derived from the template's shape (no default system prompt, turn spans).
//!
//! Templates are rendered in the `jinja` runtime with the variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `tools = none` and `documents = none`.
//!
//! # Derived renderings, without per-model tables
//!
//! When a template is compiled, it is rendered on probe conversations whose contents are
//! private-use sentinels (`S`, `U`, `A`): `[system S, user U, assistant A]`, the same without
//! the assistant, and with a generation prompt. From these it learns:
//!
//! - the end-of-turn text `E` (what follows `A`, e.g. `<|im_end|>\n` or `<|eot_id|>`);
//! - the role header `H(role)`: what sits between `S E` and `U` (e.g. `<|im_start|>user\n`), split
//!   around the role name; it must give `H(assistant)` between `U E` and `A`;
//! - the preamble (what precedes `H(system)`, e.g. `""` for ChatML, `<|begin_of_text|>` for
//!   Llama-3) and any decoration the template writes into a system turn before its content
//!   (e.g. Llama-3.1's "Cutting Knowledge Date" lines);
//! - the generation prompt (what `add_generation_prompt` appends).
//!
//! [`ChatTemplate::render_plain`] then removes the default system prompt a template injects:
//! it renders `[system S] + messages` and replaces the sentinel's system turn by the preamble.
//! If the probes do not fit this shape (for instance a template that rejects system messages
//! or folds them into the user turn), the derived methods fall back to the template's own
//! rendering, as documented on each method.

use std::path::Path;

use candle_core::quantized::gguf_file;
use minijinja::value::Value;
use minijinja::Environment;

use super::jinja;
use super::message::Message;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Probe contents: private-use characters, which no template trims or rewrites.
const SENT_S: &str = "\u{E000}";
const SENT_U: &str = "\u{E001}";
const SENT_A: &str = "\u{E002}";

/// The shape of a template learnt from probe renderings (see the module docs).
#[derive(Clone, Debug)]
struct Probe {
    /// Text before the first turn (e.g. a BOS written by the template).
    preamble: String,
    /// The role header is `header_pre + role + header_post`.
    header_pre: String,
    header_post: String,
    /// Text the template writes into a system turn before the system content.
    system_decoration: String,
    /// Text after each message's content.
    end_of_turn: String,
    /// What `add_generation_prompt` appends.
    generation_prompt: String,
}

impl Probe {
    fn header(&self, role: &str) -> String {
        format!("{}{role}{}", self.header_pre, self.header_post)
    }
    /// The system turn that `render_plain` removes: preamble + header + decoration + S + E.
    fn sentinel_system_block(&self) -> String {
        format!(
            "{}{}{}{SENT_S}{}",
            self.preamble,
            self.header("system"),
            self.system_decoration,
            self.end_of_turn
        )
    }
}

/// A compiled chat template.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    name: String,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    probe: Option<Probe>,
    /// What follows an assistant message's content (see [`ChatTemplate::end_of_turn`]).
    end_of_turn: Option<String>,
}

/// Turn byte spans: the rendered text, one `[start, end)` per message, and the generation
/// prompt's span when one was added.
pub type TurnSpans = (String, Vec<(usize, usize)>, Option<(usize, usize)>);

/// The chat template source of a parsed `tokenizer_config.json`: `chat_template` as a string,
/// or the entry named `default` of a list of `{name, template}`; else a `chat_template.jinja`
/// file next to the config. `Ok(None)` when there is none.
fn template_source_from_config(cfg: &serde_json::Value, path: &Path) -> Result<Option<String>> {
    match cfg.get("chat_template") {
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(|n| n.as_str());
                let template = entry.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => {
                        return Err(Error::bad_file(
                            path,
                            "chat_template list entries must have `name` and `template` strings",
                        ))
                    }
                }
            }
            Err(Error::bad_file(
                path,
                format!(
                    "chat_template has no template named `default` (it has: {})",
                    names.join(", ")
                ),
            ))
        }
        None | Some(serde_json::Value::Null) => {
            let jinja = path.with_file_name("chat_template.jinja");
            if jinja.is_file() {
                std::fs::read_to_string(&jinja)
                    .map(Some)
                    .map_err(|e| Error::io(&jinja, e))
            } else {
                Ok(None)
            }
        }
        Some(_) => Err(Error::bad_file(
            path,
            "chat_template is neither a string nor a list of named templates",
        )),
    }
}

impl ChatTemplate {
    /// Compile a Jinja chat template. `bos_token` and `eos_token` are the template's variables
    /// of those names (undefined when `None`). Compile errors name the template and line.
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        Self::compile("chat_template", source, bos_token, eos_token).map_err(Error::Invalid)
    }

    fn compile(
        name: &str,
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> std::result::Result<Self, String> {
        let env = jinja::environment(name, source)
            .map_err(|e| format!("chat template `{name}` does not compile: {e}"))?;
        let mut t = ChatTemplate {
            env,
            name: name.to_string(),
            source: source.to_string(),
            bos_token,
            eos_token,
            probe: None,
            end_of_turn: None,
        };
        t.probe = t.derive_probe();
        t.end_of_turn = match &t.probe {
            Some(p) => Some(p.end_of_turn.clone()),
            None => t.probe_end_of_turn(),
        }
        .filter(|s| !s.is_empty());
        Ok(t)
    }

    /// The template stored in a GGUF file's `tokenizer.chat_template`, with the tokenizer's
    /// bos/eos tokens. `path` names the file in errors.
    pub fn from_gguf(ct: &gguf_file::Content, tok: &Tokenizer, path: &Path) -> Result<Self> {
        let source = match ct.metadata.get("tokenizer.chat_template") {
            None => {
                return Err(Error::bad_file(
                    path,
                    "no chat template in the GGUF metadata (tokenizer.chat_template)",
                ))
            }
            Some(v) => v
                .to_string()
                .map_err(|_| Error::bad_file(path, "tokenizer.chat_template is not a string"))?,
        };
        Self::compile(
            "tokenizer.chat_template",
            source,
            tok.bos_token(),
            tok.eos_token(),
        )
        .map_err(|msg| Error::bad_file(path, msg))
    }

    /// The template of a Hugging Face `tokenizer_config.json` (`chat_template`: a string, or a
    /// list of named templates of which `default` is taken; else a `chat_template.jinja` next
    /// to it), with the tokenizer's bos/eos tokens. `Ok(None)` when there is no template.
    pub fn from_tokenizer_config(path: &Path, tok: &Tokenizer) -> Result<Option<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        let Some(source) = template_source_from_config(&cfg, path)? else {
            return Ok(None);
        };
        Self::compile("chat_template", &source, tok.bos_token(), tok.eos_token())
            .map(Some)
            .map_err(|msg| Error::bad_file(path, msg))
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages` with the template as it is (default system prompts included), as
    /// `transformers`' `apply_chat_template(..., tokenize=False)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_raw(messages, add_generation_prompt)
            .map_err(Error::Invalid)
    }

    fn render_raw(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        let tmpl = self
            .env
            .get_template(&self.name)
            .map_err(|e| format!("chat template `{}`: {e}", self.name))?;
        let opt = |t: &Option<String>| match t {
            Some(s) => Value::from(s.clone()),
            None => Value::UNDEFINED,
        };
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => opt(&self.bos_token),
            eos_token => opt(&self.eos_token),
            tools => Value::from(()),
            documents => Value::from(()),
        };
        tmpl.render(ctx)
            .map_err(|e| format!("chat template `{}` failed to render: {e}", self.name))
    }

    /// Learn the template's shape from probe renderings; `None` when it does not fit.
    fn derive_probe(&self) -> Option<Probe> {
        let msgs = [
            Message::new("system", SENT_S),
            Message::new("user", SENT_U),
            Message::new("assistant", SENT_A),
        ];
        let full = self.render_raw(&msgs, false).ok()?;
        let unique = |s: &str| -> Option<usize> {
            let i = full.find(s)?;
            (full.rfind(s) == Some(i)).then_some(i)
        };
        let (ps, pu, pa) = (unique(SENT_S)?, unique(SENT_U)?, unique(SENT_A)?);
        if !(ps < pu && pu < pa) {
            return None;
        }
        let end_of_turn = &full[pa + SENT_A.len()..];
        let header_user = full[ps + SENT_S.len()..pu].strip_prefix(end_of_turn)?;
        let header_assistant = full[pu + SENT_U.len()..pa].strip_prefix(end_of_turn)?;
        let k = header_user.rfind("user")?;
        let (header_pre, header_post) = (&header_user[..k], &header_user[k + "user".len()..]);
        if format!("{header_pre}assistant{header_post}") != header_assistant {
            return None;
        }
        let header_system = format!("{header_pre}system{header_post}");
        let before = &full[..ps];
        let j = before.rfind(&header_system)?;
        let probe = Probe {
            preamble: before[..j].to_string(),
            header_pre: header_pre.to_string(),
            header_post: header_post.to_string(),
            system_decoration: before[j + header_system.len()..].to_string(),
            end_of_turn: end_of_turn.to_string(),
            generation_prompt: String::new(),
        };
        // The two-message rendering must be the same text up to U, then the end of turn.
        let two = self.render_raw(&msgs[..2], false).ok()?;
        if two != format!("{}{end_of_turn}", &full[..pu + SENT_U.len()]) {
            return None;
        }
        let two_gen = self.render_raw(&msgs[..2], true).ok()?;
        let generation_prompt = two_gen.strip_prefix(&two)?.to_string();
        Some(Probe {
            generation_prompt,
            ..probe
        })
    }

    /// The text after an assistant message's content in `[user, assistant]`, for templates
    /// whose full probe failed.
    fn probe_end_of_turn(&self) -> Option<String> {
        let msgs = [
            Message::new("user", SENT_U),
            Message::new("assistant", SENT_A),
        ];
        let full = self.render_raw(&msgs, false).ok()?;
        let pa = full.rfind(SENT_A)?;
        Some(full[pa + SENT_A.len()..].to_string())
    }

    /// The text the template writes right after an assistant message's content, e.g.
    /// `<|im_end|>\n` (ChatML) or `<|eot_id|>` (Llama-3); `None` if empty or unknown.
    /// Its first token is an end-of-generation id when special (see [`Self::end_of_turn_id`]).
    pub fn end_of_turn(&self) -> Option<&str> {
        self.end_of_turn.as_deref()
    }

    /// The header that opens a turn of `role`, e.g. `<|im_start|>user\n`, when the template's
    /// shape could be derived (see the module docs).
    pub fn role_header(&self, role: &str) -> Option<String> {
        self.probe.as_ref().map(|p| p.header(role))
    }

    /// The text before the first turn in [`Self::render_plain`]'s output (e.g. `""` for
    /// ChatML, `<|begin_of_text|>` for Llama-3), when the template's shape could be derived.
    pub fn preamble(&self) -> Option<&str> {
        self.probe.as_ref().map(|p| p.preamble.as_str())
    }

    /// What `add_generation_prompt` appends (e.g. `<|im_start|>assistant\n`), when the
    /// template's shape could be derived.
    pub fn generation_prompt(&self) -> Option<&str> {
        self.probe.as_ref().map(|p| p.generation_prompt.as_str())
    }

    /// Render without any default system prompt the template injects when messages[0] is not
    /// a system message. A given system message is kept, without the decoration some templates
    /// add inside it (e.g. Llama-3.1's knowledge-date lines).
    ///
    /// Falls back to [`Self::render`] when the template's shape could not be derived, or when
    /// this conversation does not render in the derived shape.
    pub fn render_plain(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(p) = &self.probe else {
            return self.render(messages, add_generation_prompt);
        };
        if messages.is_empty() {
            let gen = if add_generation_prompt {
                p.generation_prompt.as_str()
            } else {
                ""
            };
            return Ok(format!("{}{gen}", p.preamble));
        }
        if messages[0].role == "system" {
            let full = self.render(messages, add_generation_prompt)?;
            if p.system_decoration.is_empty() {
                return Ok(full);
            }
            let head = format!("{}{}", p.preamble, p.header("system"));
            let decorated = format!("{head}{}", p.system_decoration);
            return Ok(match full.strip_prefix(&decorated) {
                Some(rest) => format!("{head}{rest}"),
                None => full,
            });
        }
        let mut with_system = Vec::with_capacity(messages.len() + 1);
        with_system.push(Message::new("system", SENT_S));
        with_system.extend_from_slice(messages);
        let full = self.render(&with_system, add_generation_prompt)?;
        match full.strip_prefix(&p.sentinel_system_block()) {
            Some(rest) => Ok(format!("{}{rest}", p.preamble)),
            None => self.render(messages, add_generation_prompt),
        }
    }

    /// Spans of each message's turn in `render_fn(messages)`, from prefix renderings (see
    /// [`Self::turn_spans`]).
    pub(crate) fn turn_spans_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        render_fn: &dyn Fn(&[Message], bool) -> Result<String>,
    ) -> Result<TurnSpans> {
        let text = render_fn(messages, add_generation_prompt)?;
        // The preamble: what the template renders for no messages, when it can.
        let mut start = match render_fn(&[], false) {
            Ok(empty) if text.starts_with(&empty) => empty.len(),
            _ => 0,
        };
        let mut spans = Vec::with_capacity(messages.len());
        for i in 1..=messages.len() {
            let prefix = render_fn(&messages[..i], false)?;
            if !text.starts_with(&prefix) || prefix.len() < start {
                return Err(Error::invalid(format!(
                    "chat template `{}`: the rendering of the first {i} messages is not a prefix \
                     of the whole conversation's, so turn spans are undefined",
                    self.name
                )));
            }
            spans.push((start, prefix.len()));
            start = prefix.len();
        }
        let gen = add_generation_prompt.then_some((start, text.len()));
        Ok((text, spans, gen))
    }

    /// [`Self::render_plain`]'s text, the byte span `[start, end)` of each message's turn
    /// (header + content + end of turn), and the generation prompt's span if one was added.
    /// The first span starts after the preamble (what the conversation renders as without
    /// messages; 0 if the template cannot render that). Each span ends where the rendering of
    /// the messages up to it ends; an error if such a rendering is not a prefix of the whole.
    pub fn turn_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<TurnSpans> {
        self.turn_spans_with(messages, add_generation_prompt, &|m, g| {
            self.render_plain(m, g)
        })
    }

    /// Whether a turn of `role` renders as `header(role) + content + end of turn`, as the
    /// probe turns do; `false` when the template's shape could not be derived.
    pub fn renders_role_generically(&self, role: &str) -> bool {
        let Some(p) = &self.probe else {
            return false;
        };
        let msgs = [
            Message::new("system", SENT_S),
            Message::new("user", SENT_U),
            Message::new(role, SENT_A),
        ];
        let expected = format!(
            "{}{}{SENT_U}{e}{}{SENT_A}{e}",
            p.sentinel_system_block(),
            p.header("user"),
            p.header(role),
            e = p.end_of_turn
        );
        self.render_raw(&msgs, false).is_ok_and(|r| r == expected)
    }

    /// The end-of-turn token of this template in `tokenizer`'s vocabulary: the first token of
    /// [`Self::end_of_turn`] when it is a special (added) token, e.g. `<|im_end|>` for ChatML,
    /// `<|eot_id|>` for Llama-3, `<end_of_turn>` for Gemma. It ends generation as the EOS does.
    pub fn end_of_turn_id(&self, tokenizer: &Tokenizer) -> Option<u32> {
        let ids = tokenizer.encode(self.end_of_turn()?).ok()?;
        let first = *ids.first()?;
        tokenizer.is_special(first).then_some(first)
    }

    /// The template's name in error messages (`chat_template`, `tokenizer.chat_template`).
    pub fn name(&self) -> &str {
        &self.name
    }
}
