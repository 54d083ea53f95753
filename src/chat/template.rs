//! A compiled chat template: rendering a dialog as `transformers` does, and the renderings
//! derived from the template's shape (no default system prompt, turn spans).
//!
//! Templates are rendered in the `jinja` runtime with the variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `tools = none` and `documents = none`.
//!
//! # Derived renderings, without per-model tables
//!
//! When a template is compiled, it is rendered on probe conversations whose contents are
//! private-use sentinels (`U`, `A`, `U2`, `S`): `[user U]`, `[user U, assistant A]`,
//! `[user U, assistant A, user U2]` (an assistant turn that is not the last one, as templates
//! such as Qwen3's decorate the final assistant turn), `[system S, user U]`, and `[user U]`
//! with a generation prompt. From these it learns, per turn `header + content + end`:
//!
//! - the end of an assistant turn `E` (what follows `A` before the next header, e.g.
//!   `<|im_end|>\n`, `<|eot_id|>`, `<end_of_turn>\n`, Mistral's `</s>`) and of a user turn (the
//!   same for most templates; Mistral's `[/INST]`);
//! - the user and assistant headers (what precedes `U` and `A` after the previous turn's end,
//!   e.g. `<|im_start|>user\n`; Gemma's assistant header names the role `model`; Mistral's
//!   headers are `[INST]` and nothing). When the user header contains the word `user`, the
//!   header of any other role is the same text with the role name in its place
//!   (`<|im_start|>reflect\n`, `<start_of_turn>reflect\n`); otherwise (Mistral) roles other
//!   than user and assistant have no header;
//! - an *epilogue*: the template's `eos_token` when it is written after the last turn without a
//!   generation prompt (Phi-3); it belongs to no turn;
//! - the preamble (what precedes the first turn, e.g. `<|begin_of_text|>`);
//! - the generation prompt (what `add_generation_prompt` appends, possibly nothing);
//! - how a system message is rendered ([`SystemShape`]): as a turn of its own (with the
//!   decoration some templates write before its content, e.g. Llama-3.1's "Cutting Knowledge
//!   Date" lines), folded into the first user turn's content (Gemma 3 writes
//!   `S + "\n\n" + U`; Mistral-Nemo `S + "\n\n" + U` in the *last* user turn), or rejected
//!   (Gemma 2 raises an error).
//!
//! [`ChatTemplate::render_plain`] then renders without any default system prompt the template
//! injects, and with the system text at the start of the conversation: a template that folds or
//! rejects system messages gets the system text folded into the first user message by us
//! (with the template's own separator, `"\n\n"` when it rejects them).
//!
//! # Turn spans
//!
//! [`ChatTemplate::turn_spans`] renders the conversation once with its contents and once with
//! sentinel contents; the sentinel rendering is the conversation's skeleton, and the real
//! rendering must be the skeleton with each content (or the content trimmed, as templates that
//! trim do) in place of its sentinel. A turn boundary lies after the previous turn's end text;
//! where the text between two contents does not start with it (a system message folded into the
//! user turn) the boundary is the start of the next content, so the separator belongs to the
//! system part. Templates whose shape could not be derived, or conversations whose contents
//! change how the template renders, fall back to prefix renderings (each turn ends where the
//! rendering of the messages up to it ends).

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
const SENT_U2: &str = "\u{E003}";

/// The separator we fold a system message into the first user message with when the template
/// rejects system messages (the one Gemma 3 and Mistral templates use themselves).
const FOLD_SEPARATOR: &str = "\n\n";

/// The sentinel standing for message `i`'s content in a skeleton rendering.
fn skeleton_sentinel(i: usize) -> Option<char> {
    char::from_u32(0xF0000 + u32::try_from(i).ok()?).filter(|_| i < 0xFFFD)
}

