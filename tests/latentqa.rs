//! LatentQA prompt formats and the patched loss: against the PyTorch reference on the real
//! default model (`reference_values.json`, key `latentqa`), gradients against finite
//! differences on a tiny random model, and the format derivation on a Llama-3-style template
//! with a synthetic byte-level tokenizer.

mod common;
mod real;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::{DType, Device, Tensor, Var};
use lqa::chat::{ChatTemplate, Message};
use lqa::hooks::{HookPoint, Hooks, Patch, PatchMode, Positions};
use lqa::latentqa::{
    decoder_prompt, decoder_prompt_from_dialog, latentqa_loss, latentqa_loss_with_hooks,
    latentqa_token_nll, patch_vectors, read_prompt, Activations, DecoderPrompt, Labels, LayerPlan,
    LossConfig, PatchedBatch, PatchedExample, ReadDialog, ReadPrompt, VerbMask, BASE_REPLY,
};
use lqa::model::Model;
use lqa::tokenizer::Tokenizer;
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

const READ_LAYER: usize = 15;
const WRITE_LAYER: usize = 0;

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

/// Split a ChatML text (no injected system prompt) into messages; a trailing
/// `<|im_start|>assistant\n` is the generation prompt.
fn parse_chatml(text: &str) -> (Vec<Message>, bool) {
    let mut msgs = Vec::new();
    let mut gen = false;
    for part in text.split("<|im_start|>").skip(1) {
        let (role, rest) = part.split_once('\n').unwrap();
        match rest.strip_suffix("<|im_end|>\n") {
            Some(content) => msgs.push(m(role, content)),
            None => {
                assert_eq!((role, rest), ("assistant", ""), "unexpected ChatML tail");
                gen = true;
            }
        }
    }
    (msgs, gen)
}

fn usizes(v: &Json) -> Vec<usize> {
    serde_json::from_value(v.clone()).unwrap()
}
fn u32s(v: &Json) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

/// A reference config's LatentQA settings.
struct Cfg {
    use_verb_mask: bool,
    labels: Labels,
}

fn cfg_of(c: &Json) -> Cfg {
    Cfg {
        use_verb_mask: c["use_verb_mask"].as_bool().unwrap(),
        labels: if c["mask_all_but_last"].as_bool().unwrap() {
            Labels::LastAnswer
        } else {
            Labels::AllAssistantTurns
        },
    }
}

/// The read dialog and decoder dialog of a reference example under a config.
fn example_inputs(e: &Json, cfg: &Cfg) -> (ReadDialog, Vec<Message>) {
    let (messages, gen) = parse_chatml(e["read_prompt"].as_str().unwrap());
    let mask = match (cfg.use_verb_mask, e["mask_type"].as_str().unwrap()) {
        (false, _) => VerbMask::None,
        (true, "system") => VerbMask::System,
        (true, "user") => VerbMask::User,
        (true, other) => panic!("unknown mask type {other}"),
    };
    let read = ReadDialog {
        messages,
        add_generation_prompt: gen,
        mask,
    };
    let dialog: Vec<Message> = serde_json::from_value(e["dialog"].clone()).unwrap();
    (read, dialog)
}

