//! Tokenizer tests: the default model's GGUF tokenizer against the PyTorch reference ids, a
//! `tokenizer.json` round trip, and synthetic GGUF vocabularies for the other code paths.

mod real;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use lqa::tokenizer::Tokenizer;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

/// The real default model, fetched through the project's resolver (never skipped).
fn gguf_path() -> Option<PathBuf> {
    Some(real::gguf_path())
}

/// The PyTorch reference values (never skipped: CI has them).
fn reference() -> Option<serde_json::Value> {
    Some(real::reference().clone())
}

fn load(path: &Path) -> (Content, Tokenizer) {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = Content::read(&mut f).unwrap();
    let (tok, _) = lqa::chat::load_gguf(&ct, path).unwrap();
    (ct, tok)
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn default_model_special_tokens() {
    let Some(path) = gguf_path() else { return };
    let (_, tok) = load(&path);
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.bos_token().as_deref(), Some("<|im_start|>"));
    // eos: the GGUF's <|im_end|>; the chat template's end of turn is the same token.
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.eos_token().as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.pad_id(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
    assert_eq!(tok.id_to_token(198).as_deref(), Some("Ċ"));
    // special tokens in text are single tokens; nothing is prepended
    assert_eq!(
        tok.encode("<|im_start|>user\n").unwrap(),
        vec![1, 4093, 198]
    );
    assert_eq!(
        tok.encode("<|im_start|>assistant\n").unwrap(),
        vec![1, 520, 9531, 198]
    );
    assert_eq!(
        tok.encode("<|im_start|>reflect\n").unwrap(),
        vec![1, 40620, 198]
    );
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
}

#[test]
fn default_model_digit_split() {
    let Some(path) = gguf_path() else { return };
    let (_, tok) = load(&path);
    // llama.cpp's `smollm` pre-tokenizer: digits split off before the GPT-2 regex
    assert_eq!(tok.encode("\n\n42").unwrap(), vec![1116, 36, 34]);
    assert_eq!(tok.encode("  7").unwrap(), vec![256, 39]);
    assert_eq!(tok.decode(&[1116, 36, 34]).unwrap(), "\n\n42");
}

#[test]
fn default_model_matches_reference_strings() {
    let (Some(path), Some(r)) = (gguf_path(), reference()) else {
        return;
    };
    let (_, tok) = load(&path);
    let entries = r["tokenizer"].as_array().unwrap();
    assert_eq!(entries.len(), 6);
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let text = e["text"].as_str().unwrap();
        let want = ids_of(&e["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "ids of `{name}`");
        let tokens: Vec<String> = serde_json::from_value(e["tokens"].clone()).unwrap();
        let got_tokens: Vec<String> = got.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        assert_eq!(got_tokens, tokens, "tokens of `{name}`");
        assert_eq!(
            tok.decode(&got).unwrap(),
            text,
            "decode round trip of `{name}`"
        );
    }
}

#[test]
fn default_model_matches_reference_prompts() {
    let (Some(path), Some(r)) = (gguf_path(), reference()) else {
        return;
    };
    let (_, tok) = load(&path);
    for g in r["greedy"].as_array().unwrap() {
        let text = g["prompt_text"].as_str().unwrap();
        assert_eq!(tok.encode(text).unwrap(), ids_of(&g["prompt_ids"]));
        let gen = ids_of(&g["generated_ids"]);
        assert_eq!(
            tok.decode(&gen).unwrap(),
            g["generated_text"].as_str().unwrap()
        );
    }
    // LatentQA read prompts: the read ids stored with each config's per-example results
    let examples: HashMap<&str, &str> = r["latentqa"]["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["read_prompt"].as_str().unwrap(),
            )
        })
        .collect();
    let mut checked = 0;
    for c in r["latentqa"]["configs"].as_array().unwrap() {
        for pe in c["per_example"].as_array().unwrap() {
            let prompt = examples[pe["example"].as_str().unwrap()];
            let ids = tok.encode(prompt).unwrap();
            assert_eq!(ids, ids_of(&pe["read_input_ids"]));
            assert_eq!(ids.len() as u64, pe["read_len"].as_u64().unwrap());
            assert_eq!(tok.decode(&ids).unwrap(), prompt);
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

#[test]
fn offsets_tile_the_text() {
    let Some(path) = gguf_path() else { return };
    let (_, tok) = load(&path);
    let text = "<|im_start|>user\nOrder #12345,  two\tspaces\n\n42<|im_end|>\n";
    let (ids, offsets) = tok.encode_with_offsets(text).unwrap();
    assert_eq!(ids, tok.encode(text).unwrap());
    assert_eq!(ids.len(), offsets.len());
    let mut pos = 0;
    for (&id, &(s, e)) in ids.iter().zip(&offsets) {
        assert_eq!(s, pos, "offsets must be contiguous");
        assert_eq!(tok.decode(&[id]).unwrap(), &text[s..e]);
        pos = e;
    }
    assert_eq!(pos, text.len());
    // a multi-byte character split across tokens: every span stays inside the text
    let text = "emoji 🦀!";
    let (_, offsets) = tok.encode_with_offsets(text).unwrap();
    assert!(offsets.iter().all(|&(s, e)| s <= e && e <= text.len()));
    assert_eq!(offsets.last().unwrap().1, text.len());
}

#[test]
fn from_files_roundtrip() {
    let Some(path) = gguf_path() else { return };
    let (ct, tok) = load(&path);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("tokenizer.json");
    tok.inner().save(&json, false).unwrap();
    let template = ct.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone();
    let cfg = dir.path().join("tokenizer_config.json");
    let cfg_json = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|endoftext|>", "special": true},
        "pad_token": "<|im_end|>",
        "add_bos_token": false,
        "chat_template": template,
    });
    std::fs::write(&cfg, serde_json::to_string(&cfg_json).unwrap()).unwrap();
    let (t2, _) = lqa::chat::load_files(&json, Some(&cfg)).unwrap();
    let text = "<|im_start|>user\nHi there!\n\n42  7 🦀<|im_end|>\n";
    assert_eq!(t2.encode(text).unwrap(), tok.encode(text).unwrap());
    assert_eq!(t2.decode(&tok.encode(text).unwrap()).unwrap(), text);
    assert_eq!(t2.bos_id(), Some(1));
    assert_eq!(t2.pad_id(), Some(2));
    // the config's eos first, then the template's end-of-turn token
    assert_eq!(t2.eos_ids(), &[0, 2]);
    assert_eq!(t2.eos_token().as_deref(), Some("<|endoftext|>"));
    assert!(!t2.add_bos());

    // without a config: no special ids
    let t3 = Tokenizer::from_files(&json, None).unwrap();
    assert_eq!(t3.bos_id(), None);
    assert!(t3.eos_ids().is_empty());
    assert_eq!(t3.encode(text).unwrap(), tok.encode(text).unwrap());

    // a config naming a token that is not in the vocabulary
    std::fs::write(&cfg, r#"{"eos_token": "<nope>"}"#).unwrap();
    let err = Tokenizer::from_files(&json, Some(&cfg))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<nope>") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    // a missing tokenizer.json names the file
    let err = Tokenizer::from_files(&dir.path().join("missing.json"), None).unwrap_err();
    assert!(err.to_string().contains("missing.json"), "{err}");
}

// ---- synthetic GGUF metadata ----

fn strings(v: &[&str]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
}

fn content(meta: Vec<(&str, Value)>) -> Content {
    Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

/// A byte-level vocabulary: the 256 byte symbols, a few merges, and specials.
fn byte_level_content(pre: &str, extra: Vec<(&str, Value)>) -> Content {
    let mut tokens: Vec<String> = vec!["<|bos|>".into(), "<|eos|>".into(), "<|eot|>".into()];
    // GPT-2's bytes_to_unicode
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    for c in &cs {
        tokens.push(char::from_u32(*c).unwrap().to_string());
    }
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ hello", "1 2", "12 3"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![Value::I32(3); 3];
    types.extend(std::iter::repeat_n(Value::I32(1), tokens.len() - 3));
    let toks: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let mut meta = vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(&toks)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
    ];
    meta.extend(extra);
    content(meta)
}

fn splits(tok: &Tokenizer, text: &str) -> Vec<String> {
    let mut pre = PreTokenizedString::from(text);
    tok.inner()
        .get_pre_tokenizer()
        .unwrap()
        .pre_tokenize(&mut pre)
        .unwrap();
    pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
}

#[test]
fn pre_tokenizer_kinds() {
    let p = Path::new("synthetic.gguf");
    let sample = "Hello'Ve world 123\n\n  foo";
    let smollm = Tokenizer::from_gguf(&byte_level_content("smollm", vec![]), p).unwrap();
    assert_eq!(
        splits(&smollm, sample),
        ["Hello", "'", "Ve", "Ġworld", "Ġ", "1", "2", "3", "ĊĊĠ", "Ġfoo"]
    );
    let gpt2 = Tokenizer::from_gguf(&byte_level_content("gpt2", vec![]), p).unwrap();
    assert_eq!(
        splits(&gpt2, sample),
        ["Hello", "'", "Ve", "Ġworld", "Ġ123", "ĊĊĠ", "Ġfoo"]
    );
    let llama3 = Tokenizer::from_gguf(&byte_level_content("llama-bpe", vec![]), p).unwrap();
    assert_eq!(
        splits(&llama3, sample),
        ["Hello", "'Ve", "Ġworld", "Ġ", "123", "ĊĊ", "Ġ", "Ġfoo"]
    );
    let qwen2 = Tokenizer::from_gguf(&byte_level_content("qwen2", vec![]), p).unwrap();
    assert_eq!(
        splits(&qwen2, sample),
        ["Hello", "'Ve", "Ġworld", "Ġ", "1", "2", "3", "ĊĊ", "Ġ", "Ġfoo"]
    );
    // llama.cpp defaults: llama-bpe adds a BOS, the others do not, unless the GGUF says so
    assert!(llama3.add_bos());
    assert!(!gpt2.add_bos());
    let forced = byte_level_content(
        "gpt2",
        vec![("tokenizer.ggml.add_bos_token", Value::Bool(true))],
    );
    assert!(Tokenizer::from_gguf(&forced, p).unwrap().add_bos());
    // an unknown pre-tokenizer falls back to GPT-2's
    let odd = Tokenizer::from_gguf(&byte_level_content("no-such-pre", vec![]), p).unwrap();
    assert_eq!(splits(&odd, sample), splits(&gpt2, sample));
}

#[test]
fn synthetic_byte_level_bpe() {
    let p = Path::new("synthetic.gguf");
    let tok = Tokenizer::from_gguf(&byte_level_content("gpt2", vec![]), p).unwrap();
    let hello = tok.token_to_id("hello").unwrap();
    let space_hello = tok.token_to_id("Ġhello").unwrap();
    let ids = tok.encode("<|bos|>hello hello<|eot|>").unwrap();
    assert_eq!(ids, vec![0, hello, space_hello, 2]);
    assert_eq!(tok.decode(&ids).unwrap(), "<|bos|>hello hello<|eot|>");
    assert_eq!(tok.eos_ids(), &[1]);
}

#[test]
fn eos_ids_from_metadata_and_template() {
    let p = Path::new("synthetic.gguf");
    // eot_token_id from the metadata
    let ct = byte_level_content("gpt2", vec![("tokenizer.ggml.eot_token_id", Value::U32(2))]);
    assert_eq!(lqa::chat::load_gguf(&ct, p).unwrap().0.eos_ids(), &[1, 2]);
    // the chat template's end-of-turn token, found by rendering a probe conversation
    let template =
        "{% for m in messages %}<|bos|>{{ m.role }}\n{{ m.content }}<|eot|>\n{% endfor %}";
    let ct = byte_level_content(
        "gpt2",
        vec![("tokenizer.chat_template", Value::String(template.into()))],
    );
    assert_eq!(lqa::chat::load_gguf(&ct, p).unwrap().0.eos_ids(), &[1, 2]);
    // a template ending turns with plain text adds nothing
    let template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
    let ct = byte_level_content(
        "gpt2",
        vec![("tokenizer.chat_template", Value::String(template.into()))],
    );
    assert_eq!(lqa::chat::load_gguf(&ct, p).unwrap().0.eos_ids(), &[1]);
}

#[test]
fn synthetic_sentencepiece() {
    let p = Path::new("spm.gguf");
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
    let mut scores = vec![Value::F32(0.0); 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(Value::I32(6));
        scores.push(Value::F32(0.0));
    }
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("▁h", -3.0),
        ("ll", -4.0),
        ("ell", -5.0),
        ("ello", -6.0),
        ("▁hello", -7.0),
        ("or", -8.0),
        ("▁w", -9.0),
    ];
    for (piece, score) in pieces {
        tokens.push(piece.to_string());
        types.push(Value::I32(1));
        scores.push(Value::F32(score));
    }
    let toks: Vec<&str> = tokens.iter().map(|s| s.as_str()).collect();
    let ct = content(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(&toks)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.scores", Value::Array(scores)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]);
    let tok = Tokenizer::from_gguf(&ct, p).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert!(tok.add_bos(), "SentencePiece models add a BOS by default");
    assert_eq!(tok.encode("hello").unwrap(), vec![id("▁hello")]);
    // "world": ▁w o r l d -> ▁w + or + l + d; "!" falls back to its byte
    assert_eq!(
        tok.encode("hello world!").unwrap(),
        vec![
            id("▁hello"),
            id("▁w"),
            id("or"),
            id("l"),
            id("d"),
            id("<0x21>")
        ]
    );
    assert_eq!(
        tok.decode(&tok.encode("hello world!").unwrap()).unwrap(),
        "hello world!"
    );
    // special tokens in text; the text after one gets its own space prefix, as in llama.cpp
    assert_eq!(tok.encode("<s>hello").unwrap(), vec![1, id("▁hello")]);
}

#[test]
fn unsupported_and_broken_metadata() {
    let p = Path::new("weird.gguf");
    let ct = content(vec![
        ("tokenizer.ggml.model", Value::String("bert".into())),
        ("tokenizer.ggml.tokens", strings(&["a"])),
    ]);
    let err = Tokenizer::from_gguf(&ct, p).unwrap_err().to_string();
    assert!(err.contains("weird.gguf") && err.contains("bert"), "{err}");
    let err = Tokenizer::from_gguf(&content(vec![]), p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
    let ct = byte_level_content(
        "gpt2",
        vec![("tokenizer.ggml.bos_token_id", Value::U32(99_999))],
    );
    let err = Tokenizer::from_gguf(&ct, p).unwrap_err().to_string();
    assert!(err.contains("bos_token_id"), "{err}");
}
