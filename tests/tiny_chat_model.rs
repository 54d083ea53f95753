//! The tiny chat model fixture loads through the normal resolver like a real SmolLM2-Instruct
//! directory: tokenizer with special tokens, ChatML template, generation; and the toy LatentQA
//! data loads as LIT data.

mod common;

use common::chat_model::{
    write_tiny_chat_model, write_toy_latentqa_data, CHAT_LAYERS, CHAT_VOCAB, IM_END, IM_START,
};
use lqa::chat::Message;
use lqa::generate::GenOptions;
use lqa::lit::data::{DataOptions, ItemKind, LitData};
use lqa::lm::LanguageModel;

fn load(dir: &std::path::Path) -> LanguageModel {
    LanguageModel::load(dir.to_str().unwrap(), &Default::default()).unwrap()
}

#[test]
fn tiny_chat_model_loads_through_the_resolver() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny_chat_model(&tmp.path().join("tiny-chat"), 7);
    let lm = load(&dir);
    assert_eq!(lm.model.n_layers(), CHAT_LAYERS);
    assert_eq!(lm.tokenizer.vocab_size(), CHAT_VOCAB);
    assert_eq!(lm.tokenizer.token_to_id(IM_START), Some(1));
    assert_eq!(lm.tokenizer.token_to_id(IM_END), Some(2));
    assert_eq!(lm.tokenizer.bos_id(), Some(1));
    assert_eq!(lm.tokenizer.eos_ids(), &[2]);
    assert_eq!(lm.pad_id(), 2);
    assert!(
        !lm.tokenizer.add_bos(),
        "like SmolLM2: the BOS is a chat token, not prepended"
    );
    assert_eq!(lm.stop_ids(), vec![2]);
}

#[test]
fn tiny_chat_tokenizer_round_trips_with_special_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = load(&write_tiny_chat_model(tmp.path(), 1));
    let text = "<|im_start|>user\nWhat is the color of the sky? Ünïcödé ✓<|im_end|>\n";
    let ids = lm.tokenizer.encode(text).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one token");
    assert_eq!(
        ids.iter().filter(|&&i| i == 2).count(),
        1,
        "<|im_end|> is one token"
    );
    assert_eq!(lm.tokenizer.decode(&ids).unwrap(), text);
    // the merges apply: " the" and " color" are single tokens
    let the = lm.tokenizer.token_to_id("Ġthe").unwrap();
    let color = lm.tokenizer.token_to_id("Ġcolor").unwrap();
    assert_eq!(lm.tokenizer.encode(" the").unwrap(), vec![the]);
    assert!(ids.contains(&the) && ids.contains(&color));
    // plain bytes: "a" is byte 97 at id 3 + 97
    assert_eq!(lm.tokenizer.encode("a").unwrap(), vec![3 + 97]);
    assert_eq!(
        lm.encode_prompt("a").unwrap(),
        vec![3 + 97],
        "no BOS prepended"
    );
}

#[test]
fn tiny_chat_model_renders_chat_and_generates() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = load(&write_tiny_chat_model(tmp.path(), 3));
    let messages = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi!"),
    ];
    let prompt = lm.chat_prompt(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        lm.chat_prompt(&messages[1..], false).unwrap(),
        "<|im_start|>user\nHi!<|im_end|>\n"
    );
    let opts = GenOptions {
        max_new_tokens: 6,
        stop_ids: lm.stop_ids(),
        ..Default::default()
    };
    let out = lm
        .generate(
            &[
                prompt.clone(),
                "<|im_start|>user\nA longer prompt here.".into(),
            ],
            &opts,
            None,
        )
        .unwrap();
    assert_eq!(out.len(), 2);
    // greedy decoding is deterministic
    let again = lm.generate(&[prompt], &opts, None).unwrap();
    assert_eq!(again[0], out[0]);
    let logits = lm.logits("<|im_start|>user\nHi").unwrap();
    assert_eq!(logits.dims(), &[CHAT_VOCAB]);
}

#[test]
fn toy_latentqa_data_loads() {
    let tmp = tempfile::tempdir().unwrap();
    write_toy_latentqa_data(tmp.path());
    let data = LitData::load_dir(tmp.path(), &DataOptions::default()).unwrap();
    assert_eq!(data.labels().len(), 6);
    assert_eq!(data.items.len(), 24);
    assert_eq!(data.examples.len(), 48);
    for kind in [ItemKind::Control, ItemKind::Stimulus, ItemKind::System] {
        assert_eq!(
            data.items.iter().filter(|i| i.kind == kind).count(),
            if kind == ItemKind::Control { 12 } else { 6 }
        );
    }
    // answers are a function of the label
    let red: Vec<_> = data
        .examples
        .iter()
        .filter(|e| e.item.label == "color-red")
        .map(|e| (e.question.as_str(), e.answer.as_str()))
        .collect();
    assert!(red.contains(&("What color?", "Red.")));
    assert_eq!(red.len(), 8);
    let (train, eval) = data.split_by_label(0.34, 0).unwrap();
    assert_eq!(train.len() + eval.len(), 48);
    assert_eq!(eval.len(), 16, "two of six labels held out");
}
