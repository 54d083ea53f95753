//! Chat template tests: the default model's GGUF template against the reference texts and ids,
//! the derived plain/decoder renderings against the reference ENCODER/DECODER templates, and
//! hand-written Llama-3-style, Gemma-style and Qwen-style templates.

mod real;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Content;
use lqa::chat::{ChatTemplate, Message};
use lqa::latentqa::format::{render_plain_with_role_renamed, turn_spans_with_role_renamed};
use lqa::tokenizer::Tokenizer;

/// The real default model, fetched through the project's resolver (never skipped).
fn gguf_path() -> Option<PathBuf> {
    Some(real::gguf_path())
}

/// The PyTorch reference values (never skipped: CI has them).
fn reference() -> Option<serde_json::Value> {
    Some(real::reference().clone())
}

fn load(path: &Path) -> (Content, Tokenizer, ChatTemplate) {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = Content::read(&mut f).unwrap();
    let tok = Tokenizer::from_gguf(&ct, path).unwrap();
    let tmpl = ChatTemplate::from_gguf(&ct, &tok, path).unwrap();
    (ct, tok, tmpl)
}

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Conversations covering the LatentQA read-prompt shapes and a few edge cases.
fn conversations() -> Vec<Vec<Message>> {
    vec![
        vec![m("user", "Hi")],
        vec![
            m("system", "You are a pirate."),
            m("user", "Recommend a book."),
        ],
        vec![
            m("user", "Hide your goal."),
            m("assistant", "Understood."),
            m("user", "  Any ideas?  "),
            m("assistant", "Visit a shelter!\n"),
        ],
        vec![
            m("user", "? ? ? "),
            m("assistant", "Sure, I've analyzed the assistant."),
        ],
        vec![m("user", "<|im_start|> inside\n\n42 text")],
    ]
}

#[test]
fn gguf_template_matches_reference_conversation() {
    let (Some(path), Some(r)) = (gguf_path(), reference()) else {
        return;
    };
    let (_, tok, tmpl) = load(&path);
    let mut checked = 0;
    for e in r["tokenizer"].as_array().unwrap() {
        let Some(msgs) = e.get("messages") else {
            continue;
        };
        let msgs: Vec<Message> = serde_json::from_value(msgs.clone()).unwrap();
        let agp = e["add_generation_prompt"].as_bool().unwrap();
        let text = tmpl.render(&msgs, agp).unwrap();
        assert_eq!(text, e["text"].as_str().unwrap());
        assert_eq!(tok.encode(&text).unwrap(), ids_of(&e["ids"]));
        checked += 1;
    }
    assert_eq!(checked, 2);
    for g in r["greedy"].as_array().unwrap() {
        let msgs = vec![m("user", g["user_message"].as_str().unwrap())];
        assert_eq!(
            tmpl.render(&msgs, true).unwrap(),
            g["prompt_text"].as_str().unwrap()
        );
    }
}