/// How a template renders a system message.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SystemShape {
    /// A turn of its own: `header(system) + decoration + S + end`.
    Turn {
        /// Text before the system header (e.g. a BOS).
        preamble: String,
        /// Text the template writes into a system turn before the system content.
        decoration: String,
        /// What follows the system content before the next header.
        end: String,
    },
    /// Folded into the first user turn: its content is `S + separator + U`.
    Folded { separator: String },
    /// The template raises on (or drops) system messages: we fold them as [`Self::Folded`]
    /// with [`FOLD_SEPARATOR`].
    Rejected,
    /// Rendered some other way: system messages are rendered as the template renders them.
    Unknown,
}

/// The shape of a template learnt from probe renderings (see the module docs).
#[derive(Clone, Debug)]
struct Probe {
    /// Text before the first turn of a conversation that starts with a user message, as the
    /// template renders it (including any default system turn it injects).
    preamble_user: String,
    /// The user header, e.g. `<|im_start|>user\n`.
    header_user: String,
    /// The assistant header, e.g. `<|im_start|>assistant\n` (Gemma: `<start_of_turn>model\n`).
    header_assistant: String,
    /// The header of another role is `pre + role + post`, when the user header names its role.
    pattern: Option<(String, String)>,
    /// Text after a user message's content.
    end_user: String,
    /// Text after an assistant message's content.
    end_assistant: String,
    /// The template's `eos_token` when written after the last turn without a generation prompt.
    epilogue: String,
    /// What `add_generation_prompt` appends.
    generation_prompt: String,
    system: SystemShape,
}

impl Probe {
    fn header(&self, role: &str) -> Option<String> {
        match role {
            "user" => Some(self.header_user.clone()),
            "assistant" => Some(self.header_assistant.clone()),
            _ => {
                let (pre, post) = self.pattern.as_ref()?;
                Some(format!("{pre}{role}{post}"))
            }
        }
    }
    fn end(&self, role: &str) -> Option<&str> {
        match role {
            "user" => Some(&self.end_user),
            "system" => match &self.system {
                SystemShape::Turn { end, .. } => Some(end),
                _ => None,
            },
            _ => Some(&self.end_assistant),
        }
    }
    /// The text before the first turn of [`ChatTemplate::render_plain`]'s output.
    fn preamble(&self) -> &str {
        match &self.system {
            SystemShape::Turn { preamble, .. } => preamble,
            _ => &self.preamble_user,
        }
    }
    /// A system turn of its own: (preamble + system header, the turn's end).
    fn system_turn(&self) -> Option<(String, &str)> {
        match &self.system {
            SystemShape::Turn { preamble, end, .. } => {
                Some((format!("{preamble}{}", self.header("system")?), end))
            }
            _ => None,
        }
    }
    /// `full`, a rendering whose first message is a system message with content `SENT_S`, split
    /// around that system turn: the decoration (what the template writes between the header
    /// and the content, as rendered now: Llama 3.2 writes today's date) and what follows the
    /// turn.
    fn split_sentinel_system<'a>(&self, full: &'a str) -> Option<(&'a str, &'a str)> {
        let (head, end) = self.system_turn()?;
        let r = full.strip_prefix(&head)?;
        let i = r.find(SENT_S)?;
        Some((&r[..i], r[i + SENT_S.len()..].strip_prefix(end)?))
    }
    /// The separator a system message is folded into the first user message with, if it is.
    fn fold_separator(&self) -> Option<&str> {
        match &self.system {
            SystemShape::Folded { separator } => Some(separator),
            SystemShape::Rejected => Some(FOLD_SEPARATOR),
            _ => None,
        }
    }
}

