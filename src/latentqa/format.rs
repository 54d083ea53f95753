//! LatentQA's prompt formats, derived from a model's chat template and tokenizer (no per-model
//! tables).
//!
//! The paper's code (`lit/utils/dataset_utils.py`) describes every model by magic numbers: the
//! token ids of the BOS and of the role headers, how many tokens precede the first placeholder
//! (`NUM_WRITE_TOKENS_TO_SHIFT`), how many placeholders `"? " * k` make one token each
//! (`NUM_READ_TOKENS_TO_SHIFT`). Here the same quantities come from the template's turn spans
//! ([`ChatTemplate::turn_spans`]) and the tokenizer's byte offsets, so ChatML (SmolLM2, Qwen),
//! Llama-3, Gemma, Mistral and Phi-3 templates work alike (`tests/chat_families.rs` checks each
//! family's real template). For SmolLM2 the results equal the paper's code with the `smollm2`
//! table entries of the reference (`shared/reference/README.md`).
//!
//! Two prompts make one LatentQA example:
//!
//! - the **read prompt** ([`read_prompt`]): the dialog the *target* model is run on. Its
//!   activations at the read layer, at [`ReadPrompt::patch_positions`], are what the decoder
//!   reads;
//! - the **decoder prompt** ([`decoder_prompt`]): a user turn of `"? " * k` placeholders (one
//!   token per patched activation), the fixed reply [`BASE_REPLY`], then question/answer turns.
//!   The decoder's assistant role is renamed [`DECODER_ROLE`] (`reflect`), when the template's
//!   turn headers name their role (see [`decoder_role`]). The activations replace the
//!   placeholders' residual stream at the write layer.
//!
//! # The verb masks, per template shape
//!
//! The masked ("verb") span of a read prompt is positions `[1, 1 + verb_len)`: position 0 is
//! never patched, and everything after the verb is. A turn is `header + content + end`
//! ([`ChatTemplate::turn_spans`]):
//!
//! - system mask: the verb is everything from position 1 up to the first user turn. With a BOS
//!   (Llama-3, Gemma, Mistral) that is the whole system turn, header and end included; without
//!   one (ChatML, Phi-3) position 0 is the system header's first token, so the verb is the rest
//!   of the system turn. A template without a system turn (Gemma 3 and Mistral fold the system
//!   text into the user turn, Gemma 2 rejects it and gets it folded) renders
//!   `user header + system + "\n\n" + user content`; the system part ends where the user
//!   content starts, so the verb is the user header, the system text and the separator, and the
//!   patch starts at the user's own text;
//! - control (user) mask: the verb has the length of the first user turn plus its reply (from
//!   the first user turn's start to the second's); with a BOS it is exactly those two turns,
//!   without one it is shifted by one token (ending with the second user turn's first token),
//!   as in the paper's code.

use super::{Labels, ReadDialog, VerbMask, BASE_REPLY, DECODER_ROLE};
use crate::chat::{ChatTemplate, Message, TurnSpans};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::ops::Range;

/// The tokenized read prompt and which of its positions are patched into the decoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPrompt {
    /// Token ids of the rendered read dialog (the template's own preamble, e.g. a BOS,
    /// included; nothing else prepended).
    pub ids: Vec<u32>,
    /// Length of the "verb" (the masked part at the start of the prompt that is not patched;
    /// the paper's `verb_lengths`): 0 without a verb mask.
    pub verb_len: usize,
    /// Read positions whose activations are patched, in order: the last
    /// `n = len - 1 - verb_len` positions. Position 0 is never patched (the paper's
    /// `read_lengths = len - 1`).
    pub patch_positions: Vec<usize>,
    /// The paper's `mask_verbs` quirk: with a verb mask, the first patched vector is replaced
    /// by the activation at this position (always 1, the token after the first one). `None`
    /// without a verb mask. When the verb is empty this changes nothing, since the first
    /// patched position is then 1 anyway.
    pub first_from: Option<usize>,
    /// The same dialog with its masked turns left out (the system prompt, or the control turn
    /// and its reply), tokenized: it ends in the same tokens as `ids` from the second patched
    /// position on, so patch `j` sits at `patch_positions[j] - (ids.len() - baseline.len())`
    /// in it. What the target computes on the stimulus alone, subtracted from the reading in
    /// contrast reading ([`super::layers::LayerPlan::contrast`]). `None` without a verb mask,
    /// or when the stimulus renders differently without the masked turns.
    pub baseline: Option<Vec<u32>>,
}