fn examples_by_name() -> HashMap<String, Json> {
    real::reference()["latentqa"]["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// Build one reference example with our format code.
fn build(e: &Json, cfg: &Cfg) -> (ReadPrompt, DecoderPrompt) {
    let lm = real::lm();
    let tmpl = lm.template().unwrap();
    let (read, dialog) = example_inputs(e, cfg);
    assert_eq!(
        tmpl.render_plain(&read.messages, read.add_generation_prompt)
            .unwrap(),
        e["read_prompt"].as_str().unwrap()
    );
    let rp = read_prompt(tmpl, &lm.tokenizer, &read).unwrap();
    let dp = decoder_prompt_from_dialog(
        tmpl,
        &lm.tokenizer,
        rp.n_patch(),
        &dialog,
        cfg.labels,
        false,
    )
    .unwrap();
    (rp, dp)
}

fn loss_config(use_first_from: bool) -> LossConfig {
    LossConfig {
        layers: LayerPlan::new(READ_LAYER, WRITE_LAYER),
        pad_id: real::lm().pad_id(),
        differentiable: false,
        grad_through_target: false,
        use_first_from,
        dropout: None,
        recompute: false,
    }
}

#[test]
fn reference_prompts_match_exactly() {
    let lm = real::lm();
    let tmpl = lm.template().unwrap();
    let examples = examples_by_name();
    let mut checked = 0;
    for c in real::reference()["latentqa"]["configs"].as_array().unwrap() {
        let cfg = cfg_of(c);
        for pe in c["per_example"].as_array().unwrap() {
            let name = pe["example"].as_str().unwrap();
            let what = format!("{} / {name}", c["name"]);
            let e = &examples[name];
            let (rp, dp) = build(e, &cfg);
            assert_eq!(rp.ids, u32s(&pe["read_input_ids"]), "read ids of {what}");
            assert_eq!(
                rp.ids.len() as u64,
                pe["read_len"].as_u64().unwrap(),
                "{what}"
            );
            assert_eq!(
                rp.verb_len,
                pe["verb_len"].as_u64().unwrap() as usize,
                "{what}"
            );
            let n = pe["num_patched"].as_u64().unwrap() as usize;
            assert_eq!(rp.n_patch(), n, "n_patch of {what}");
            let l = rp.ids.len();
            assert_eq!(rp.patch_positions, (l - n..l).collect::<Vec<_>>(), "{what}");
            assert_eq!(rp.first_from, cfg.use_verb_mask.then_some(1), "{what}");
            assert_eq!(dp.ids, u32s(&pe["write_input_ids"]), "write ids of {what}");
            assert_eq!(
                dp.k,
                pe["num_placeholders_k"].as_u64().unwrap() as usize,
                "k of {what}"
            );
            // the placeholders sit right after `<|im_start|>user\n` (NUM_WRITE = 3)
            assert_eq!(dp.write_positions, (3..3 + n).collect::<Vec<_>>(), "{what}");
            assert_eq!(
                dp.label_positions,
                usizes(&pe["label_positions"]),
                "labels of {what}"
            );
            // the same through question/answer pairs
            let (_, dialog) = example_inputs(e, &cfg);
            assert_eq!(dialog[0], m("assistant", BASE_REPLY));
            let qa = vec![(dialog[1].content.clone(), dialog[2].content.clone())];
            let dp2 = decoder_prompt(tmpl, &lm.tokenizer, n, &qa, cfg.labels, false).unwrap();
            assert_eq!(dp2, dp, "{what} through qa pairs");
            PatchedExample::new(rp, dp).unwrap();
            checked += 1;
        }
    }
    assert_eq!(checked, 9);
}

#[test]
fn decoder_prompt_with_generation_prompt() {
    let lm = real::lm();
    let tmpl = lm.template().unwrap();
    let tok = &lm.tokenizer;
    let qa = vec![("What is the assistant's goal?".to_string(), String::new())];
    let dp = decoder_prompt(tmpl, tok, 5, &qa, Labels::LastAnswer, true).unwrap();
    let text = tok.decode(&dp.ids).unwrap();
    assert_eq!(
        text,
        format!(
            "<|im_start|>user\n? ? ? ? <|im_end|>\n<|im_start|>reflect\n{BASE_REPLY}<|im_end|>\n\
             <|im_start|>user\nWhat is the assistant's goal?<|im_end|>\n<|im_start|>reflect\n"
        )
    );
    assert_eq!(dp.k, 4);
    assert_eq!(dp.write_positions, vec![3, 4, 5, 6, 7]);
    assert!(dp.label_positions.is_empty());
    // all assistant turns: the fixed reply only, with <|im_end|> and \n
    let dp = decoder_prompt(tmpl, tok, 5, &qa, Labels::AllAssistantTurns, true).unwrap();
    let labels: Vec<u32> = dp.label_positions.iter().map(|&t| dp.ids[t]).collect();
    assert_eq!(
        tok.decode(&labels).unwrap(),
        format!("{BASE_REPLY}<|im_end|>\n")
    );
    // ChatML does not trim: "? " * k is k + 1 tokens (the paper's NUM_READ = 2)
    for n in [2usize, 3, 100, 399] {
        let dp = decoder_prompt(tmpl, tok, n, &qa, Labels::LastAnswer, true).unwrap();
        assert_eq!(dp.k, n - 1);
        assert_eq!(dp.write_positions, (3..3 + n).collect::<Vec<_>>());
    }
    // a non-empty last answer with a generation prompt is refused
    let bad = vec![("Q?".to_string(), "A.".to_string())];
    assert!(decoder_prompt(tmpl, tok, 5, &bad, Labels::LastAnswer, true).is_err());
    // ChatML cannot make a single placeholder token ("? " is 2 tokens, "" is 0)
    let err = decoder_prompt(tmpl, tok, 1, &bad, Labels::LastAnswer, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exactly 1 placeholder"), "{err}");
    // and a read prompt whose patch does not match the placeholders is refused
    let read = read_prompt(
        tmpl,
        tok,
        &ReadDialog {
            messages: vec![m("user", "Hi")],
            add_generation_prompt: true,
            mask: VerbMask::None,
        },
    )
    .unwrap();
    assert!(PatchedExample::new(read, dp).is_err());
}

fn close(a: f64, b: f64, atol: f64) -> bool {
    (a - b).abs() <= atol
}

#[test]
fn reference_losses_match() {
    let model = real::model();
    let examples = examples_by_name();
    let mut report = Vec::new();
    for c in real::reference()["latentqa"]["configs"].as_array().unwrap() {
        let cname = c["name"].as_str().unwrap();
        let cfg = cfg_of(c);
        let lcfg = loss_config(cfg.use_verb_mask);
        let mut all = Vec::new();
        let mut max_diff = 0f64;
        let mut max_ce_diff = 0f64;
        let (mut max_sum_rel, mut max_l2_rel) = (0f64, 0f64);
        for pe in c["per_example"].as_array().unwrap() {
            let name = pe["example"].as_str().unwrap();
            let (rp, dp) = build(&examples[name], &cfg);
            let ex = PatchedExample::new(rp, dp).unwrap();
            all.push(ex.clone());
            let batch = PatchedBatch::new(vec![ex]).unwrap();
            let out = latentqa_loss(model, model, &batch, &lcfg).unwrap();
            let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
            let want = pe["loss_original"].as_f64().unwrap();
            assert!(
                close(loss, want, 1e-4),
                "{cname}/{name}: loss {loss} vs {want}"
            );
            assert!(close(out.per_example[0] as f64, want, 1e-4));
            assert_eq!(
                out.n_label_tokens,
                pe["num_label_tokens"].as_u64().unwrap() as usize
            );
            max_diff = max_diff.max((loss - want).abs());
            // per-token CE
            let ce = latentqa_token_nll(model, model, &batch, &lcfg, Activations::Read).unwrap();
            let want_ce: Vec<f64> = serde_json::from_value(pe["token_ce"].clone()).unwrap();
            assert_eq!(ce[0].len(), want_ce.len());
            for (a, b) in ce[0].iter().zip(&want_ce) {
                let d = (*a as f64 - b).abs();
                assert!(d <= 2e-4 + 1e-5 * b.abs(), "{cname}/{name}: ce {a} vs {b}");
                max_ce_diff = max_ce_diff.max(d);
            }
            // the patched activations
            let p = patch_vectors(model, &batch, &lcfg, None).unwrap();
            let p = p[0].to_dtype(DType::F64).unwrap();
            assert_eq!(
                p.dims(),
                &[pe["num_patched"].as_u64().unwrap() as usize, 576]
            );
            let sum = p.sum_all().unwrap().to_scalar::<f64>().unwrap();
            let l2 = common::l2_norm(&p);
            let (ws, wl) = (
                pe["patch_sum"].as_f64().unwrap(),
                pe["patch_l2"].as_f64().unwrap(),
            );
            // the sum cancels: compare it relative to the L2 norm
            let (sr, lr) = ((sum - ws).abs() / wl, (l2 - wl).abs() / wl);
            assert!(sr < 1e-4, "{cname}/{name}: patch sum {sum} vs {ws}");
            assert!(lr < 1e-5, "{cname}/{name}: patch l2 {l2} vs {wl}");
            max_sum_rel = max_sum_rel.max(sr);
            max_l2_rel = max_l2_rel.max(lr);
        }
        // one left-padded batch of 3: the mean over all label tokens
        let batch = PatchedBatch::new(all).unwrap();
        let b3 = &c["batch_of_3"];
        let out = latentqa_loss(model, model, &batch, &lcfg).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        let want = b3["loss_original"].as_f64().unwrap();
        assert!(close(loss, want, 1e-4), "{cname}/batch: {loss} vs {want}");
        assert_eq!(
            out.n_label_tokens,
            b3["num_label_tokens"].as_u64().unwrap() as usize
        );
        let batch_diff = (loss - want).abs();
        for (got, pe) in out
            .per_example
            .iter()
            .zip(c["per_example"].as_array().unwrap())
        {
            let w = pe["loss_original"].as_f64().unwrap();
            assert!(close(*got as f64, w, 1e-4), "{cname}: padded {got} vs {w}");
            max_diff = max_diff.max((*got as f64 - w).abs());
        }
        report.push(format!(
            "{cname}: max |loss - ref| per example (alone and padded) {max_diff:.2e}, batch of 3 \
             {batch_diff:.2e}, token CE {max_ce_diff:.2e}, patch sum/l2 {max_sum_rel:.1e} / \
             {max_l2_rel:.1e} (relative to l2)"
        ));
    }
    for r in report {
        eprintln!("{r}");
    }
}

// ---- gradients on the tiny model ----

use common::{lcg, load_tiny_f64};

/// The loss with `values[r]` (`[len_r, d]`) added to the target's read-layer output of row r.
fn loss_with_added(
    target: &Model,
    decoder: &Model,
    batch: &PatchedBatch,
    cfg: &LossConfig,
    values: &[Tensor],
) -> lqa::latentqa::LossOutput {
    let mut hooks = Hooks::new();
    for (r, (ex, v)) in batch.examples.iter().zip(values).enumerate() {
        hooks = hooks.patch(Patch {
            point: HookPoint::resid_post(cfg.layers.read),
            mode: PatchMode::Add,
            value: v.clone(),
            positions: Positions::List((0..ex.read.ids.len()).collect()),
            rows: Some(vec![r]),
        });
    }
    latentqa_loss_with_hooks(target, decoder, batch, cfg, Some(&mut hooks), None).unwrap()
}

#[test]
fn loss_gradient_matches_finite_differences() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let target = load_tiny_f64(d1.path(), 1);
    let decoder = load_tiny_f64(d2.path(), 2);
    let batch = common::tiny_patched_batch();
    let cfg = LossConfig {
        layers: LayerPlan::new(1, 0),
        pad_id: 0,
        differentiable: true,
        grad_through_target: true,
        use_first_from: true,
        dropout: None,
        recompute: false,
    };
    let dev = Device::Cpu;
    let vars: Vec<Var> = batch
        .examples
        .iter()
        .map(|e| Var::zeros((e.read.ids.len(), common::D), DType::F64, &dev).unwrap())
        .collect();
    let values: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = loss_with_added(&target, &decoder, &batch, &cfg, &values);
    let l0 = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert_eq!(out.n_label_tokens, 6);
    let grads = out.loss.backward().unwrap();
    let g: Vec<Tensor> = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).expect("a gradient").clone())
        .collect();
    let f = |scale: f64, dirs: &[Tensor]| -> f64 {
        let vals: Vec<Tensor> = dirs.iter().map(|d| (d * scale).unwrap()).collect();
        let o = loss_with_added(&target, &decoder, &batch, &cfg, &vals);
        o.loss.to_scalar::<f32>().unwrap() as f64
    };
    // random directions
    let eps = 1e-2;
    for seed in 0..3u64 {
        let dirs: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                Tensor::from_vec(lcg(v.elem_count(), seed * 10 + i as u64), v.dims(), &dev).unwrap()
            })
            .collect();
        let analytic: f64 = g
            .iter()
            .zip(&dirs)
            .map(|(a, b)| {
                (a * b)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            })
            .sum();
        let numeric = (f(eps, &dirs) - f(-eps, &dirs)) / (2.0 * eps);
        let err = (analytic - numeric).abs();
        eprintln!("direction {seed}: analytic {analytic:.6} numeric {numeric:.6} |diff| {err:.2e}");
        assert!(
            err <= 2e-3 * analytic.abs().max(numeric.abs()) + 1e-4,
            "direction {seed}: analytic {analytic} vs finite differences {numeric}"
        );
    }
    // single coordinates: the largest gradient entries of each row
    for (r, gr) in g.iter().enumerate() {
        let flat: Vec<f64> = gr.flatten_all().unwrap().to_vec1().unwrap();
        let (imax, gmax) = flat
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let mut e = vec![0f64; flat.len()];
        e[imax] = 1.0;
        let dirs: Vec<Tensor> = vars
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i == r {
                    Tensor::from_vec(e.clone(), v.dims(), &dev).unwrap()
                } else {
                    v.zeros_like().unwrap()
                }
            })
            .collect();
        let numeric = (f(eps, &dirs) - f(-eps, &dirs)) / (2.0 * eps);
        eprintln!("row {r} coordinate {imax}: analytic {gmax:.6} numeric {numeric:.6}");
        assert!(
            (gmax - numeric).abs() <= 2e-3 * gmax.abs() + 1e-4,
            "row {r} coordinate {imax}: {gmax} vs {numeric}"
        );
    }
    // positions before the patch never reach the decoder except through the target's
    // attention; row 0 position 1 is patched through `first_from` and must get a gradient
    let g0: Vec<Vec<f64>> = g[0].to_vec2().unwrap();
    assert!(g0[1].iter().any(|&x| x != 0.0));
    // the same loss on f32 models, differentiable and fused (the fused kernels are f32-only)
    let (t32, d32) = (common::load_tiny(d1.path()), common::load_tiny(d2.path()));
    let loss_f32 = |differentiable: bool| -> f64 {
        let c = LossConfig {
            differentiable,
            ..cfg.clone()
        };
        let o = latentqa_loss(&t32, &d32, &batch, &c).unwrap();
        o.loss.to_scalar::<f32>().unwrap() as f64
    };
    let (lf, ld) = (loss_f32(false), loss_f32(true));
    assert!((lf - l0).abs() < 1e-4, "fused f32 {lf} vs f64 {l0}");
    assert!(
        (ld - l0).abs() < 1e-4,
        "differentiable f32 {ld} vs f64 {l0}"
    );
    // detached target: no gradient reaches the target's activations
    let out = loss_with_added(
        &target,
        &decoder,
        &batch,
        &LossConfig {
            grad_through_target: false,
            ..cfg.clone()
        },
        &values,
    );
    let grads = out.loss.backward().unwrap();
    assert!(vars.iter().all(|v| grads.get(v.as_tensor()).is_none()));
    // the per-example means average to the loss with the token counts as weights
    let pe = &out.per_example;
    let weighted = (pe[0] as f64 * 4.0 + pe[1] as f64 * 2.0) / 6.0;
    assert!((weighted - l0).abs() < 1e-5);
}