/// `text` split around `sentinels`, each of which must occur exactly once and in this order:
/// the `sentinels.len() + 1` pieces between them.
fn split_on<'a>(text: &'a str, sentinels: &[&str]) -> Option<Vec<&'a str>> {
    let mut pieces = Vec::with_capacity(sentinels.len() + 1);
    let mut pos = 0;
    for s in sentinels {
        let i = text.find(s)?;
        if text.rfind(s) != Some(i) || i < pos {
            return None;
        }
        pieces.push(&text[pos..i]);
        pos = i + s.len();
    }
    pieces.push(&text[pos..]);
    Some(pieces)
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
            Some(p) => Some(p.end_assistant.clone()),
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
        let u = Message::new("user", SENT_U);
        let a = Message::new("assistant", SENT_A);
        let u2 = Message::new("user", SENT_U2);
        let r1 = self.render_raw(std::slice::from_ref(&u), false).ok()?;
        let r2 = self.render_raw(&[u.clone(), a.clone()], false).ok()?;
        let r3 = self.render_raw(&[u.clone(), a, u2], false).ok()?;
        let r1g = self.render_raw(std::slice::from_ref(&u), true).ok()?;
        let p1 = split_on(&r1, &[SENT_U])?;
        let p2 = split_on(&r2, &[SENT_U, SENT_A])?;
        let p3 = split_on(&r3, &[SENT_U, SENT_A, SENT_U2])?;
        if p1[0] != p3[0] || p2[0] != p3[0] {
            return None;
        }
        // The assistant's end: what follows A at the end of [U, A], less an epilogue (the
        // eos_token) when that is what makes it the start of the text between A and U2.
        let (after_a, gap_au) = (p2[2], p3[2]);
        let (end_assistant, epilogue) = if gap_au.starts_with(after_a) {
            (after_a, "")
        } else {
            let eos = self.eos_token.as_deref().filter(|e| !e.is_empty())?;
            let end = after_a.strip_suffix(eos)?;
            if !gap_au.starts_with(end) {
                return None;
            }
            (end, eos)
        };
        let header_user = &gap_au[end_assistant.len()..];
        let preamble_user = p3[0].strip_suffix(header_user)?;
        let end_user = p1[1].strip_suffix(epilogue)?;
        let header_assistant = p3[1].strip_prefix(end_user)?;
        if p3[3] != format!("{end_user}{epilogue}") {
            return None;
        }
        let generation_prompt = r1g
            .strip_prefix(&format!("{}{SENT_U}{end_user}", p1[0]))?
            .to_string();
        let pattern = header_user
            .rfind("user")
            .map(|k| (&header_user[..k], &header_user[k + "user".len()..]))
            .filter(|(pre, post)| {
                header_assistant.len() > pre.len() + post.len()
                    && header_assistant.starts_with(pre)
                    && header_assistant.ends_with(post)
            })
            .map(|(pre, post)| (pre.to_string(), post.to_string()));
        let mut probe = Probe {
            preamble_user: preamble_user.to_string(),
            header_user: header_user.to_string(),
            header_assistant: header_assistant.to_string(),
            pattern,
            end_user: end_user.to_string(),
            end_assistant: end_assistant.to_string(),
            epilogue: epilogue.to_string(),
            generation_prompt,
            system: SystemShape::Unknown,
        };
        probe.system = self.probe_system(&probe);
        Some(probe)
    }

    /// How `[system S, user U]` renders, given the shape learnt without a system message.
    fn probe_system(&self, p: &Probe) -> SystemShape {
        let msgs = [Message::new("system", SENT_S), Message::new("user", SENT_U)];
        let Ok(full) = self.render_raw(&msgs, false) else {
            return SystemShape::Rejected;
        };
        let Some(pieces) = split_on(&full, &[SENT_S, SENT_U]) else {
            // the system message is dropped: fold it as for a template that rejects it
            return if split_on(&full, &[SENT_U]).is_some() && !full.contains(SENT_S) {
                SystemShape::Rejected
            } else {
                SystemShape::Unknown
            };
        };
        let (before, gap, after) = (pieces[0], pieces[1], pieces[2]);
        if after != format!("{}{}", p.end_user, p.epilogue) {
            return SystemShape::Unknown;
        }
        if before.ends_with(&p.header_user) {
            // S inside the user turn: the template folds it, as we would with this separator
            let folded = Message::new("user", format!("{SENT_S}{gap}{SENT_U}"));
            return match self.render_raw(&[folded], false) {
                Ok(r) if r == full => SystemShape::Folded {
                    separator: gap.to_string(),
                },
                _ => SystemShape::Unknown,
            };
        }
        let (Some(end), Some(header)) = (gap.strip_suffix(&p.header_user), p.header("system"))
        else {
            return SystemShape::Unknown;
        };
        match before.rfind(&header) {
            Some(j) => SystemShape::Turn {
                preamble: before[..j].to_string(),
                decoration: before[j + header.len()..].to_string(),
                end: end.to_string(),
            },
            None => SystemShape::Unknown,
        }
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
    /// `<|im_end|>\n` (ChatML), `<|eot_id|>` (Llama-3), `<end_of_turn>\n` (Gemma), `</s>`
    /// (Mistral); `None` if empty or unknown. Its first token is an end-of-generation id when
    /// special (see [`Self::end_of_turn_id`]).
    pub fn end_of_turn(&self) -> Option<&str> {
        self.end_of_turn.as_deref()
    }

    /// The text that ends a turn of `role` (before the next turn's header), when the
    /// template's shape could be derived: the user turn's end for `user` (Mistral: `[/INST]`),
    /// the system turn's end for `system` (`None` when the template has no system turn), and
    /// the assistant turn's end for `assistant` and any other role.
    pub fn turn_end(&self, role: &str) -> Option<&str> {
        self.probe.as_ref().and_then(|p| p.end(role))
    }

    /// The header that opens a turn of `role`, e.g. `<|im_start|>user\n`, when the template's
    /// shape could be derived (see the module docs). For `assistant` it is the header the
    /// template writes (Gemma: `<start_of_turn>model\n`); a role other than user and assistant
    /// has one only when the user header names its role (`None` for Mistral's `[INST]`).
    pub fn role_header(&self, role: &str) -> Option<String> {
        self.probe.as_ref().and_then(|p| p.header(role))
    }

    /// The text before the first turn in [`Self::render_plain`]'s output (e.g. `""` for
    /// ChatML, `<|begin_of_text|>` for Llama-3, `<bos>` for Gemma), when the template's shape
    /// could be derived.
    pub fn preamble(&self) -> Option<&str> {
        self.probe.as_ref().map(|p| p.preamble())
    }

    /// What `add_generation_prompt` appends (e.g. `<|im_start|>assistant\n`; nothing for
    /// Mistral), when the template's shape could be derived.
    pub fn generation_prompt(&self) -> Option<&str> {
        self.probe.as_ref().map(|p| p.generation_prompt.as_str())
    }

    /// What the template writes after the last turn when no generation prompt is added (Phi-3:
    /// its `eos_token`), when there is such a text. It belongs to no turn span.
    pub fn epilogue(&self) -> Option<&str> {
        self.probe
            .as_ref()
            .map(|p| p.epilogue.as_str())
            .filter(|e| !e.is_empty())
    }

    /// Whether the template folds (or, rejecting system messages, has us fold) a leading system
    /// message into the first user message; the separator then written between the two.
    pub fn system_fold_separator(&self) -> Option<&str> {
        self.probe.as_ref().and_then(|p| p.fold_separator())
    }

    /// `messages` with a leading system message folded into the user message after it:
    /// `system + separator + user`.
    fn fold_system(&self, messages: &[Message], separator: &str) -> Result<Vec<Message>> {
        match messages {
            [s, u, rest @ ..] if u.role == "user" => {
                let mut out = Vec::with_capacity(messages.len() - 1);
                out.push(Message::new(
                    "user",
                    format!("{}{separator}{}", s.content, u.content),
                ));
                out.extend_from_slice(rest);
                Ok(out)
            }
            _ => Err(Error::invalid(format!(
                "chat template `{}` has no system turn (it folds a system message into the \
                 first user message, or rejects it): a system message must be followed by a \
                 user message",
                self.name
            ))),
        }
    }

    /// Render without any default system prompt the template injects when messages[0] is not
    /// a system message. A given system message is kept, without the decoration some templates
    /// add inside it (e.g. Llama-3.1's knowledge-date lines); when the template has no system
    /// turn (it folds system messages into a user turn, e.g. Gemma 3 and Mistral, or rejects
    /// them, e.g. Gemma 2) it is folded into the first user message as `system + separator +
    /// user`, with the template's own separator (`"\n\n"` when it rejects them), so the system
    /// text always opens the conversation (Mistral's template would put it in the last user
    /// turn).
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
            return Ok(format!("{}{gen}", p.preamble()));
        }
        if messages[0].role == "system" {
            if let Some(separator) = p.fold_separator() {
                let folded = self.fold_system(messages, separator)?;
                return self.render_plain(&folded, add_generation_prompt);
            }
            let full = self.render(messages, add_generation_prompt)?;
            let (Some((head, _)), SystemShape::Turn { decoration, .. }) =
                (p.system_turn(), &p.system)
            else {
                return Ok(full);
            };
            if decoration.is_empty() {
                return Ok(full);
            }
            // the decoration as rendered now (it may hold today's date)
            let mut probe = messages.to_vec();
            probe[0].content = SENT_S.to_string();
            let sentinel = self.render(&probe, add_generation_prompt)?;
            let Some((decoration, _)) = p.split_sentinel_system(&sentinel) else {
                return Ok(full);
            };
            let decorated = format!("{head}{decoration}");
            return Ok(match full.strip_prefix(&decorated) {
                Some(rest) => format!("{head}{rest}"),
                None => full,
            });
        }
        if p.system_turn().is_none() {
            return self.render(messages, add_generation_prompt);
        }
        let mut with_system = Vec::with_capacity(messages.len() + 1);
        with_system.push(Message::new("system", SENT_S));
        with_system.extend_from_slice(messages);
        let full = self.render(&with_system, add_generation_prompt)?;
        match p.split_sentinel_system(&full) {
            Some((_, rest)) => Ok(format!("{}{rest}", p.preamble())),
            None => self.render(messages, add_generation_prompt),
        }
    }

    /// Spans of each message's turn in `render_fn(messages)` (see [`Self::turn_spans`]): from
    /// the conversation's skeleton when the template's shape is known and the conversation
    /// renders as its skeleton, else from prefix renderings.
    pub(crate) fn turn_spans_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        render_fn: &dyn Fn(&[Message], bool) -> Result<String>,
    ) -> Result<TurnSpans> {
        let text = render_fn(messages, add_generation_prompt)?;
        if let Some(p) = &self.probe {
            if let Some(spans) =
                skeleton_spans(p, text.as_str(), messages, add_generation_prompt, render_fn)
            {
                return Ok((text, spans.0, spans.1));
            }
        }
        self.prefix_spans(text, messages, add_generation_prompt, render_fn)
    }

    /// Turn spans from prefix renderings: each turn ends where the rendering of the messages up
    /// to it ends (less the epilogue).
    fn prefix_spans(
        &self,
        text: String,
        messages: &[Message],
        add_generation_prompt: bool,
        render_fn: &dyn Fn(&[Message], bool) -> Result<String>,
    ) -> Result<TurnSpans> {
        let epilogue = self.epilogue().unwrap_or("");
        // The preamble: what the template renders for no messages, when it can.
        let mut start = match render_fn(&[], false) {
            Ok(empty) => {
                let empty = empty.strip_suffix(epilogue).unwrap_or(&empty);
                if text.starts_with(empty) {
                    empty.len()
                } else {
                    0
                }
            }
            _ => 0,
        };
        let mut spans = Vec::with_capacity(messages.len());
        for i in 1..=messages.len() {
            let prefix = render_fn(&messages[..i], false)?;
            let prefix = if !epilogue.is_empty()
                && (!text.starts_with(&prefix) || (i == messages.len() && !add_generation_prompt))
            {
                prefix.strip_suffix(epilogue).unwrap_or(&prefix)
            } else {
                &prefix
            };
            if !text.starts_with(prefix) || prefix.len() < start {
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

    /// [`Self::render_plain`]'s text, the byte span `[start, end)` of each message's turn, and
    /// the generation prompt's span if one was added.
    ///
    /// A turn is its header, content and end text (see the module docs): the first starts
    /// after the preamble, each ends after its end-of-turn text, or, for a system message
    /// folded into the user turn, where the user content starts (the separator is the system
    /// part's). The epilogue (Phi-3's eos without a generation prompt) is in no span. When the
    /// template's shape is unknown or the conversation changes how it renders, each span ends
    /// where the rendering of the messages up to it ends; an error if such a rendering is not
    /// a prefix of the whole.
    pub fn turn_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<TurnSpans> {
        self.turn_spans_with(messages, add_generation_prompt, &|m, g| {
            self.render_plain(m, g)
        })
    }

    /// Whether a turn of `role` renders as `header(role) + content + end of turn` (the
    /// assistant's end), as the probe turns do; `false` when the template's shape could not be
    /// derived or gives `role` no header.
    pub fn renders_role_generically(&self, role: &str) -> bool {
        let Some(p) = &self.probe else {
            return false;
        };
        let Some(header) = p.header(role) else {
            return false;
        };
        let msgs = [Message::new("user", SENT_U), Message::new(role, SENT_A)];
        let expected = format!(
            "{}{}{SENT_U}{}{header}{SENT_A}{}{}",
            p.preamble_user, p.header_user, p.end_user, p.end_assistant, p.epilogue
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

/// Turn spans and the generation prompt's span (a [`TurnSpans`] without the text).
type SpansAndGeneration = (Vec<(usize, usize)>, Option<(usize, usize)>);

/// Spans from the conversation's skeleton (see the module docs); `None` when the text is not
/// the skeleton with the contents (or trimmed contents) in place of the sentinels.
fn skeleton_spans(
    p: &Probe,
    text: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    render_fn: &dyn Fn(&[Message], bool) -> Result<String>,
) -> Option<SpansAndGeneration> {
    let n = messages.len();
    if n == 0 {
        return None;
    }
    let sentinels: Vec<String> = (0..n)
        .map(|i| skeleton_sentinel(i).map(String::from))
        .collect::<Option<_>>()?;
    if messages
        .iter()
        .any(|m| m.content.chars().any(|c| c as u32 >= 0xF0000))
    {
        return None;
    }
    let probe_msgs: Vec<Message> = messages
        .iter()
        .zip(&sentinels)
        .map(|(m, s)| Message::new(m.role.clone(), s.clone()))
        .collect();
    let skeleton = render_fn(&probe_msgs, add_generation_prompt).ok()?;
    let refs: Vec<&str> = sentinels.iter().map(String::as_str).collect();
    let gaps = split_on(&skeleton, &refs)?;
    // The content byte ranges: each gap, then the content as written (or trimmed).
    let mut contents = Vec::with_capacity(n);
    let mut pos = 0;
    for (i, m) in messages.iter().enumerate() {
        if !text[pos..].starts_with(gaps[i]) {
            return None;
        }
        pos += gaps[i].len();
        let rest = &text[pos..];
        let next = gaps[i + 1];
        let c = m.content.as_str();
        let fits = |v: &&str| {
            rest.strip_prefix(*v).is_some_and(|after| {
                if i + 1 == n {
                    after == next
                } else {
                    after.starts_with(next)
                }
            })
        };
        let v = [c, c.trim(), c.trim_start(), c.trim_end()]
            .into_iter()
            .find(|v| fits(v))?;
        contents.push((pos, pos + v.len()));
        pos += v.len();
    }
    let preamble = p.preamble();
    let mut bounds = Vec::with_capacity(n + 1);
    bounds.push(if gaps[0].starts_with(preamble) {
        preamble.len()
    } else {
        0
    });
    for i in 1..n {
        let gap_start = contents[i - 1].1;
        let gap = gaps[i];
        bounds.push(match p.end(&messages[i - 1].role) {
            Some(end) if gap.starts_with(end) => gap_start + end.len(),
            _ => gap_start + gap.len(),
        });
    }
    let end = p.end(&messages[n - 1].role)?;
    if !gaps[n].starts_with(end) {
        return None;
    }
    let last = contents[n - 1].1 + end.len();
    bounds.push(last);
    let spans = bounds.windows(2).map(|w| (w[0], w[1])).collect();
    Some((spans, add_generation_prompt.then_some((last, text.len()))))
}