impl ReadPrompt {
    /// The number of patched activations (= the decoder's placeholder count).
    pub fn n_patch(&self) -> usize {
        self.patch_positions.len()
    }
}

/// The tokenized decoder prompt: placeholders to overwrite, and the tokens that are labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecoderPrompt {
    /// Token ids of the rendered decoder dialog.
    pub ids: Vec<u32>,
    /// The number of `"? "` repetitions in the placeholder user turn (the paper's `k`).
    pub k: usize,
    /// Positions of the placeholder tokens (the content of the first user turn), one per
    /// patched activation, in order.
    pub write_positions: Vec<usize>,
    /// Positions `t` whose token `ids[t]` is a label, predicted from position `t - 1`: the
    /// text of the chosen decoder (`reflect`) turns after their header (the content, and
    /// anything the template writes before it, such as the empty think block of Qwen3's final
    /// assistant turn: it is what follows the generation prompt) plus the end-of-turn text the
    /// template writes after it (ChatML: `<|im_end|>` and `\n`; Llama-3: `<|eot_id|>`;
    /// Mistral: `</s>`).
    pub label_positions: Vec<usize>,
}

/// The token that starts exactly at byte `byte` of the text (the first one, if a multi-byte
/// character is split over several tokens).
fn token_starting_at(offsets: &[(usize, usize)], byte: usize, what: &str) -> Result<usize> {
    offsets.iter().position(|o| o.0 == byte).ok_or_else(|| {
        Error::invalid(format!(
            "{what} (byte {byte}) does not start at a token boundary; the template/tokenizer \
                 pair does not fit LatentQA's token geometry"
        ))
    })
}

/// The tokens that exactly tile the byte range `[a, b)` of the text.
fn tokens_tiling(
    offsets: &[(usize, usize)],
    a: usize,
    b: usize,
    what: &str,
) -> Result<Range<usize>> {
    if a == b {
        let i = offsets
            .iter()
            .position(|o| o.0 >= a)
            .unwrap_or(offsets.len());
        return Ok(i..i);
    }
    let start = token_starting_at(offsets, a, what)?;
    let end = offsets
        .iter()
        .rposition(|o| o.1 == b)
        .map(|i| i + 1)
        .ok_or_else(|| {
            Error::invalid(format!(
                "{what} (ending at byte {b}) does not end at a token boundary; the \
                 template/tokenizer pair does not fit LatentQA's token geometry"
            ))
        })?;
    if end <= start || offsets[start..end].iter().any(|o| o.0 < a || o.1 > b) {
        return Err(Error::invalid(format!(
            "{what} (bytes {a}..{b}) is not tiled by whole tokens"
        )));
    }
    Ok(start..end)
}

/// Tokenize the read dialog and find the patched positions, as the paper does.
///
/// The dialog is rendered with [`ChatTemplate::render_plain`] (the template without any
/// default system prompt it would inject: the verb masks assume the masked turns follow the
/// first token), plus the generation prompt if asked. Turn starts are found in token positions
/// from [`ChatTemplate::turn_spans`] and the tokenizer's offsets. With `L` tokens:
///
/// - position 0 (a BOS, or ChatML's first `<|im_start|>`) is never patched;
/// - [`VerbMask::User`] with at least two user turns: the verb runs from the start of the first
///   user turn to the start of the second (the control instruction and its reply);
/// - [`VerbMask::System`] when the first message is a system message: the verb is
///   `start of the first user turn - 1` (the paper masks `[1, first user header)`);
/// - otherwise the verb is empty;
/// - the patch is the last `n = L - 1 - verb` positions, and with a verb mask its first vector
///   is taken from position 1 instead ([`ReadPrompt::first_from`]).
///
/// For ChatML (no BOS) this reproduces the reference's asymmetry: the user mask patches from
/// the second user turn's role token, the system mask from the first user turn's
/// `<|im_start|>`.
pub fn read_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    dialog: &ReadDialog,
) -> Result<ReadPrompt> {
    let msgs = &dialog.messages;
    let (text, spans, _) = template.turn_spans(msgs, dialog.add_generation_prompt)?;
    let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
    let len = ids.len();
    if len < 2 {
        return Err(Error::invalid(format!(
            "the read prompt has {len} token(s); LatentQA patches all but the first, so it \
             needs at least 2"
        )));
    }
    let user_idx: Vec<usize> = (0..msgs.len())
        .filter(|&i| msgs[i].role == "user")
        .collect();
    let user_starts: Vec<usize> = (user_idx.iter())
        .map(|&i| token_starting_at(&offsets, spans[i].0, &format!("read turn {i}")))
        .collect::<Result<_>>()?;
    let verb_len = match dialog.mask {
        VerbMask::User if user_starts.len() >= 2 => user_starts[1] - user_starts[0],
        VerbMask::System
            if msgs.first().is_some_and(|m| m.role == "system") && !user_starts.is_empty() =>
        {
            user_starts[0].saturating_sub(1)
        }
        _ => 0,
    };
    let n = len - 1 - verb_len.min(len - 1);
    if n == 0 {
        return Err(Error::invalid(
            "the verb mask covers the whole read prompt: nothing is left to patch",
        ));
    }
    let baseline = if verb_len > 0 {
        baseline_ids(template, tokenizer, dialog, &user_idx, &ids, n)?
    } else {
        None
    };
    Ok(ReadPrompt {
        ids,
        verb_len,
        patch_positions: (len - n..len).collect(),
        first_from: (dialog.mask != VerbMask::None).then_some(1),
        baseline,
    })
}

