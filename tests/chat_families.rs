//! The model families' real chat templates (`tests/templates/`, see its README for where each
//! comes from): the template's own renderings (system prompt, multi-turn, generation prompt),
//! the derived shape, and LatentQA's formats on them (the system and control-turn verb masks
//! token by token, the decoder prompt with the `reflect` role and its labels), with the tiny
//! byte-level tokenizer shared by the `shared/reference/arch/` fixtures (it holds every family's
//! special tokens).
//!
//! The masked span of a read prompt is positions `[1, 1 + verb_len)` (position 0 is never
//! patched): with the system mask it is everything from position 1 up to the first user turn,
//! with the control (user) mask it has the length of the first user turn plus its reply. A turn
//! is `header + content + end` (`ChatTemplate::turn_spans`); where the template folds the system
//! prompt into the user turn (Gemma, Mistral), the system part ends where the user content
//! starts, so the mask covers the user header, the system text and the `"\n\n"` separator.

use std::path::{Path, PathBuf};

use lqa::chat::{ChatTemplate, Message};
use lqa::latentqa::format::{
    decoder_role, render_plain_with_role_renamed, turn_spans_with_role_renamed,
};
use lqa::latentqa::{
    decoder_prompt, read_prompt, Labels, ReadDialog, ReadPrompt, VerbMask, BASE_REPLY,
};
use lqa::tokenizer::Tokenizer;

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

fn arch_dir(fixture: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference/arch")
        .join(fixture)
}

/// The fixtures' shared byte-level BPE (every family's special tokens).
fn tokenizer(fixture: &str) -> Tokenizer {
    Tokenizer::from_files(&arch_dir(fixture).join("tokenizer.json"), None).unwrap()
}

/// A stored real template with the family's own bos/eos tokens.
fn template(file: &str, bos: Option<&str>, eos: Option<&str>) -> ChatTemplate {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/templates")
        .join(file);
    let source = std::fs::read_to_string(&path).unwrap();
    ChatTemplate::new(&source, bos.map(String::from), eos.map(String::from)).unwrap()
}

const SYSTEM: &str = "You are a pirate.";
const USER: &str = "Recommend a book.";

fn system_dialog() -> Vec<Message> {
    vec![m("system", SYSTEM), m("user", USER)]
}

/// A control dialog: the control turn and its reply, then a question and an answer.
fn control_dialog() -> Vec<Message> {
    vec![
        m("user", "Pretend you are a cat."),
        m("assistant", "Meow, understood."),
        m("user", "What do you eat?"),
        m("assistant", "Fish!"),
    ]
}

fn multi_turn() -> Vec<Message> {
    vec![m("user", "Hi"), m("assistant", "Hello."), m("user", "Bye")]
}

/// Each token of `ids` decoded on its own, concatenated: equal to `want` only when the tokens
/// exactly tile `want`.
fn token_by_token(tok: &Tokenizer, ids: &[u32]) -> String {
    ids.iter().map(|&t| tok.decode(&[t]).unwrap()).collect()
}

/// The read prompt under `mask`, checking its geometry: the masked span `[1, 1 + verb)` and the
/// patched tail. Returns (first token, masked text, patched text), each decoded token by token.
fn masked(
    t: &ChatTemplate,
    tok: &Tokenizer,
    messages: Vec<Message>,
    gen: bool,
    mask: VerbMask,
) -> (String, String, String) {
    let rp: ReadPrompt = read_prompt(
        t,
        tok,
        &ReadDialog {
            messages,
            add_generation_prompt: gen,
            mask,
        },
    )
    .unwrap();
    let verb = rp.verb_len;
    assert_eq!(
        rp.patch_positions,
        (1 + verb..rp.ids.len()).collect::<Vec<_>>()
    );
    assert_eq!(rp.first_from, Some(1));
    (
        token_by_token(tok, &rp.ids[..1]),
        token_by_token(tok, &rp.ids[1..1 + verb]),
        token_by_token(tok, &rp.ids[1 + verb..]),
    )
}