#[test]
fn gguf_template_derived_shape() {
    let Some(path) = gguf_path() else { return };
    let (_, tok, tmpl) = load(&path);
    assert_eq!(tmpl.preamble(), Some(""));
    assert_eq!(
        tmpl.role_header("user").as_deref(),
        Some("<|im_start|>user\n")
    );
    assert_eq!(
        tmpl.role_header("reflect").as_deref(),
        Some("<|im_start|>reflect\n")
    );
    assert_eq!(tmpl.end_of_turn(), Some("<|im_end|>\n"));
    assert_eq!(tmpl.generation_prompt(), Some("<|im_start|>assistant\n"));
    // the reference table's header ids come out of the derived headers
    let enc = |s: String| tok.encode(&s).unwrap();
    assert_eq!(enc(tmpl.role_header("user").unwrap()), vec![1, 4093, 198]);
    assert_eq!(
        enc(tmpl.role_header("assistant").unwrap()),
        vec![1, 520, 9531, 198]
    );
    assert_eq!(
        enc(tmpl.role_header("reflect").unwrap()),
        vec![1, 40620, 198]
    );
    // the injected default system prompt is gone, an explicit system message stays
    assert_eq!(
        tmpl.render_plain(&[m("user", "Hi")], true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(tmpl
        .render(&[m("user", "Hi")], true)
        .unwrap()
        .contains("SmolLM"));
    assert_eq!(
        tmpl.render_plain(&[m("system", "S"), m("user", "Hi")], false)
            .unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    assert_eq!(
        tmpl.render_plain(&[], true).unwrap(),
        "<|im_start|>assistant\n"
    );
    assert_eq!(
        render_plain_with_role_renamed(&tmpl, &[m("user", "Q")], true, "assistant", "reflect")
            .unwrap(),
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>reflect\n"
    );
}

#[test]
fn encoder_and_decoder_templates_equal_derived_renderings() {
    let (Some(path), Some(r)) = (gguf_path(), reference()) else {
        return;
    };
    let (_, tok, tmpl) = load(&path);
    let consts = &r["chat_format_constants"];
    let encoder = ChatTemplate::new(
        consts["ENCODER_CHAT_TEMPLATE"].as_str().unwrap(),
        tok.bos_token(),
        tok.eos_token(),
    )
    .unwrap();
    let decoder = ChatTemplate::new(
        consts["DECODER_CHAT_TEMPLATE"].as_str().unwrap(),
        tok.bos_token(),
        tok.eos_token(),
    )
    .unwrap();
    for msgs in conversations() {
        for agp in [false, true] {
            assert_eq!(
                tmpl.render_plain(&msgs, agp).unwrap(),
                encoder.render(&msgs, agp).unwrap(),
                "encoder rendering of {msgs:?} (generation prompt: {agp})"
            );
            assert_eq!(
                render_plain_with_role_renamed(&tmpl, &msgs, agp, "assistant", "reflect").unwrap(),
                decoder.render(&msgs, agp).unwrap(),
                "decoder rendering of {msgs:?} (generation prompt: {agp})"
            );
            let (text, _, _) =
                turn_spans_with_role_renamed(&tmpl, &msgs, agp, "assistant", "reflect").unwrap();
            assert_eq!(text, decoder.render(&msgs, agp).unwrap());
        }
    }
}

/// Split a ChatML text into messages and whether it ends with a generation prompt.
fn parse_chatml(text: &str) -> (Vec<Message>, bool) {
    let mut msgs = Vec::new();
    let mut gen = false;
    for chunk in text.split("<|im_start|>").skip(1) {
        match chunk.split_once("<|im_end|>\n") {
            Some((turn, "")) => {
                let (role, content) = turn.split_once('\n').unwrap();
                msgs.push(m(role, content));
            }
            _ => {
                assert_eq!(chunk, "assistant\n");
                gen = true;
            }
        }
    }
    (msgs, gen)
}

#[test]
fn latentqa_read_and_write_prompts() {
    let (Some(path), Some(r)) = (gguf_path(), reference()) else {
        return;
    };
    let (_, tok, tmpl) = load(&path);
    let lqa = &r["latentqa"];
    let examples: HashMap<&str, &serde_json::Value> = lqa["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e))
        .collect();
    // read prompts: the GGUF template without its injected system prompt
    for e in examples.values() {
        let prompt = e["read_prompt"].as_str().unwrap();
        let (msgs, gen) = parse_chatml(prompt);
        assert_eq!(tmpl.render_plain(&msgs, gen).unwrap(), prompt);
    }
    // decoder prompts: "? " * k in a user turn, then the dialog, with assistant -> reflect
    let mut checked = 0;
    for c in lqa["configs"].as_array().unwrap() {
        for pe in c["per_example"].as_array().unwrap() {
            let e = examples[pe["example"].as_str().unwrap()];
            let k = pe["num_placeholders_k"].as_u64().unwrap() as usize;
            let mut msgs = vec![m("user", &"? ".repeat(k))];
            msgs.extend(serde_json::from_value::<Vec<Message>>(e["dialog"].clone()).unwrap());
            let text = render_plain_with_role_renamed(&tmpl, &msgs, false, "assistant", "reflect")
                .unwrap();
            let ids = tok.encode(&text).unwrap();
            assert_eq!(
                ids,
                ids_of(&pe["write_input_ids"]),
                "write ids of {}",
                pe["example"]
            );
            assert_eq!(ids.len() as u64, pe["write_len"].as_u64().unwrap());
            // labels: the reflect turns' content + <|im_end|> + \n, located through the spans
            let (text2, spans, gen) =
                turn_spans_with_role_renamed(&tmpl, &msgs, false, "assistant", "reflect").unwrap();
            assert_eq!(text2, text);
            assert!(gen.is_none());
            let (_, offsets) = tok.encode_with_offsets(&text).unwrap();
            let header = tmpl.role_header("reflect").unwrap();
            let last = *spans.last().unwrap();
            let label_start = last.0 + header.len();
            let labels: Vec<usize> = (0..ids.len())
                .filter(|&i| offsets[i].0 >= label_start && offsets[i].1 <= last.1)
                .collect();
            let want: Vec<usize> = ids_of(&pe["label_positions"])
                .iter()
                .map(|&x| x as usize)
                .collect();
            assert!(
                want.ends_with(&labels),
                "last reflect turn's labels of {}",
                pe["example"]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

#[test]
fn turn_spans_chatml() {
    let Some(path) = gguf_path() else { return };
    let (_, _, tmpl) = load(&path);
    for msgs in conversations() {
        for agp in [false, true] {
            let (text, spans, gen) = tmpl.turn_spans(&msgs, agp).unwrap();
            assert_eq!(text, tmpl.render_plain(&msgs, agp).unwrap());
            assert_eq!(spans.len(), msgs.len());
            let mut pos = 0;
            for (msg, &(s, e)) in msgs.iter().zip(&spans) {
                assert_eq!(s, pos);
                assert_eq!(
                    &text[s..e],
                    format!("<|im_start|>{}\n{}<|im_end|>\n", msg.role, msg.content)
                );
                pos = e;
            }
            match gen {
                Some((s, e)) => {
                    assert!(agp);
                    assert_eq!((s, &text[s..e]), (pos, "<|im_start|>assistant\n"));
                    assert_eq!(e, text.len());
                }
                None => {
                    assert!(!agp);
                    assert_eq!(pos, text.len());
                }
            }
        }
    }
}

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// A reduced Llama-3.1 template: always writes a system turn with knowledge-date lines.
const LLAMA31: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

fn llama_turn(role: &str, content: &str) -> String {
    format!("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>")
}

#[test]
fn llama3_template() {
    let t = ChatTemplate::new(
        LLAMA3,
        Some("<|begin_of_text|>".into()),
        Some("<|end_of_text|>".into()),
    )
    .unwrap();
    assert_eq!(t.preamble(), Some("<|begin_of_text|>"));
    assert_eq!(t.end_of_turn(), Some("<|eot_id|>"));
    assert_eq!(
        t.role_header("user").as_deref(),
        Some("<|start_header_id|>user<|end_header_id|>\n\n")
    );
    let msgs = vec![
        m("user", " Hi "),
        m("assistant", "Hello."),
        m("user", "Bye"),
    ];
    let want = format!(
        "<|begin_of_text|>{}{}{}",
        llama_turn("user", "Hi"),
        llama_turn("assistant", "Hello."),
        llama_turn("user", "Bye")
    );
    let gen = "<|start_header_id|>assistant<|end_header_id|>\n\n";
    assert_eq!(t.render_plain(&msgs, false).unwrap(), want);
    assert_eq!(t.render_plain(&msgs, true).unwrap(), format!("{want}{gen}"));
    assert_eq!(
        t.render_plain(&msgs, true).unwrap(),
        t.render(&msgs, true).unwrap()
    );
    let (text, spans, g) = t.turn_spans(&msgs, true).unwrap();
    assert_eq!(spans[0].0, "<|begin_of_text|>".len());
    for (msg, &(s, e)) in msgs.iter().zip(&spans) {
        assert_eq!(&text[s..e], llama_turn(&msg.role, msg.content.trim()));
    }
    assert_eq!(&text[g.unwrap().0..g.unwrap().1], gen);
    // decoder: assistant -> reflect, generation prompt included
    let renamed = render_plain_with_role_renamed(&t, &msgs, true, "assistant", "reflect").unwrap();
    assert_eq!(
        renamed,
        format!(
            "<|begin_of_text|>{}{}{}<|start_header_id|>reflect<|end_header_id|>\n\n",
            llama_turn("user", "Hi"),
            llama_turn("reflect", "Hello."),
            llama_turn("user", "Bye")
        )
    );
    let sys = vec![m("system", "Be brief."), m("user", "Hi")];
    assert_eq!(
        t.render_plain(&sys, false).unwrap(),
        format!(
            "<|begin_of_text|>{}{}",
            llama_turn("system", "Be brief."),
            llama_turn("user", "Hi")
        )
    );
}

#[test]
fn llama31_injected_system_block_removed() {
    let t = ChatTemplate::new(LLAMA31, Some("<|begin_of_text|>".into()), None).unwrap();
    let date = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
    // the template's own rendering always has the system block (and no tools line: tools = none)
    assert_eq!(
        t.render(&[m("user", "Hi")], false).unwrap(),
        format!(
            "<|begin_of_text|>{}{}",
            llama_turn("system", date),
            llama_turn("user", "Hi")
        )
    );
    assert_eq!(
        t.render_plain(&[m("user", "Hi")], true).unwrap(),
        format!(
            "<|begin_of_text|>{}<|start_header_id|>assistant<|end_header_id|>\n\n",
            llama_turn("user", "Hi")
        )
    );
    // an explicit system message stays, without the date lines
    let sys = vec![m("system", "Be brief."), m("user", "Hi")];
    assert_eq!(
        t.render_plain(&sys, false).unwrap(),
        format!(
            "<|begin_of_text|>{}{}",
            llama_turn("system", "Be brief."),
            llama_turn("user", "Hi")
        )
    );
    let (text, spans, _) = t.turn_spans(&sys, false).unwrap();
    assert_eq!(
        &text[spans[0].0..spans[0].1],
        llama_turn("system", "Be brief.")
    );
}

/// A template whose system-turn decoration changes with the conversation (as Llama 3.2's
/// holds today's date): the decoration removed is the one rendered for that conversation, not
/// the one the probes saw.
const VARYING_DECORATION: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set msgs = messages[1:] %}<|start_header_id|>system<|end_header_id|>\n\nTurns: {{ messages|length }}\n{{ messages[0]['content'] }}<|eot_id|>{% else %}{% set msgs = messages %}{% endif %}{% for m in msgs %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

#[test]
fn system_decoration_removed_as_rendered() {
    let t = ChatTemplate::new(VARYING_DECORATION, Some("<|begin_of_text|>".into()), None).unwrap();
    let conv = vec![
        m("system", "Be brief."),
        m("user", "Hi"),
        m("assistant", "Yo"),
        m("user", "Bye"),
    ];
    assert!(t
        .render(&conv, false)
        .unwrap()
        .contains("Turns: 4\nBe brief."));
    let turns = |msgs: &[Message]| -> String {
        msgs.iter()
            .map(|x| llama_turn(&x.role, &x.content))
            .collect()
    };
    assert_eq!(
        t.render_plain(&conv, true).unwrap(),
        format!(
            "<|begin_of_text|>{}<|start_header_id|>assistant<|end_header_id|>\n\n",
            turns(&conv)
        )
    );
    assert_eq!(
        t.render_plain(&conv[1..], false).unwrap(),
        format!("<|begin_of_text|>{}", turns(&conv[1..]))
    );
}

/// Gemma-2's template: no system role, assistant shown as "model" (its derived shape is tested
/// in `chat_families.rs`; here it is a `tokenizer_config.json` entry).
const GEMMA: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";

/// A template the probes cannot read: each content is written twice.
const UNFITTING: &str = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ m.content }}</t>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

#[test]
fn unfitting_template_falls_back_to_plain_render() {
    let t = ChatTemplate::new(UNFITTING, Some("<bos>".into()), Some("<eos>".into())).unwrap();
    assert_eq!(t.role_header("user"), None);
    assert_eq!(t.preamble(), None);
    assert_eq!(t.end_of_turn(), Some("</t>"));
    let msgs = vec![m("system", "S"), m("user", "Hi"), m("assistant", "Yo")];
    assert_eq!(
        t.render_plain(&msgs, true).unwrap(),
        t.render(&msgs, true).unwrap()
    );
    // spans from prefix renderings; the preamble is the rendering of no messages
    let (text, spans, gen) = t.turn_spans(&msgs, true).unwrap();
    let turns = ["<system>SS</t>", "<user>HiHi</t>", "<assistant>YoYo</t>"];
    assert_eq!(text, format!("<bos>{}<assistant>", turns.concat()));
    let mut start = "<bos>".len();
    for (turn, &(s, e)) in turns.iter().zip(&spans) {
        assert_eq!((s, &text[s..e]), (start, *turn));
        start = e;
    }
    assert_eq!(gen, Some((start, text.len())));
}

/// Qwen-style: only known roles are rendered, so a `reflect` turn would vanish.
const KNOWN_ROLES_ONLY: &str = "{%- for message in messages %}{%- if message.role in ['system', 'user', 'assistant'] %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}";

#[test]
fn role_rename_when_template_ignores_the_new_role() {
    let t = ChatTemplate::new(KNOWN_ROLES_ONLY, None, None).unwrap();
    let msgs = vec![m("user", "Q"), m("assistant", "A"), m("user", "Q2")];
    assert_eq!(
        t.render(&[m("user", "Q"), m("reflect", "A")], false)
            .unwrap(),
        "<|im_start|>user\nQ<|im_end|>\n"
    );
    let want = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>reflect\nA<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>reflect\n";
    assert_eq!(
        render_plain_with_role_renamed(&t, &msgs, true, "assistant", "reflect").unwrap(),
        want
    );
    let (text, spans, gen) =
        turn_spans_with_role_renamed(&t, &msgs, true, "assistant", "reflect").unwrap();
    assert_eq!(text, want);
    assert_eq!(
        &text[spans[1].0..spans[1].1],
        "<|im_start|>reflect\nA<|im_end|>\n"
    );
    assert_eq!(
        &text[gen.unwrap().0..gen.unwrap().1],
        "<|im_start|>reflect\n"
    );
}

#[test]
fn hf_environment_features() {
    // pycompat methods, raise_exception, tojson, strftime_now, loop helpers, namespace
    let src = r#"{%- set ns = namespace(n=0) -%}
{%- for message in messages -%}
{%- set ns.n = ns.n + 1 -%}
{%- if message['content'].strip().startswith('!') -%}{{ raise_exception('no bangs: ' + message.role) }}{%- endif -%}
[{{ message.role.upper() }}|{{ message.content.strip() }}|{{ message | tojson }}]
{%- endfor -%}
{{ ns.n }}{% if strftime_now('%Y')|length == 4 %}Y{% endif %}{{ undefined_thing }}{{ eos_token }}"#;
    let t = ChatTemplate::new(src, None, Some("</s>".into())).unwrap();
    let out = t.render(&[m("user", "  hé \"x\" ")], false).unwrap();
    assert_eq!(
        out,
        r#"[USER|hé "x"|{"role": "user", "content": "  hé \"x\" "}]1Y</s>"#
    );
    let err = t
        .render(&[m("user", " !x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no bangs: user"), "{err}");
    // {% generation %} blocks render their content
    let t = ChatTemplate::new(
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    assert_eq!(t.render(&[m("user", "x")], false).unwrap(), "x");
    let t = ChatTemplate::new(
        "{{ messages[0].content | tojson(ensure_ascii=True) }}",
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        t.render(&[m("user", "é🦀")], false).unwrap(),
        r#""\u00e9\ud83e\udd80""#
    );
    // tojson with indent
    let t = ChatTemplate::new("{{ messages[0] | tojson(indent=2) }}", None, None).unwrap();
    assert_eq!(
        t.render(&[m("user", "x")], false).unwrap(),
        "{\n  \"role\": \"user\",\n  \"content\": \"x\"\n}"
    );
}

#[test]
fn compile_errors_name_the_template() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chat_template"), "{err}");
    let Some(path) = gguf_path() else { return };
    let (mut ct, tok, _) = load(&path);
    ct.metadata.insert(
        "tokenizer.chat_template".into(),
        candle_core::quantized::gguf_file::Value::String("{% if %}".into()),
    );
    let err = ChatTemplate::from_gguf(&ct, &tok, &path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.chat_template") && err.contains(".gguf"),
        "{err}"
    );
    ct.metadata.remove("tokenizer.chat_template");
    let err = ChatTemplate::from_gguf(&ct, &tok, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn tokenizer_config_templates() {
    let Some(path) = gguf_path() else { return };
    let (_, tok, _) = load(&path);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tokenizer_config.json");
    let write = |v: serde_json::Value| std::fs::write(&cfg, v.to_string()).unwrap();

    write(serde_json::json!({"chat_template": LLAMA3}));
    let t = ChatTemplate::from_tokenizer_config(&cfg, &tok)
        .unwrap()
        .unwrap();
    assert_eq!(t.source(), LLAMA3);
    // bos_token comes from the tokenizer: <|im_start|> for the default model
    assert!(t
        .render(&[m("user", "x")], false)
        .unwrap()
        .starts_with("<|im_start|><|start_header_id|>"));

    write(serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": GEMMA},
    ]}));
    let t = ChatTemplate::from_tokenizer_config(&cfg, &tok)
        .unwrap()
        .unwrap();
    assert_eq!(t.source(), GEMMA);

    write(serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}]}));
    let err = ChatTemplate::from_tokenizer_config(&cfg, &tok)
        .unwrap_err()
        .to_string();
    assert!(err.contains("default") && err.contains("tool_use"), "{err}");

    write(serde_json::json!({"eos_token": "<|im_end|>"}));
    assert!(ChatTemplate::from_tokenizer_config(&cfg, &tok)
        .unwrap()
        .is_none());
    std::fs::write(dir.path().join("chat_template.jinja"), KNOWN_ROLES_ONLY).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&cfg, &tok)
        .unwrap()
        .unwrap();
    assert_eq!(t.source(), KNOWN_ROLES_ONLY);

    let err = ChatTemplate::from_tokenizer_config(&dir.path().join("nope.json"), &tok).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
}