/// The ids of `dialog` without its masked turns (see [`ReadPrompt::baseline`]): `None` when
/// nothing is left or the last `n - 1` tokens differ from `ids`' (the stimulus would not be
/// the same tokens without the masked turns).
fn baseline_ids(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    dialog: &ReadDialog,
    user_idx: &[usize],
    ids: &[u32],
    n: usize,
) -> Result<Option<Vec<u32>>> {
    let msgs = &dialog.messages;
    let kept: Vec<Message> = match dialog.mask {
        VerbMask::System => msgs[1..].to_vec(),
        VerbMask::User if user_idx.len() >= 2 => msgs[..user_idx[0]]
            .iter()
            .chain(&msgs[user_idx[1]..])
            .cloned()
            .collect(),
        _ => return Ok(None),
    };
    if kept.is_empty() {
        return Ok(None);
    }
    let (text, _, _) = template.turn_spans(&kept, dialog.add_generation_prompt)?;
    let base = tokenizer.encode(&text)?;
    let tail = n - 1;
    let same_tail = base.len() >= n
        && base.len() <= ids.len()
        && base[base.len() - tail..] == ids[ids.len() - tail..];
    Ok(same_tail.then_some(base))
}

/// A question as a decoder trained on several read layers is asked it: prefixed by the read
/// layer in Activation Oracles' form (`"Layer: 15\nWhat ...?"`), or as is (`layer: None`).
pub fn layer_question(layer: Option<usize>, question: &str) -> String {
    match layer {
        Some(l) => format!("Layer: {l}\n{question}"),
        None => question.to_string(),
    }
}

/// The decoder messages of the paper: the fixed reply, then each question and answer. With
/// `add_generation_prompt` the last answer must be empty and is left out (it is to be
/// generated).
pub fn decoder_dialog(
    qa: &[(String, String)],
    add_generation_prompt: bool,
) -> Result<Vec<Message>> {
    let mut dialog = vec![Message::new("assistant", BASE_REPLY)];
    for (i, (q, a)) in qa.iter().enumerate() {
        dialog.push(Message::new("user", q.as_str()));
        if add_generation_prompt && i + 1 == qa.len() {
            if !a.is_empty() {
                return Err(Error::invalid(
                    "with a generation prompt the last answer must be empty (it is generated)",
                ));
            }
            continue;
        }
        dialog.push(Message::new("assistant", a.as_str()));
    }
    Ok(dialog)
}

/// The decoder prompt for `n_patch` activations and question/answer pairs: messages
/// `[user: "? " * k, assistant: BASE_REPLY, user: q1, assistant: a1, ...]` (see
/// [`decoder_dialog`]), rendered by [`decoder_prompt_from_dialog`].
pub fn decoder_prompt(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    n_patch: usize,
    qa: &[(String, String)],
    labels: Labels,
    add_generation_prompt: bool,
) -> Result<DecoderPrompt> {
    let dialog = decoder_dialog(qa, add_generation_prompt)?;
    decoder_prompt_from_dialog(
        template,
        tokenizer,
        n_patch,
        &dialog,
        labels,
        add_generation_prompt,
    )
}