/// What a family's LatentQA formats must give.
struct Expect {
    /// The read prompt's first token (never patched).
    first: &'static str,
    /// The system mask's masked text for [system SYSTEM, user USER] + generation prompt, and
    /// the patched rest.
    system_masked: &'static str,
    system_patched: &'static str,
    /// The control mask's first token and masked text for `control_dialog()` (no generation
    /// prompt).
    control_first: &'static str,
    control_masked: &'static str,
    /// The number of placeholders: the fixtures' tokenizer has no ` ?` token, so `"? " * k` is
    /// `2k - 1` tokens where the template trims the content, `2k` where it does not.
    n_patch: usize,
    /// The decoder prompt for `n_patch` placeholders and one question/answer, with `PH` for
    /// the placeholder text, and its labels (every decoder turn).
    decoder: &'static str,
    labels: &'static str,
    /// How the decoder prompt ends when the answer is to be generated.
    decoder_gen_tail: &'static str,
}

fn check_latentqa(t: &ChatTemplate, tok: &Tokenizer, e: &Expect) {
    let (first, masked_text, patched) = masked(t, tok, system_dialog(), true, VerbMask::System);
    assert_eq!(first, e.first);
    assert_eq!(masked_text, e.system_masked);
    assert_eq!(patched, e.system_patched);
    let (first, masked_text, _) = masked(t, tok, control_dialog(), false, VerbMask::User);
    assert_eq!(first, e.control_first);
    assert_eq!(masked_text, e.control_masked);

    let qa = vec![("What persona?".to_string(), "A pirate.".to_string())];
    let n = e.n_patch;
    let dp = decoder_prompt(t, tok, n, &qa, Labels::AllAssistantTurns, false).unwrap();
    assert_eq!(dp.write_positions.len(), n);
    let placeholder = token_by_token(
        tok,
        &dp.write_positions
            .iter()
            .map(|&p| dp.ids[p])
            .collect::<Vec<_>>(),
    );
    let raw = "? ".repeat(dp.k);
    assert!(
        placeholder == raw || placeholder == raw.trim(),
        "{placeholder:?} for k = {}",
        dp.k
    );
    assert_eq!(
        dp.write_positions,
        (dp.write_positions[0]..dp.write_positions[0] + n).collect::<Vec<_>>()
    );
    assert_eq!(
        token_by_token(tok, &dp.ids),
        e.decoder.replace("PH", &placeholder)
    );
    let labels: Vec<u32> = dp.label_positions.iter().map(|&p| dp.ids[p]).collect();
    assert_eq!(token_by_token(tok, &labels), e.labels);
    // labels are contiguous runs ending with the end of a decoder turn
    assert_eq!(*dp.label_positions.last().unwrap(), {
        let text = token_by_token(tok, &dp.ids);
        let tail = t.epilogue().unwrap_or("");
        assert!(text.ends_with(tail));
        dp.ids.len() - 1 - tok.encode(tail).unwrap().len()
    });

    let ask = vec![("What persona?".to_string(), String::new())];
    let dp = decoder_prompt(t, tok, n, &ask, Labels::LastAnswer, true).unwrap();
    assert!(dp.label_positions.is_empty());
    let text = token_by_token(tok, &dp.ids);
    assert!(text.ends_with(e.decoder_gen_tail), "{text:?}");
}

// ---------------------------------------------------------------------------------------------
// Llama 3, 3.1, 3.2

fn llama_turn(role: &str, content: &str) -> String {
    format!("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>")
}

const LLAMA_GEN: &str = "<|start_header_id|>assistant<|end_header_id|>\n\n";

const LLAMA_EXPECT: Expect = Expect {
    first: "<|begin_of_text|>",
    system_masked: "<|start_header_id|>system<|end_header_id|>\n\nYou are a pirate.<|eot_id|>",
    system_patched: "<|start_header_id|>user<|end_header_id|>\n\nRecommend a book.<|eot_id|>\
                     <|start_header_id|>assistant<|end_header_id|>\n\n",
    control_first: "<|begin_of_text|>",
    control_masked: "<|start_header_id|>user<|end_header_id|>\n\nPretend you are a cat.<|eot_id|>\
                     <|start_header_id|>assistant<|end_header_id|>\n\nMeow, understood.<|eot_id|>",
    n_patch: 3,
    decoder: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nPH<|eot_id|>\
              <|start_header_id|>reflect<|end_header_id|>\n\nSure, I've analyzed the assistant.<|eot_id|>\
              <|start_header_id|>user<|end_header_id|>\n\nWhat persona?<|eot_id|>\
              <|start_header_id|>reflect<|end_header_id|>\n\nA pirate.<|eot_id|>",
    labels: "Sure, I've analyzed the assistant.<|eot_id|>A pirate.<|eot_id|>",
    decoder_gen_tail: "What persona?<|eot_id|><|start_header_id|>reflect<|end_header_id|>\n\n",
};

