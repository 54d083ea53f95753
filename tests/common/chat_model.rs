//! A tiny *chat* model for end-to-end tests: a complete HF-style model directory shaped like
//! SmolLM2-Instruct (byte-level BPE `tokenizer.json`, ChatML template and special tokens in
//! `tokenizer_config.json`, tied embeddings), with a random 2-layer Llama; and a toy LatentQA
//! data folder whose answers a tiny decoder can learn.

use std::path::{Path, PathBuf};

/// SmolLM2's special tokens, at SmolLM2's ids.
pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const SPECIALS: [&str; 3] = [ENDOFTEXT, IM_START, IM_END];

/// The merges, in rank order, on top of the 256 byte tokens.
pub const MERGES: [(&str, &str); 11] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("e", "r"),
    ("o", "r"),
    ("Ġ", "c"),
    ("o", "l"),
    ("Ġc", "ol"),
    ("Ġcol", "or"),
    ("Ġ", "?"),
];

/// Ids: 3 specials, then the 256 bytes in byte order, then one per merge.
pub const CHAT_VOCAB: usize = SPECIALS.len() + 256 + MERGES.len();
pub const CHAT_LAYERS: usize = 2;

/// SmolLM2-Instruct's ChatML template, without its default system prompt.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the others for the
/// characters from U+0100 on (space is `Ġ`, newline `Ċ`).
pub fn byte_char(b: u8) -> char {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b as u32) {
        return char::from_u32(b as u32).unwrap();
    }
    let n = (0..b as u32).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// The `tokenizer.json` of the chat model.
pub fn chat_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, tok) in SPECIALS.iter().enumerate() {
        vocab.insert(tok.to_string(), id.into());
        added.push(serde_json::json!({
            "id": id, "content": tok, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    for b in 0..=255u8 {
        vocab.insert(
            byte_char(b).to_string(),
            (SPECIALS.len() + b as usize).into(),
        );
    }
    let mut merges = Vec::new();
    for (i, (a, b)) in MERGES.iter().enumerate() {
        assert!(
            vocab.contains_key(*a) && vocab.contains_key(*b),
            "merge {a} {b}"
        );
        vocab.insert(format!("{a}{b}"), (SPECIALS.len() + 256 + i).into());
        merges.push(format!("{a} {b}"));
    }
    assert_eq!(vocab.len(), CHAT_VOCAB);
    serde_json::to_string_pretty(&serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        },
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    }))
    .unwrap()
}

/// The `tokenizer_config.json`: SmolLM2-Instruct's special tokens and the ChatML template.
pub fn chat_tokenizer_config_json() -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "add_prefix_space": false,
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": IM_END,
        "unk_token": ENDOFTEXT,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": CHAT_VOCAB
    }))
    .unwrap()
}

/// The `config.json`: a [`super::D`]-wide, [`CHAT_LAYERS`]-layer Llama with tied embeddings.
pub fn chat_config_json() -> String {
    chat_config_json_with(true)
}

/// [`chat_config_json`] with tied or untied embeddings.
pub fn chat_config_json_with(tied: bool) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": CHAT_VOCAB,
        "hidden_size": super::D,
        "intermediate_size": super::FF,
        "num_hidden_layers": CHAT_LAYERS,
        "num_attention_heads": super::HEADS,
        "num_key_value_heads": super::KV_HEADS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "float32"
    }))
    .unwrap()
}

/// Write a complete chat model directory into `dir` (config.json, generation_config.json,
/// tokenizer.json, tokenizer_config.json, model.safetensors) with weights from `seed`; returns
/// `dir`. Load it with `LanguageModel::load(dir.to_str().unwrap(), &Default::default())`.
pub fn write_tiny_chat_model(dir: &Path, seed: u64) -> PathBuf {
    write_tiny_chat_model_with(dir, seed, true)
}

/// [`write_tiny_chat_model`] with a separate `lm_head` when `!tied`. A random tied model
/// mostly repeats its last token (its logits are dominated by the token's own embedding); an
/// untied one generates varied text, which generation tests need.
#[allow(dead_code)]
pub fn write_tiny_chat_model_with(dir: &Path, seed: u64, tied: bool) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), chat_config_json_with(tied)).unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), chat_tokenizer_json()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        chat_tokenizer_config_json(),
    )
    .unwrap();
    let w = super::tiny_weights_with(seed, CHAT_VOCAB, CHAT_LAYERS, tied);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// A toy behaviour: `(label, topic word, QA pairs)`.
pub type ToyLabel = (&'static str, &'static str, Vec<(String, String)>);

/// The toy behaviours. Every answer is a function of the label,
/// and the label's word appears in every control, so a decoder can learn to read it.
pub fn toy_labels() -> Vec<ToyLabel> {
    let color = |word: &'static str, cap: &str| {
        vec![
            ("What color?".to_string(), format!("{cap}.")),
            (
                "What is the assistant thinking about?".to_string(),
                format!("The color {word}."),
            ),
        ]
    };
    let animal = |word: &'static str, cap: &str| {
        vec![
            ("What animal?".to_string(), format!("{cap}.")),
            (
                "What is the assistant thinking about?".to_string(),
                format!("The animal {word}."),
            ),
        ]
    };
    vec![
        ("color-red", "red", color("red", "Red")),
        ("color-blue", "blue", color("blue", "Blue")),
        ("color-green", "green", color("green", "Green")),
        ("animal-cat", "cat", animal("cat", "Cat")),
        ("animal-dog", "dog", animal("dog", "Dog")),
        ("animal-fish", "fish", animal("fish", "Fish")),
    ]
}

/// Write a toy LatentQA data folder (the format of `../shared/latentqa-data`) into `dir`: six
/// labels (`color-red`, `color-blue`, `color-green`, `animal-cat`, `animal-dog`,
/// `animal-fish`), each with two items in `control.json`, one in `stimulus.json` and one in
/// `system.json`, and two QA pairs in `qa.json` (24 items, 48 examples).
pub fn write_toy_latentqa_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut control = Vec::new();
    let mut stimulus = Vec::new();
    let mut system = Vec::new();
    let mut qa = serde_json::Map::new();
    for (label, word, pairs) in toy_labels() {
        let kind = label.split('-').next().unwrap();
        let topic = if kind == "color" {
            format!("the color {word}")
        } else {
            format!("the animal {word}")
        };
        control.push(serde_json::json!({
            "control_user": format!("Talk about {topic}."),
            "label": label
        }));
        control.push(serde_json::json!({
            "control_user": format!("In every answer, mention {topic}."),
            "label": label
        }));
        stimulus.push(serde_json::json!({
            "control_user": format!("Please keep {topic} in mind."),
            "control_thought": format!("I want to hear about {topic}."),
            "control_model": format!("Sure, I will think of {topic}."),
            "stimulus_user": "What should we talk about?",
            "label": label
        }));
        system.push(serde_json::json!({
            "system": format!("You love {topic}."),
            "stimulus_user": "Tell me something.",
            "label": label
        }));
        let pairs: Vec<serde_json::Value> = pairs
            .into_iter()
            .map(|(q, a)| serde_json::json!([q, a]))
            .collect();
        qa.insert(label.to_string(), pairs.into());
    }
    let write = |name: &str, v: serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(&v).unwrap()).unwrap()
    };
    write("control.json", control.into());
    write("stimulus.json", stimulus.into());
    write("system.json", system.into());
    write("qa.json", qa.into());
}