/// One rendering of the decoder prompt with `k` placeholders.
struct Rendered {
    ids: Vec<u32>,
    offsets: Vec<(usize, usize)>,
    text: String,
    spans: Vec<(usize, usize)>,
}

/// The byte range of a turn's content (after its header), and of its end-of-turn text.
fn content_bytes(
    template: &ChatTemplate,
    r: &Rendered,
    turn: usize,
    role: &str,
) -> Result<(usize, usize, usize)> {
    let (s, e) = r.spans[turn];
    let header = template.role_header(role).ok_or_else(|| {
        Error::invalid(format!(
            "chat template `{}`: its turn shape could not be derived, so the decoder prompt's \
             placeholders and labels cannot be located",
            template.name()
        ))
    })?;
    let eot = template.turn_end(role).unwrap_or("");
    let seg = &r.text[s..e];
    if !seg.starts_with(&header) || !seg.ends_with(eot) || seg.len() < header.len() + eot.len() {
        return Err(Error::invalid(format!(
            "chat template `{}`: decoder turn {turn} is not `{header:?} + content + {eot:?}`",
            template.name()
        )));
    }
    Ok((s + header.len(), e - eot.len(), e))
}

/// The role the decoder's turns are rendered with: [`DECODER_ROLE`], or `assistant` when the
/// template's turns do not name their role (Mistral's `[INST]`), so that no other role can be
/// written (its template also rejects any role but user and assistant).
pub fn decoder_role(template: &ChatTemplate) -> &'static str {
    if template.role_header("assistant").is_some() && template.role_header(DECODER_ROLE).is_none() {
        "assistant"
    } else {
        DECODER_ROLE
    }
}

/// The role a decoder message is rendered with.
fn rendered_role<'a>(template: &ChatTemplate, role: &'a str) -> &'a str {
    if role == "assistant" {
        decoder_role(template)
    } else {
        role
    }
}

fn is_decoder_turn(m: &Message) -> bool {
    m.role == "assistant" || m.role == DECODER_ROLE
}

fn render_decoder(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    k: usize,
    dialog: &[Message],
    add_generation_prompt: bool,
) -> Result<(Rendered, Range<usize>)> {
    let mut msgs = Vec::with_capacity(dialog.len() + 1);
    msgs.push(Message::new("user", "? ".repeat(k)));
    msgs.extend_from_slice(dialog);
    let (text, spans, _) = turn_spans_with_role_renamed(
        template,
        &msgs,
        add_generation_prompt,
        "assistant",
        decoder_role(template),
    )?;
    let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
    let r = Rendered {
        ids,
        offsets,
        text,
        spans,
    };
    let (a, b, _) = content_bytes(template, &r, 0, "user")?;
    let placeholders = tokens_tiling(&r.offsets, a, b, "the placeholder content")?;
    Ok((r, placeholders))
}

/// The `k` in `[1, n_patch]` whose placeholder turn alone has exactly `n_patch` placeholder
/// tokens, by bisection (the count grows with `k` and is at least `k`); `None` if there is
/// none. Each probe is recorded in `tried`.
fn search_placeholder_count(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    n_patch: usize,
    tried: &mut Vec<(usize, usize)>,
) -> Result<Option<usize>> {
    let (mut lo, mut hi) = (1usize, n_patch);
    while lo <= hi {
        let mid = lo + (hi - lo) / 2;
        let count = render_decoder(template, tokenizer, mid, &[], false)?
            .1
            .len();
        tried.push((mid, count));
        match count.cmp(&n_patch) {
            std::cmp::Ordering::Equal => return Ok(Some(mid)),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid - 1,
        }
    }
    Ok(None)
}