// ---- Llama-3 format derivation ----

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const SPECIALS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

/// A byte-level BPE with Llama-3's special tokens and pre-tokenizer, a few merges (` ?`,
/// `\n\n`, `user`) and nothing else.
fn llama3_tokenizer() -> Tokenizer {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
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
    let merges = ["Ġ ?", "Ċ Ċ", "u s", "e r", "us er"];
    for mg in merges {
        tokens.push(mg.replace(' ', ""));
    }
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut types = vec![Value::I32(3); SPECIALS.len()];
    types.extend(std::iter::repeat_n(
        Value::I32(1),
        tokens.len() - SPECIALS.len(),
    ));
    let merges: Vec<String> = merges.iter().map(|s| s.to_string()).collect();
    let meta = vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("llama-bpe".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eot_token_id", Value::U32(4)),
    ];
    let ct = Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata: meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    };
    Tokenizer::from_gguf(&ct, Path::new("synthetic-llama3.gguf")).unwrap()
}

#[test]
fn llama3_format_derivation() {
    let tok = llama3_tokenizer();
    let tmpl = ChatTemplate::new(
        LLAMA3,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )
    .unwrap();
    let (bos, start_header, eot) = (0u32, 2u32, 4u32);
    let header_len = tok
        .encode("<|start_header_id|>user<|end_header_id|>\n\n")
        .unwrap()
        .len();

    // the system verb mask: [1, first user turn) is masked, the patch starts at the user
    // turn's header, and its first vector is the system header's start (position 1)
    let sys = ReadDialog {
        messages: vec![m("system", "Be a pirate."), m("user", "Recommend a book.")],
        add_generation_prompt: true,
        mask: VerbMask::System,
    };
    let rp = read_prompt(&tmpl, &tok, &sys).unwrap();
    assert_eq!(rp.ids[0], bos);
    assert_eq!(rp.ids[1], start_header);
    let user = rp
        .ids
        .iter()
        .enumerate()
        .skip(2)
        .find(|(_, &t)| t == start_header)
        .unwrap()
        .0;
    assert_eq!(rp.verb_len, user - 1);
    assert_eq!(rp.patch_positions, (user..rp.ids.len()).collect::<Vec<_>>());
    assert_eq!(rp.first_from, Some(1));
    let tail = tok.decode(&rp.ids[user..]).unwrap();
    assert_eq!(
        tail,
        "<|start_header_id|>user<|end_header_id|>\n\nRecommend a book.<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );

    // the user verb mask over four turns: the patch starts at the second user turn's header
    let four = ReadDialog {
        messages: vec![
            m("user", "Hide your goal."),
            m("assistant", "Understood."),
            m("user", "  Any ideas?  "),
            m("assistant", "Visit a shelter!"),
        ],
        add_generation_prompt: false,
        mask: VerbMask::User,
    };
    let rp = read_prompt(&tmpl, &tok, &four).unwrap();
    let starts: Vec<usize> = (0..rp.ids.len())
        .filter(|&i| rp.ids[i] == start_header)
        .collect();
    assert_eq!(starts.len(), 4);
    assert_eq!(starts[0], 1);
    assert_eq!(rp.verb_len, starts[2] - starts[0]);
    assert_eq!(rp.patch_positions[0], starts[2]);
    assert_eq!(*rp.patch_positions.last().unwrap(), rp.ids.len() - 1);
    // no mask: everything after the BOS
    let plain = ReadDialog {
        mask: VerbMask::None,
        ..four.clone()
    };
    let rp = read_prompt(&tmpl, &tok, &plain).unwrap();
    assert_eq!(rp.patch_positions, (1..rp.ids.len()).collect::<Vec<_>>());
    assert_eq!(rp.first_from, None);

    // decoder prompt: the template trims, so "? " * k is k tokens (the paper's NUM_READ = 1)
    let qa = vec![(
        "What is the goal?".to_string(),
        "  To adopt a cat. ".to_string(),
    )];
    for n in [1usize, 2, 7, 40] {
        let dp = decoder_prompt(&tmpl, &tok, n, &qa, Labels::LastAnswer, false).unwrap();
        assert_eq!(dp.k, n);
        // BOS + user header, then the placeholders (the paper's NUM_WRITE = 1 + header)
        let w0 = 1 + header_len;
        assert_eq!(dp.write_positions, (w0..w0 + n).collect::<Vec<_>>());
        assert_eq!(
            tok.decode(&dp.ids[w0..w0 + n]).unwrap(),
            vec!["?"; n].join(" ")
        );
        assert_eq!(dp.ids[w0 + n], eot);
        let labels: Vec<u32> = dp.label_positions.iter().map(|&t| dp.ids[t]).collect();
        assert_eq!(tok.decode(&labels).unwrap(), "To adopt a cat.<|eot_id|>");
        assert_eq!(*dp.label_positions.last().unwrap(), dp.ids.len() - 1);
        assert_eq!(*labels.last().unwrap(), eot);
    }
    let dp = decoder_prompt(&tmpl, &tok, 4, &qa, Labels::AllAssistantTurns, false).unwrap();
    let labels: Vec<u32> = dp.label_positions.iter().map(|&t| dp.ids[t]).collect();
    assert_eq!(
        tok.decode(&labels).unwrap(),
        format!("{BASE_REPLY}<|eot_id|>To adopt a cat.<|eot_id|>")
    );
    let text = tok.decode(&dp.ids).unwrap();
    assert!(text.starts_with(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n? ? ? ?<|eot_id|>\
         <|start_header_id|>reflect<|end_header_id|>\n\n"
    ));
    // reading: the prompt ends with the decoder's generation prompt
    let ask = vec![("What is the goal?".to_string(), String::new())];
    let dp = decoder_prompt(&tmpl, &tok, 4, &ask, Labels::LastAnswer, true).unwrap();
    assert!(tok
        .decode(&dp.ids)
        .unwrap()
        .ends_with("What is the goal?<|eot_id|><|start_header_id|>reflect<|end_header_id|>\n\n"));
    assert!(dp.label_positions.is_empty());
}