fn llama(file: &str) -> ChatTemplate {
    template(file, Some("<|begin_of_text|>"), Some("<|eot_id|>"))
}

/// The derived shape and plain renderings shared by the three Llama-3 templates.
fn check_llama_plain(t: &ChatTemplate) {
    assert_eq!(t.preamble(), Some("<|begin_of_text|>"));
    assert_eq!(t.end_of_turn(), Some("<|eot_id|>"));
    assert_eq!(t.turn_end("user"), Some("<|eot_id|>"));
    assert_eq!(t.generation_prompt(), Some(LLAMA_GEN));
    assert_eq!(t.epilogue(), None);
    assert_eq!(t.system_fold_separator(), None);
    assert_eq!(t.role_header("assistant").as_deref(), Some(LLAMA_GEN));
    assert!(t.renders_role_generically("reflect"));
    assert_eq!(
        t.render_plain(&system_dialog(), true).unwrap(),
        format!(
            "<|begin_of_text|>{}{}{LLAMA_GEN}",
            llama_turn("system", SYSTEM),
            llama_turn("user", USER)
        )
    );
    assert_eq!(
        t.render_plain(&multi_turn(), false).unwrap(),
        format!(
            "<|begin_of_text|>{}{}{}",
            llama_turn("user", "Hi"),
            llama_turn("assistant", "Hello."),
            llama_turn("user", "Bye")
        )
    );
    let (text, spans, gen) = t.turn_spans(&system_dialog(), true).unwrap();
    assert_eq!(
        spans.iter().map(|&(a, b)| &text[a..b]).collect::<Vec<_>>(),
        [llama_turn("system", SYSTEM), llama_turn("user", USER)]
    );
    assert_eq!(&text[gen.unwrap().0..], LLAMA_GEN);
}

#[test]
fn llama3_template() {
    let t = llama("llama3.jinja");
    let tok = tokenizer("llama3");
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        format!(
            "<|begin_of_text|>{}{}{LLAMA_GEN}",
            llama_turn("system", SYSTEM),
            llama_turn("user", USER)
        )
    );
    assert_eq!(
        t.render(&multi_turn(), false).unwrap(),
        format!(
            "<|begin_of_text|>{}{}{}",
            llama_turn("user", "Hi"),
            llama_turn("assistant", "Hello."),
            llama_turn("user", "Bye")
        )
    );
    check_llama_plain(&t);
    check_latentqa(&t, &tok, &LLAMA_EXPECT);
}

#[test]
fn llama31_template() {
    let t = llama("llama3.1.jinja");
    let tok = tokenizer("llama3");
    let date = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
    // the template's own rendering: the date lines in the system turn, always
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        format!(
            "<|begin_of_text|>{}{}{LLAMA_GEN}",
            llama_turn("system", &format!("{date}{SYSTEM}")),
            llama_turn("user", USER)
        )
    );
    assert_eq!(
        t.render(&multi_turn(), false).unwrap(),
        format!(
            "<|begin_of_text|>{}{}{}{}",
            llama_turn("system", date),
            llama_turn("user", "Hi"),
            llama_turn("assistant", "Hello."),
            llama_turn("user", "Bye")
        )
    );
    check_llama_plain(&t);
    check_latentqa(&t, &tok, &LLAMA_EXPECT);
}

#[test]
fn llama32_template() {
    let t = llama("llama3.2.jinja");
    let tok = tokenizer("llama3");
    // Llama 3.2 writes today's date (strftime_now): check around it
    let own = t.render(&system_dialog(), true).unwrap();
    let head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                Cutting Knowledge Date: December 2023\nToday Date: ";
    let tail = format!(
        "\n\n{SYSTEM}<|eot_id|>{}{LLAMA_GEN}",
        llama_turn("user", USER)
    );
    assert!(own.starts_with(head) && own.ends_with(&tail), "{own:?}");
    let date = &own[head.len()..own.len() - tail.len()];
    assert_eq!(date.split(' ').count(), 3, "{date:?}");
    check_llama_plain(&t);
    check_latentqa(&t, &tok, &LLAMA_EXPECT);
}

// ---------------------------------------------------------------------------------------------
// Qwen2, Qwen2.5, Qwen3 (ChatML)

fn chatml(role: &str, content: &str) -> String {
    format!("<|im_start|>{role}\n{content}<|im_end|>\n")
}

