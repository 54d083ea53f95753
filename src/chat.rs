//! Chat templates: Hugging Face Jinja templates rendered with minijinja, and the derived
//! renderings LatentQA needs.
//!
//! The environment mimics `transformers`' `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks`, no auto-escaping, Python string/dict/list methods (`.strip()`,
//! `.startswith()`, `.items()`... from `minijinja-contrib`'s pycompat), `raise_exception(msg)`,
//! `strftime_now(fmt)` (UTC), a `tojson` filter that writes JSON as Python's `json.dumps` does,
//! and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`,
//! `tools = none` and `documents = none`. `{% generation %}` blocks are rendered as plain
//! blocks. Undefined values are lenient as in Jinja2: they print as nothing and are falsy.
//! Not supported: `{% break %}`/`{% continue %}` (minijinja's `loop_controls` feature is off).
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
use minijinja::value::{Kwargs, Value};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, or any role the template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with this role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

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

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01 (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `strftime` for the usual codes, on a UTC time given in seconds since the epoch.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let (h, mi, s) = (sod / 3600, (sod / 60) % 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let wd = (days + 3).rem_euclid(7) as usize;
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[(mo - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&mo.to_string()),
                Some('H') => out.push_str(&h.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('m') => out.push_str(&format!("{mo:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&DAYS[wd][..3]),
            Some('A') => out.push_str(DAYS[wd]),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&fmt, secs)
}

/// JSON with Python's default separators `", "` and `": "` (`json.dumps` without indent).
struct PyCompactFormatter;

impl serde_json::ser::Formatter for PyCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent)`.
/// The keyword arguments `indent` and `ensure_ascii` are supported, `separators` and
/// `sort_keys` are not.
fn tojson(
    value: Value,
    indent: Option<usize>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut buf = Vec::new();
    let res = match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PyCompactFormatter);
            value.serialize(&mut ser)
        }
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut s = String::from_utf8(buf)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if ensure_ascii {
        // Non-ASCII can only occur inside JSON strings: escape it as Python does.
        let mut escaped = String::with_capacity(s.len());
        for c in s.chars() {
            if c.is_ascii() {
                escaped.push(c);
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    escaped.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
        s = escaped;
    }
    Ok(Value::from_safe_string(s))
}

/// Rewrite `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker
/// extension) to `{% if true %}` / `{% endif %}`, keeping whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = &tag[2..tag.len() - 2];
        let lead = inner.len() - inner.trim_start_matches(['-', '+']).len();
        let trail = inner.len() - inner.trim_end_matches(['-', '+']).len();
        let word = inner[lead..inner.len() - trail].trim();
        out.push_str(&rest[..start]);
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                out.push_str("{%");
                out.push_str(&inner[..lead]);
                out.push(' ');
                out.push_str(r);
                out.push(' ');
                out.push_str(&inner[inner.len() - trail..]);
                out.push_str("%}");
            }
            None => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// The chat template source of a parsed `tokenizer_config.json`: `chat_template` as a string,
/// or the entry named `default` of a list of `{name, template}`; else a `chat_template.jinja`
/// file next to the config. `Ok(None)` when there is none.
pub(crate) fn template_source_from_config(
    cfg: &serde_json::Value,
    path: &Path,
) -> Result<Option<String>> {
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
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(name.to_string(), rewrite_generation_tags(source))
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
    /// [`Tokenizer`] takes its first token as an end-of-generation id.
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

    /// Spans of each message's turn in `render_fn(messages)`, from prefix renderings.
    fn spans_with(
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
        self.spans_with(messages, add_generation_prompt, &|m, g| {
            self.render_plain(m, g)
        })
    }

    /// [`Self::render_plain_with_role_renamed`]'s text with the same spans as
    /// [`Self::turn_spans`].
    pub fn turn_spans_with_role_renamed(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        from: &str,
        to: &str,
    ) -> Result<TurnSpans> {
        let Some(p) = &self.probe else {
            let renamed = rename(messages, from, to);
            return self.spans_with(&renamed, add_generation_prompt, &|m, g| self.render(m, g));
        };
        if self.renders_role_generically(p, to) {
            let renamed = rename(messages, from, to);
            return self.spans_with(&renamed, add_generation_prompt, &|m, g| {
                let body = self.render_plain(m, false)?;
                if !g {
                    return Ok(body);
                }
                let gen = self.renamed_generation_prompt(p, from, to)?;
                Ok(format!("{body}{gen}"))
            });
        }
        // The template treats `to` specially (or ignores it): render with the original roles
        // and swap the headers of the renamed turns textually.
        let (text, spans, gen) = self.turn_spans(messages, add_generation_prompt)?;
        let (h_from, h_to) = (p.header(from), p.header(to));
        let mut out = String::with_capacity(text.len() + 16 * messages.len());
        let mut new_spans = Vec::with_capacity(spans.len());
        let first = spans.first().map(|s| s.0).or(gen.map(|g| g.0)).unwrap_or(0);
        out.push_str(&text[..first]);
        for (m, &(s, e)) in messages.iter().zip(&spans) {
            let start = out.len();
            let seg = &text[s..e];
            if m.role == from {
                let rest = seg.strip_prefix(&h_from).ok_or_else(|| {
                    Error::invalid(format!(
                        "chat template `{}`: a `{from}` turn does not start with its header \
                         {h_from:?}; cannot rename the role",
                        self.name
                    ))
                })?;
                out.push_str(&h_to);
                out.push_str(rest);
            } else {
                out.push_str(seg);
            }
            new_spans.push((start, out.len()));
        }
        let new_gen = match gen {
            None => None,
            Some((s, e)) => {
                let start = out.len();
                let g = &text[s..e];
                out.push_str(&rename_in_generation_prompt(
                    g, &h_from, &h_to, from, &self.name,
                )?);
                Some((start, out.len()))
            }
        };
        Ok((out, new_spans, new_gen))
    }

    /// The same template with the assistant role renamed (LatentQA's decoder uses `reflect`):
    /// the turns of role `from` and, when `from` is `assistant`, the generation prompt get the
    /// header of role `to`. Like [`Self::render_plain`], no default system prompt is injected.
    ///
    /// When the template renders a probe turn of role `to` exactly like any other role, the
    /// messages are rendered with the new role directly; otherwise the headers are swapped in
    /// the text. When the template's shape could not be derived this falls back to
    /// [`Self::render`] with the renamed roles (the generation prompt is then not renamed).
    pub fn render_plain_with_role_renamed(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        from: &str,
        to: &str,
    ) -> Result<String> {
        let Some(p) = &self.probe else {
            return self.render(&rename(messages, from, to), add_generation_prompt);
        };
        if self.renders_role_generically(p, to) {
            let body = self.render_plain(&rename(messages, from, to), false)?;
            if !add_generation_prompt {
                return Ok(body);
            }
            let gen = self.renamed_generation_prompt(p, from, to)?;
            return Ok(format!("{body}{gen}"));
        }
        self.turn_spans_with_role_renamed(messages, add_generation_prompt, from, to)
            .map(|t| t.0)
    }

    /// Whether a turn of `role` renders as `header(role) + content + end of turn`.
    fn renders_role_generically(&self, p: &Probe, role: &str) -> bool {
        let msgs = [
            Message::new("system", SENT_S),
            Message::new("user", SENT_U),
            Message::new(role, SENT_A),
        ];
        let expected = format!(
            "{}{}{SENT_U}{e}{}{SENT_A}{e}",
            {
                let mut s = p.preamble.clone();
                s.push_str(&p.header("system"));
                s.push_str(&p.system_decoration);
                s.push_str(SENT_S);
                s.push_str(&p.end_of_turn);
                s
            },
            p.header("user"),
            p.header(role),
            e = p.end_of_turn
        );
        self.render_raw(&msgs, false).is_ok_and(|r| r == expected)
    }

    fn renamed_generation_prompt(&self, p: &Probe, from: &str, to: &str) -> Result<String> {
        rename_in_generation_prompt(
            &p.generation_prompt,
            &p.header(from),
            &p.header(to),
            from,
            &self.name,
        )
    }

    /// The template's name in error messages (`chat_template`, `tokenizer.chat_template`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn rename(messages: &[Message], from: &str, to: &str) -> Vec<Message> {
    messages
        .iter()
        .map(|m| Message {
            role: if m.role == from {
                to.to_string()
            } else {
                m.role.clone()
            },
            content: m.content.clone(),
        })
        .collect()
}

/// The generation prompt opens an assistant turn: rename its header when `from` is the role
/// it opens.
fn rename_in_generation_prompt(
    gen: &str,
    h_from: &str,
    h_to: &str,
    from: &str,
    name: &str,
) -> Result<String> {
    if gen.contains(h_from) {
        Ok(gen.replacen(h_from, h_to, 1))
    } else if from == "assistant" {
        Err(Error::invalid(format!(
            "chat template `{name}`: the generation prompt {gen:?} does not contain the header \
             {h_from:?}; cannot rename the role"
        )))
    } else {
        Ok(gen.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        // 2024-07-26 00:00:00 UTC
        assert_eq!(strftime_utc("%d %b %Y", 1_721_952_000), "26 Jul 2024");
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %A %j", 951_827_696),
            "2000-02-29 12:34:56 Tuesday 060"
        );
        assert_eq!(strftime_utc("%B %-d, %y %%", 0), "January 1, 70 %");
    }

    #[test]
    fn generation_tags_rewritten() {
        assert_eq!(
            rewrite_generation_tags(
                "a{%- generation %}b{% endgeneration -%}c{% if x %}{% endif %}"
            ),
            "a{%- if true %}b{% endif -%}c{% if x %}{% endif %}"
        );
    }
}
