//! Reading on the tiny chat model: `Decoder::ask` batched equals one question at a time, the KV
//! cache equals full recomputation, and the verb masks drop exactly the positions before the
//! second user turn (or the system prompt).

mod common;

use candle_core::{Device, Tensor};
use common::chat_model::{write_tiny_chat_model_with, CHAT_LAYERS};
use lqa::chat::Message;
use lqa::hooks::HookPoint;
use lqa::latentqa::decoder::Decoder;
use lqa::latentqa::read::AskOptions;
use lqa::lm::LanguageModel;
use lqa::lora::{Adapter, LoraConfig};
use std::sync::Arc;

const READ: usize = 1;

fn target(dir: &std::path::Path) -> Arc<LanguageModel> {
    let dir = write_tiny_chat_model_with(&dir.join("tiny-chat"), 11, false);
    Arc::new(LanguageModel::load(dir.to_str().unwrap(), &Default::default()).unwrap())
}

/// A decoder that differs from its target: a LoRA with random (non-zero) B matrices.
fn decoder(lm: Arc<LanguageModel>) -> Decoder {
    let mut d = Decoder::untrained(lm, READ, 0);
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        ..LoraConfig::paper_decoder()
    };
    let adapter = Adapter::new(&d.model, cfg, 3).unwrap();
    for (i, w) in adapter.layers.values().enumerate() {
        let v: Vec<f32> = (0..w.b.elem_count())
            .map(|j| (((j * 31 + i * 17) % 13) as f32 - 6.0) / 12.0)
            .collect();
        w.b.set(&Tensor::from_vec(v, w.b.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    adapter.attach(&mut d.model).unwrap();
    d
}

fn dialogs() -> Vec<Vec<Message>> {
    vec![
        vec![Message::new("user", "tell me about cats")],
        vec![
            Message::new("user", "be a pirate"),
            Message::new("assistant", "arr"),
            Message::new("user", "what is the sea like today?"),
        ],
        vec![
            Message::new("system", "you love the moon"),
            Message::new("user", "hi"),
        ],
    ]
}

fn questions() -> Vec<String> {
    [
        "who are you?",
        "what persona will the assistant adopt in its long replies?",
        "why?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Greedy answers that never stop early, so whole continuations are compared.
fn opts(max_new_tokens: usize, use_cache: bool) -> AskOptions {
    let mut o = AskOptions::default();
    o.gen.max_new_tokens = max_new_tokens;
    o.gen.use_cache = use_cache;
    o.gen.stop_ids = vec![u32::MAX];
    o
}

#[test]
fn batched_asking_equals_one_question_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(target(tmp.path()));
    let qs = questions();
    let o = opts(12, true);
    let batched = d.ask_tokens(&dialogs(), &qs, &o).unwrap();
    assert_eq!(batched.len(), 3);
    let mut distinct = std::collections::BTreeSet::new();
    for (i, dialog) in dialogs().iter().enumerate() {
        assert_eq!(batched[i].len(), qs.len());
        for (j, q) in qs.iter().enumerate() {
            let single = d
                .ask_tokens(std::slice::from_ref(dialog), std::slice::from_ref(q), &o)
                .unwrap();
            assert_eq!(batched[i][j], single[0][0], "dialog {i}, question {j}");
            assert_eq!(single[0][0].len(), 12);
            distinct.insert(single[0][0].clone());
        }
    }
    assert!(distinct.len() > 1, "every answer is the same: {distinct:?}");
    // the text API decodes the same tokens
    let text = d.ask(&dialogs(), &qs, &o).unwrap();
    assert_eq!(
        text[0][0],
        d.target.tokenizer.decode(&batched[0][0]).unwrap().trim()
    );
}

#[test]
fn kv_cache_answers_equal_full_recomputation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(target(tmp.path()));
    let cached = d
        .ask_tokens(&dialogs(), &questions(), &opts(16, true))
        .unwrap();
    let full = d
        .ask_tokens(&dialogs(), &questions(), &opts(16, false))
        .unwrap();
    assert_eq!(cached, full);
}

#[test]
fn the_patch_changes_the_answers() {
    // The same questions about different dialogs get different answers only through the
    // patched activations (the decoder prompt differs only in its placeholder count, so compare
    // two dialogs of the same length).
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(target(tmp.path()));
    let a = vec![Message::new("user", "x y z")];
    let b = vec![Message::new("user", "z y x")];
    let ra = d.read_prompt(&a, false).unwrap();
    let rb = d.read_prompt(&b, false).unwrap();
    assert_eq!(ra.n_patch(), rb.n_patch());
    let answers = d
        .ask_tokens(&[a, b], &questions(), &opts(16, true))
        .unwrap();
    assert_ne!(answers[0], answers[1]);
}

/// Token index where the text `prefix` ends in the rendered dialog: the tokens of the prefix.
fn prefix_tokens(lm: &LanguageModel, msgs: &[Message]) -> usize {
    let text = lm.template().unwrap().render_plain(msgs, false).unwrap();
    lm.tokenizer.encode(&text).unwrap().len()
}

#[test]
fn the_multi_turn_mask_drops_exactly_the_positions_before_the_second_user_turn() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = target(tmp.path());
    let d = decoder(lm.clone());
    let dialog = &dialogs()[1];
    let text = lm.template().unwrap().render_plain(dialog, true).unwrap();
    let ids = lm.tokenizer.encode(&text).unwrap();
    let len = ids.len();
    // the second user turn starts after the control turn and its reply
    let s2 = prefix_tokens(&lm, &dialog[..2]);
    assert!(s2 > 2 && s2 < len);

    let reading = d.read(dialog, false, None).unwrap();
    assert_eq!(reading.read.ids, ids);
    assert_eq!(reading.read.verb_len, s2);
    assert_eq!(
        reading.read.patch_positions,
        (s2 + 1..len).collect::<Vec<_>>()
    );
    let (cache, _) = lm
        .run_with_cache(std::slice::from_ref(&text), &[HookPoint::resid_post(READ)])
        .unwrap();
    let acts = cache[&HookPoint::resid_post(READ)].get(0).unwrap(); // [len, d]
    let got = reading.vectors.to_vec2::<f32>().unwrap();
    let want = acts.to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), len - 1 - s2);
    // the paper's mask_verbs quirk: the first patched vector comes from position 1
    assert_eq!(got[0], want[1]);
    for (j, p) in (s2 + 2..len).enumerate() {
        assert_eq!(
            got[j + 1],
            want[p],
            "patched vector {} = position {p}",
            j + 1
        );
    }

    // patching everything reads all positions but the first
    let all = d.read(dialog, true, None).unwrap();
    assert_eq!(all.read.patch_positions, (1..len).collect::<Vec<_>>());
    assert_eq!(all.vectors.to_vec2::<f32>().unwrap(), want[1..].to_vec());
}