const CHATML_EXPECT: Expect = Expect {
    first: "<|im_start|>",
    system_masked: "system\nYou are a pirate.<|im_end|>\n",
    system_patched: "<|im_start|>user\nRecommend a book.<|im_end|>\n<|im_start|>assistant\n",
    control_first: "<|im_start|>",
    control_masked: "user\nPretend you are a cat.<|im_end|>\n\
                     <|im_start|>assistant\nMeow, understood.<|im_end|>\n<|im_start|>",
    n_patch: 4,
    decoder: "<|im_start|>user\nPH<|im_end|>\n\
              <|im_start|>reflect\nSure, I've analyzed the assistant.<|im_end|>\n\
              <|im_start|>user\nWhat persona?<|im_end|>\n\
              <|im_start|>reflect\nA pirate.<|im_end|>\n",
    labels: "Sure, I've analyzed the assistant.<|im_end|>\nA pirate.<|im_end|>\n",
    decoder_gen_tail: "What persona?<|im_end|>\n<|im_start|>reflect\n",
};

fn qwen(file: &str) -> ChatTemplate {
    template(file, None, Some("<|im_end|>"))
}

fn check_chatml_plain(t: &ChatTemplate) {
    assert_eq!(t.preamble(), Some(""));
    assert_eq!(t.end_of_turn(), Some("<|im_end|>\n"));
    assert_eq!(t.generation_prompt(), Some("<|im_start|>assistant\n"));
    assert_eq!(t.epilogue(), None);
    assert_eq!(t.system_fold_separator(), None);
    assert_eq!(
        t.render_plain(&system_dialog(), true).unwrap(),
        format!(
            "{}{}<|im_start|>assistant\n",
            chatml("system", SYSTEM),
            chatml("user", USER)
        )
    );
    // no default system prompt
    assert_eq!(
        t.render_plain(&multi_turn(), false).unwrap(),
        format!(
            "{}{}{}",
            chatml("user", "Hi"),
            chatml("assistant", "Hello."),
            chatml("user", "Bye")
        )
    );
}

#[test]
fn qwen2_template() {
    let t = qwen("qwen2.jinja");
    let tok = tokenizer("qwen2");
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        format!(
            "{}{}<|im_start|>assistant\n",
            chatml("system", SYSTEM),
            chatml("user", USER)
        )
    );
    assert_eq!(
        t.render(&multi_turn(), false).unwrap(),
        format!(
            "{}{}{}{}",
            chatml("system", "You are a helpful assistant."),
            chatml("user", "Hi"),
            chatml("assistant", "Hello."),
            chatml("user", "Bye")
        )
    );
    check_chatml_plain(&t);
    assert!(t.renders_role_generically("reflect"));
    check_latentqa(&t, &tok, &CHATML_EXPECT);
}

#[test]
fn qwen25_template() {
    let t = qwen("qwen2.5.jinja");
    let tok = tokenizer("qwen2");
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        format!(
            "{}{}<|im_start|>assistant\n",
            chatml("system", SYSTEM),
            chatml("user", USER)
        )
    );
    assert_eq!(
        t.render(&multi_turn(), false).unwrap(),
        format!(
            "{}{}{}{}",
            chatml(
                "system",
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
            ),
            chatml("user", "Hi"),
            chatml("assistant", "Hello."),
            chatml("user", "Bye")
        )
    );
    check_chatml_plain(&t);
    // Qwen2.5 drops turns of unknown roles: the decoder's headers are swapped in the text
    assert_eq!(
        t.render(&[m("user", "Q"), m("reflect", "A")], false)
            .unwrap(),
        format!(
            "{}{}",
            chatml(
                "system",
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
            ),
            chatml("user", "Q")
        )
    );
    assert!(!t.renders_role_generically("reflect"));
    check_latentqa(&t, &tok, &CHATML_EXPECT);
}