/// The decoder prompt for `n_patch` activations and a decoder dialog (the messages after the
/// placeholder turn; role `assistant` for the decoder's turns, rendered as `reflect`).
///
/// Rendered with the assistant role renamed and no injected system prompt
/// ([`turn_spans_with_role_renamed`]). `k` is chosen so that the placeholder
/// content is exactly `n_patch` tokens: templates that do not trim content (ChatML) render
/// `"? " * k` as `k + 1` tokens (`?`, `k - 1` times ` ?`, and ` `), templates that trim
/// (Llama-3) as `k` tokens. This replaces the paper's `NUM_READ_TOKENS_TO_SHIFT` (2 and 1), and
/// the placeholder positions replace `NUM_WRITE_TOKENS_TO_SHIFT`. With a tokenizer in which
/// `" ?"` is not one token, `k` is found by bisection on the placeholder count (it grows with
/// `k`), so the count is met whenever some `k` meets it.
///
/// Labels are the decoder turns after their header (see [`DecoderPrompt::label_positions`]):
/// every decoder turn
/// for [`Labels::AllAssistantTurns`] (training also learns the fixed reply), the last one only
/// for [`Labels::LastAnswer`]. With `add_generation_prompt` the prompt ends with the decoder's
/// generation prompt (a question whose answer is to be generated): the dialog should then end
/// with a user turn, and [`Labels::LastAnswer`] gives no labels.
pub fn decoder_prompt_from_dialog(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    n_patch: usize,
    dialog: &[Message],
    labels: Labels,
    add_generation_prompt: bool,
) -> Result<DecoderPrompt> {
    if n_patch == 0 {
        return Err(Error::invalid(
            "a decoder prompt needs at least one placeholder",
        ));
    }
    // The placeholder count grows by one token per "? ": probe with k = 1, then correct.
    let (_, probe) = render_decoder(template, tokenizer, 1, &[], false)?;
    let extra = probe.len() as isize - 1;
    let mut k = (n_patch as isize - extra).max(1) as usize;
    let mut tried = Vec::new();
    let (k, r, placeholders) = loop {
        let (r, ph) = render_decoder(template, tokenizer, k, dialog, add_generation_prompt)?;
        if ph.len() == n_patch {
            break (k, r, ph);
        }
        tried.push((k, ph.len()));
        let next = k as isize + n_patch as isize - ph.len() as isize;
        if tried.len() >= 4 || next < 1 || tried.iter().any(|&(t, _)| t as isize == next) {
            // not one token per "? " (a tokenizer without a ` ?` token): search the k whose
            // count, which grows with k, is n_patch
            let no_k = |tried: &[(usize, usize)]| {
                Error::invalid(format!(
                    "no number of \"? \" placeholders gives exactly {n_patch} placeholder tokens \
                     with this template and tokenizer (tried k, tokens: {tried:?})"
                ))
            };
            let k = search_placeholder_count(template, tokenizer, n_patch, &mut tried)?
                .ok_or_else(|| no_k(&tried))?;
            let (r, ph) = render_decoder(template, tokenizer, k, dialog, add_generation_prompt)?;
            if ph.len() != n_patch {
                tried.push((k, ph.len()));
                return Err(no_k(&tried));
            }
            break (k, r, ph);
        }
        k = next as usize;
    };
    // Turn indices in the rendered messages (the placeholder turn is 0).
    let decoder_turns: Vec<usize> = dialog
        .iter()
        .enumerate()
        .filter(|(_, m)| is_decoder_turn(m))
        .map(|(i, _)| i + 1)
        .collect();
    let chosen: Vec<usize> = match labels {
        Labels::AllAssistantTurns => decoder_turns,
        Labels::LastAnswer if add_generation_prompt => Vec::new(),
        Labels::LastAnswer => decoder_turns.last().copied().into_iter().collect(),
    };
    let mut label_positions = Vec::new();
    for turn in chosen {
        let role = rendered_role(template, &dialog[turn - 1].role);
        let (a, _, e) = content_bytes(template, &r, turn, role)?;
        let range = tokens_tiling(&r.offsets, a, e, &format!("decoder turn {turn}"))?;
        label_positions.extend(range);
    }
    debug_assert!(label_positions.iter().all(|&t| t >= 1));
    Ok(DecoderPrompt {
        ids: r.ids,
        k,
        write_positions: placeholders.collect(),
        label_positions,
    })
}