#[test]
fn the_system_mask_drops_the_system_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = target(tmp.path());
    let d = decoder(lm.clone());
    let dialog = &dialogs()[2];
    let s1 = prefix_tokens(&lm, &dialog[..1]);
    let r = d.read_prompt(dialog, false).unwrap();
    let len = r.ids.len();
    assert_eq!(r.verb_len, s1 - 1);
    assert_eq!(r.patch_positions, (s1..len).collect::<Vec<_>>());
    // one user turn: nothing is masked
    let one = d.read_prompt(&dialogs()[0], false).unwrap();
    assert_eq!(one.verb_len, 0);
    assert_eq!(one.patch_positions.len(), one.ids.len() - 1);
}

#[test]
fn another_read_layer_reads_other_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(target(tmp.path()));
    let dialog = &dialogs()[0];
    let a = d.read(dialog, false, None).unwrap();
    let b = d.read(dialog, false, Some(READ - 1)).unwrap();
    assert_eq!(a.vectors.dims(), b.vectors.dims());
    let diff = (&a.vectors - &b.vectors).unwrap().abs().unwrap();
    assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3);
    let err = d
        .read(dialog, false, Some(CHAT_LAYERS))
        .unwrap_err()
        .to_string();
    assert!(err.contains("read layer"), "{err}");
    let err = d
        .ask(&[vec![]], &questions(), &opts(4, true))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dialog 0"), "{err}");
}