#[test]
fn qwen3_template() {
    let t = qwen("qwen3.jinja");
    let tok = tokenizer("qwen3");
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        format!(
            "{}{}<|im_start|>assistant\n",
            chatml("system", SYSTEM),
            chatml("user", USER)
        )
    );
    // the assistant turn after the last user message gets an (empty) think block; the
    // earlier ones do not
    let think = "<think>\n\n</think>\n\n";
    let conv = vec![
        m("user", "Hi"),
        m("assistant", "Hello."),
        m("user", "Bye"),
        m("assistant", "Bye!"),
    ];
    let want = format!(
        "{}{}{}{}",
        chatml("user", "Hi"),
        chatml("assistant", "Hello."),
        chatml("user", "Bye"),
        chatml("assistant", &format!("{think}Bye!"))
    );
    assert_eq!(t.render(&conv, false).unwrap(), want);
    assert_eq!(
        t.render(&multi_turn(), true).unwrap(),
        format!(
            "{}{}{}<|im_start|>assistant\n",
            chatml("user", "Hi"),
            chatml("assistant", "Hello."),
            chatml("user", "Bye")
        )
    );
    check_chatml_plain(&t);
    // turn spans cover the think block (prefix renderings would not: the last assistant
    // turn renders differently once a user turn follows)
    let (text, spans, _) = t.turn_spans(&conv, false).unwrap();
    assert_eq!(text, want);
    assert_eq!(
        &text[spans[3].0..spans[3].1],
        chatml("assistant", &format!("{think}Bye!"))
    );
    assert!(!t.renders_role_generically("reflect"));
    // the decoder's last turn keeps the think block the template writes; it is labelled, as
    // it is what the decoder generates after its generation prompt
    let e = Expect {
        decoder: "<|im_start|>user\nPH<|im_end|>\n\
                  <|im_start|>reflect\nSure, I've analyzed the assistant.<|im_end|>\n\
                  <|im_start|>user\nWhat persona?<|im_end|>\n\
                  <|im_start|>reflect\n<think>\n\n</think>\n\nA pirate.<|im_end|>\n",
        labels: "Sure, I've analyzed the assistant.<|im_end|>\n\
                 <think>\n\n</think>\n\nA pirate.<|im_end|>\n",
        ..CHATML_EXPECT
    };
    check_latentqa(&t, &tok, &e);
}

// ---------------------------------------------------------------------------------------------
// Mistral (Mistral-Nemo-Instruct-2407: [INST], system folded into the last user turn)