/// `messages` rendered with role `from` renamed `to` (the decoder's assistant turns become
/// [`DECODER_ROLE`]): the turns of role `from` and, when `from` is `assistant`, the generation
/// prompt get the header of role `to`. Like [`ChatTemplate::render_plain`], no default system
/// prompt is injected.
///
/// When the template renders a probe turn of role `to` exactly like any other role
/// ([`ChatTemplate::renders_role_generically`]: Llama-3, Gemma, Qwen2), the messages are
/// rendered with the new role directly; otherwise (the template drops or special-cases unknown
/// roles: Qwen2.5, Qwen3, Phi-3) the headers are swapped in the text, turn by turn, keeping
/// what the template writes after a header (Qwen3's think block) and after the last turn
/// (Phi-3's eos). An error when the template's headers do not name their role, so that `to`
/// has none (Mistral; [`decoder_role`] keeps the assistant role there). When the template's
/// shape could not be derived this falls back to [`ChatTemplate::render`] with the renamed
/// roles (the generation prompt is then not renamed).
pub fn render_plain_with_role_renamed(
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
    from: &str,
    to: &str,
) -> Result<String> {
    if from == to {
        return template.render_plain(messages, add_generation_prompt);
    }
    let Some(h_from) = template.role_header(from) else {
        return template.render(&rename(messages, from, to), add_generation_prompt);
    };
    let Some(h_to) = template.role_header(to) else {
        return Err(no_header(template, to));
    };
    if template.renders_role_generically(to) {
        return plain_with_renamed_generation(
            template,
            &rename(messages, from, to),
            add_generation_prompt,
            (&h_from, &h_to, from),
        );
    }
    turn_spans_with_role_renamed(template, messages, add_generation_prompt, from, to).map(|t| t.0)
}

/// [`render_plain_with_role_renamed`]'s text with the same spans as
/// [`ChatTemplate::turn_spans`].
pub fn turn_spans_with_role_renamed(
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
    from: &str,
    to: &str,
) -> Result<TurnSpans> {
    if from == to {
        return template.turn_spans(messages, add_generation_prompt);
    }
    let Some(h_from) = template.role_header(from) else {
        let renamed = rename(messages, from, to);
        return template.turn_spans_with(&renamed, add_generation_prompt, &|m, g| {
            template.render(m, g)
        });
    };
    let Some(h_to) = template.role_header(to) else {
        return Err(no_header(template, to));
    };
    if template.renders_role_generically(to) {
        let renamed = rename(messages, from, to);
        return template.turn_spans_with(&renamed, add_generation_prompt, &|m, g| {
            plain_with_renamed_generation(template, m, g, (&h_from, &h_to, from))
        });
    }
    // The template treats `to` specially (or ignores it): render with the original roles
    // and swap the headers of the renamed turns textually.
    let (text, spans, gen) = template.turn_spans(messages, add_generation_prompt)?;
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
                    template.name()
                ))
            })?;
            out.push_str(&h_to);
            out.push_str(rest);
        } else {
            out.push_str(seg);
        }
        new_spans.push((start, out.len()));
    }
    // what follows the last turn before the generation prompt (an epilogue)
    let tail = spans.last().map_or(first, |s| s.1);
    out.push_str(&text[tail..gen.map_or(text.len(), |g| g.0)]);
    let new_gen = match gen {
        None => None,
        Some((s, e)) => {
            let start = out.len();
            let g = &text[s..e];
            out.push_str(&rename_in_generation_prompt(
                g,
                &h_from,
                &h_to,
                from,
                template.name(),
            )?);
            Some((start, out.len()))
        }
    };
    Ok((out, new_spans, new_gen))
}

/// The error for a role the template's shape gives no header.
fn no_header(template: &ChatTemplate, role: &str) -> Error {
    Error::invalid(format!(
        "chat template `{}`: its turn headers do not name their role, so a `{role}` turn cannot \
         be written",
        template.name()
    ))
}

/// [`ChatTemplate::render_plain`] of `messages` (roles already renamed) without a generation
/// prompt; with one, the body less any epilogue, then the generation prompt with the header
/// of `from` replaced by that of `to` (`headers` = (header of from, header of to, from)).
fn plain_with_renamed_generation(
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
    headers: (&str, &str, &str),
) -> Result<String> {
    let body = template.render_plain(messages, false)?;
    if !add_generation_prompt {
        return Ok(body);
    }
    let (h_from, h_to, from) = headers;
    let body = match template.epilogue() {
        Some(e) => body.strip_suffix(e).unwrap_or(&body),
        None => &body,
    };
    let gen = renamed_generation_prompt(template, h_from, h_to, from)?;
    Ok(format!("{body}{gen}"))
}

/// The template's generation prompt with the header of `from` replaced by that of `to`.
fn renamed_generation_prompt(
    template: &ChatTemplate,
    h_from: &str,
    h_to: &str,
    from: &str,
) -> Result<String> {
    rename_in_generation_prompt(
        template.generation_prompt().unwrap_or(""),
        h_from,
        h_to,
        from,
        template.name(),
    )
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