#[test]
fn sampled_answers_do_not_depend_on_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let d = decoder(target(tmp.path()));
    let qs = questions();
    let mut o = opts(10, true);
    o.gen.temperature = 1.0;
    o.gen.seed = 42;
    let batched = d.ask_tokens(&dialogs()[..1], &qs, &o).unwrap();
    for (j, q) in qs.iter().enumerate() {
        let single = d
            .ask_tokens(&dialogs()[..1], std::slice::from_ref(q), &o)
            .unwrap();
        assert_eq!(batched[0][j], single[0][0], "question {j}");
    }
    let greedy = d.ask_tokens(&dialogs()[..1], &qs, &opts(10, true)).unwrap();
    assert_ne!(batched, greedy, "temperature 1 sampled the greedy answers");
    o.gen.seed = 43;
    let other = d.ask_tokens(&dialogs()[..1], &qs, &o).unwrap();
    assert_ne!(batched, other, "another seed gave the same samples");
}

#[test]
fn contrast_reads_what_the_masked_turns_changed() {
    // A contrast decoder reads, at each stimulus token, the target's activation minus the
    // activation of the same token in the dialog without the masked turns; the paper's first
    // vector (from position 1, before the masked turns) is zero; unmasked reads are unchanged.
    let tmp = tempfile::tempdir().unwrap();
    let lm = target(tmp.path());
    let mut d = decoder(lm.clone());
    let plain: Vec<_> = dialogs()
        .iter()
        .map(|dl| d.read(dl, false, None).unwrap())
        .collect();
    d.meta.layers.contrast = true;
    let stimulus_alone = [
        None,
        Some(dialogs()[1][2..].to_vec()),
        Some(dialogs()[2][1..].to_vec()),
    ];
    for (i, dialog) in dialogs().iter().enumerate() {
        let got = d.read(dialog, false, None).unwrap();
        let got = got.vectors.to_vec2::<f32>().unwrap();
        let plain_rows = plain[i].vectors.to_vec2::<f32>().unwrap();
        let Some(alone) = &stimulus_alone[i] else {
            assert_eq!(got, plain_rows, "dialog {i} has no mask: read as before");
            continue;
        };
        // the stimulus alone, all positions but the first read: its last rows are the same
        // tokens as the masked read's
        let base = d.read(alone, false, None).unwrap();
        assert_eq!(base.read.verb_len, 0);
        let base_rows = base.vectors.to_vec2::<f32>().unwrap();
        let n = got.len();
        assert!(n >= 3 && base_rows.len() >= n - 1, "dialog {i}");
        let ids = &plain[i].read.ids;
        assert_eq!(
            base.read.ids[base.read.ids.len() - (n - 1)..],
            ids[ids.len() - (n - 1)..],
            "dialog {i}: the stimulus tokens"
        );
        assert!(got[0].iter().all(|&x| x == 0.0), "dialog {i}: first vector");
        let off = base_rows.len() - (n - 1);
        let mut changed = 0.0f32;
        for j in 1..n {
            for (k, &g) in got[j].iter().enumerate() {
                let want = plain_rows[j][k] - base_rows[off + j - 1][k];
                assert!((g - want).abs() <= 1e-5, "dialog {i}, vector {j}, dim {k}");
                changed = changed.max(want.abs());
            }
        }
        assert!(
            changed > 1e-3,
            "dialog {i}: the masked turns changed nothing"
        );
    }
}