#[test]
fn mistral_template() {
    let t = template("mistral.jinja", Some("<s>"), Some("</s>"));
    let tok = tokenizer("mistral");
    // the template's own rendering: the system text in the *last* user turn, no generation
    // prompt
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        "<s>[INST]You are a pirate.\n\nRecommend a book.[/INST]"
    );
    let with_system: Vec<Message> = std::iter::once(m("system", SYSTEM))
        .chain(multi_turn())
        .collect();
    assert_eq!(
        t.render(&with_system, false).unwrap(),
        "<s>[INST]Hi[/INST]Hello.</s>[INST]You are a pirate.\n\nBye[/INST]"
    );
    assert_eq!(
        t.render(&multi_turn(), false).unwrap(),
        "<s>[INST]Hi[/INST]Hello.</s>[INST]Bye[/INST]"
    );
    let err = t
        .render(&[m("user", "Q"), m("reflect", "A")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Only user and assistant roles"), "{err}");
    // the derived shape: headers without role names
    assert_eq!(t.preamble(), Some("<s>"));
    assert_eq!(t.role_header("user").as_deref(), Some("[INST]"));
    assert_eq!(t.role_header("assistant").as_deref(), Some(""));
    assert_eq!(t.role_header("reflect"), None);
    assert_eq!(t.turn_end("user"), Some("[/INST]"));
    assert_eq!(t.end_of_turn(), Some("</s>"));
    assert_eq!(t.generation_prompt(), Some(""));
    assert_eq!(t.system_fold_separator(), Some("\n\n"));
    assert_eq!(decoder_role(&t), "assistant");
    let err = render_plain_with_role_renamed(&t, &multi_turn(), false, "assistant", "reflect")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chat_template") && err.contains("do not name their role"),
        "{err}"
    );
    // plain: the system text opens the conversation (folded into the first user turn)
    assert_eq!(
        t.render_plain(&with_system, false).unwrap(),
        "<s>[INST]You are a pirate.\n\nHi[/INST]Hello.</s>[INST]Bye[/INST]"
    );
    let (text, spans, _) = t.turn_spans(&with_system, false).unwrap();
    assert_eq!(
        spans.iter().map(|&(a, b)| &text[a..b]).collect::<Vec<_>>(),
        [
            "[INST]You are a pirate.\n\n",
            "Hi[/INST]",
            "Hello.</s>",
            "[INST]Bye[/INST]"
        ]
    );
    let err = t
        .render_plain(&[m("system", SYSTEM), m("assistant", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chat_template") && err.contains("followed by a user message"),
        "{err}"
    );
    check_latentqa(
        &t,
        &tok,
        &Expect {
            first: "<s>",
            system_masked: "[INST]You are a pirate.\n\n",
            system_patched: "Recommend a book.[/INST]",
            control_first: "<s>",
            control_masked: "[INST]Pretend you are a cat.[/INST]Meow, understood.</s>",
            // the decoder's turns stay assistant turns: Mistral's turns do not name a role
            n_patch: 4,
            decoder: "<s>[INST]PH[/INST]Sure, I've analyzed the assistant.</s>\
                      [INST]What persona?[/INST]A pirate.</s>",
            labels: "Sure, I've analyzed the assistant.</s>A pirate.</s>",
            decoder_gen_tail: "[INST]What persona?[/INST]",
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Gemma 2 (rejects system messages) and Gemma 3 (folds them into the first user turn)

fn gemma_turn(role: &str, content: &str) -> String {
    format!("<start_of_turn>{role}\n{content}<end_of_turn>\n")
}

const GEMMA_EXPECT: Expect = Expect {
    first: "<bos>",
    system_masked: "<start_of_turn>user\nYou are a pirate.\n\n",
    system_patched: "Recommend a book.<end_of_turn>\n<start_of_turn>model\n",
    control_first: "<bos>",
    control_masked: "<start_of_turn>user\nPretend you are a cat.<end_of_turn>\n\
                     <start_of_turn>model\nMeow, understood.<end_of_turn>\n",
    n_patch: 3,
    decoder: "<bos><start_of_turn>user\nPH<end_of_turn>\n\
              <start_of_turn>reflect\nSure, I've analyzed the assistant.<end_of_turn>\n\
              <start_of_turn>user\nWhat persona?<end_of_turn>\n\
              <start_of_turn>reflect\nA pirate.<end_of_turn>\n",
    labels: "Sure, I've analyzed the assistant.<end_of_turn>\nA pirate.<end_of_turn>\n",
    decoder_gen_tail: "What persona?<end_of_turn>\n<start_of_turn>reflect\n",
};

fn check_gemma(t: &ChatTemplate, fixture: &str) {
    let tok = tokenizer(fixture);
    assert_eq!(
        t.render(&multi_turn(), true).unwrap(),
        format!(
            "<bos>{}{}{}<start_of_turn>model\n",
            gemma_turn("user", "Hi"),
            gemma_turn("model", "Hello."),
            gemma_turn("user", "Bye")
        )
    );
    assert_eq!(t.preamble(), Some("<bos>"));
    assert_eq!(t.end_of_turn(), Some("<end_of_turn>\n"));
    assert_eq!(
        t.role_header("assistant").as_deref(),
        Some("<start_of_turn>model\n")
    );
    assert_eq!(
        t.role_header("reflect").as_deref(),
        Some("<start_of_turn>reflect\n")
    );
    assert!(t.renders_role_generically("reflect"));
    assert_eq!(t.generation_prompt(), Some("<start_of_turn>model\n"));
    assert_eq!(t.system_fold_separator(), Some("\n\n"));
    let plain = format!(
        "<bos>{}<start_of_turn>model\n",
        gemma_turn("user", &format!("{SYSTEM}\n\n{USER}"))
    );
    assert_eq!(t.render_plain(&system_dialog(), true).unwrap(), plain);
    // the system part of the folded turn: header, system text and separator
    let (text, spans, gen) = t.turn_spans(&system_dialog(), true).unwrap();
    assert_eq!(text, plain);
    assert_eq!(
        &text[spans[0].0..spans[0].1],
        format!("<start_of_turn>user\n{SYSTEM}\n\n")
    );
    assert_eq!(
        &text[spans[1].0..spans[1].1],
        format!("{USER}<end_of_turn>\n")
    );
    assert_eq!(&text[gen.unwrap().0..], "<start_of_turn>model\n");
    // the decoder role is written as the template writes any role; the generation prompt's
    // `model` header becomes `reflect`
    assert_eq!(
        render_plain_with_role_renamed(t, &multi_turn()[..2], true, "assistant", "reflect")
            .unwrap(),
        format!(
            "<bos>{}{}<start_of_turn>reflect\n",
            gemma_turn("user", "Hi"),
            gemma_turn("reflect", "Hello.")
        )
    );
    let err = t
        .render_plain(&[m("system", SYSTEM)], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("followed by a user message"), "{err}");
    check_latentqa(t, &tok, &GEMMA_EXPECT);
}

#[test]
fn gemma2_template() {
    let t = template("gemma2.jinja", Some("<bos>"), Some("<eos>"));
    // the template's own rendering rejects a system message
    let err = t.render(&system_dialog(), true).unwrap_err().to_string();
    assert!(err.contains("System role not supported"), "{err}");
    check_gemma(&t, "gemma2");
}

#[test]
fn gemma3_template() {
    let t = template("gemma3.jinja", Some("<bos>"), Some("<eos>"));
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        format!(
            "<bos>{}<start_of_turn>model\n",
            gemma_turn("user", &format!("{SYSTEM}\n\n{USER}"))
        )
    );
    check_gemma(&t, "gemma3");
}

// ---------------------------------------------------------------------------------------------
// Phi-3 (Phi-3.5-mini-instruct: <|system|>, <|end|>, eos after the last turn)

fn phi_turn(role: &str, content: &str) -> String {
    format!("<|{role}|>\n{content}<|end|>\n")
}

#[test]
fn phi3_template() {
    let t = template("phi3.jinja", Some("<s>"), Some("<|endoftext|>"));
    let tok = tokenizer("phi3");
    assert_eq!(
        t.render(&system_dialog(), true).unwrap(),
        format!(
            "{}{}<|assistant|>\n",
            phi_turn("system", SYSTEM),
            phi_turn("user", USER)
        )
    );
    // without a generation prompt the template ends with its eos
    assert_eq!(
        t.render(&multi_turn(), false).unwrap(),
        format!(
            "{}{}{}<|endoftext|>",
            phi_turn("user", "Hi"),
            phi_turn("assistant", "Hello."),
            phi_turn("user", "Bye")
        )
    );
    assert_eq!(t.preamble(), Some(""));
    assert_eq!(t.end_of_turn(), Some("<|end|>\n"));
    assert_eq!(t.epilogue(), Some("<|endoftext|>"));
    assert_eq!(t.generation_prompt(), Some("<|assistant|>\n"));
    assert_eq!(t.system_fold_separator(), None);
    assert_eq!(t.role_header("system").as_deref(), Some("<|system|>\n"));
    // the epilogue belongs to no turn
    let (text, spans, gen) = t.turn_spans(&multi_turn(), false).unwrap();
    assert_eq!(gen, None);
    assert_eq!(spans.last().unwrap().1, text.len() - "<|endoftext|>".len());
    assert_eq!(&text[spans[2].0..spans[2].1], phi_turn("user", "Bye"));
    // Phi-3 drops turns of unknown roles: the decoder's headers are swapped in the text,
    // the epilogue kept
    assert!(!t.renders_role_generically("reflect"));
    let (text, spans, _) =
        turn_spans_with_role_renamed(&t, &multi_turn(), false, "assistant", "reflect").unwrap();
    assert_eq!(
        text,
        format!(
            "{}{}{}<|endoftext|>",
            phi_turn("user", "Hi"),
            phi_turn("reflect", "Hello."),
            phi_turn("user", "Bye")
        )
    );
    assert_eq!(&text[spans[1].0..spans[1].1], phi_turn("reflect", "Hello."));
    check_latentqa(
        &t,
        &tok,
        &Expect {
            first: "<|system|>",
            system_masked: "\nYou are a pirate.<|end|>\n",
            system_patched: "<|user|>\nRecommend a book.<|end|>\n<|assistant|>\n",
            control_first: "<|user|>",
            control_masked: "\nPretend you are a cat.<|end|>\n\
                             <|assistant|>\nMeow, understood.<|end|>\n<|user|>",
            n_patch: 4,
            decoder: "<|user|>\nPH<|end|>\n\
                      <|reflect|>\nSure, I've analyzed the assistant.<|end|>\n\
                      <|user|>\nWhat persona?<|end|>\n\
                      <|reflect|>\nA pirate.<|end|>\n<|endoftext|>",
            labels: "Sure, I've analyzed the assistant.<|end|>\nA pirate.<|end|>\n",
            decoder_gen_tail: "What persona?<|end|>\n<|reflect|>\n",
        },
    );
}

#[test]
fn base_reply_is_the_papers() {
    // the decoder expectations above spell the fixed reply out
    assert_eq!(BASE_REPLY, "Sure, I've analyzed the assistant.");
}
