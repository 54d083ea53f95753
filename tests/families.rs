//! Every supported family against transformers: the seven tiny random models in
//! `../shared/reference/arch/` (see its README), loaded from their HF folders and from GGUF files
//! this test writes from them with llama.cpp's conventions (its tensor names, q/k permutation for
//! Llama-style RoPE, Gemma norms stored as `1 + w`, Phi-3's fused tensors kept fused, Llama-3.1's
//! RoPE scaling as a `rope_freqs` tensor). The GGUF writer here is independent of lqa's loader:
//! its name table is llama.cpp's, written out by hand.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use lqa::generate::{generate, GenOptions};
use lqa::hooks::{HookPoint, Hooks, Site};
use lqa::lm::{LanguageModel, LoadOptions};
use lqa::model::Input;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const FAMILIES: [&str; 7] = [
    "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3",
];

fn arch_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/reference/arch")
        .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

/// Check a loaded model against `reference.json`; `what` names the model in failures.
fn check_against_reference(lm: &LanguageModel, reference: &Value, what: &str) {
    let m = &lm.model;
    let n = m.n_layers();
    for p in reference["prompts"].as_array().unwrap() {
        let text = p["text"].as_str().unwrap();
        let want_ids: Vec<u32> = p["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = lm.tokenizer.encode(text).unwrap();
        assert_eq!(ids, want_ids, "{what}: token ids of {text:?}");
        let label = format!("{what}, prompt of {} tokens", ids.len());

        let mut hooks = Hooks::new();
        for i in 0..n {
            hooks = hooks.capture(HookPoint::block(i, Site::ResidPost));
        }
        let input = Input::left_padded(std::slice::from_ref(&ids), 0, &Device::Cpu).unwrap();
        let out = m.forward(&input, None, Some(&mut hooks)).unwrap();
        let logits: Vec<f32> = out.logits.unwrap().get(0).unwrap().to_vec1().unwrap();

        // last-position top-5
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top5: Vec<u64> = order[..5].iter().map(|&i| i as u64).collect();
        let want_top5: Vec<u64> = p["last_logits_top5_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(top5, want_top5, "{label}: top-5 ids");
        for (k, w) in p["last_logits_top5"].as_array().unwrap().iter().enumerate() {
            let got = logits[order[k]] as f64;
            let w = w.as_f64().unwrap();
            assert!(close(got, w, 1e-4), "{label}: top-{k} logit {got} vs {w}");
        }
        let l2 = logits
            .iter()
            .map(|&x| (x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let want_l2 = p["last_logits_l2"].as_f64().unwrap();
        assert!(
            close(l2, want_l2, 1e-4 * want_l2.abs().max(1.0)),
            "{label}: logits l2 {l2} vs {want_l2}"
        );

        // every block output but the last: mean, population std, last row's first 8 values
        for b in p["block_outputs"].as_array().unwrap() {
            let i = b["layer"].as_u64().unwrap() as usize;
            let t = &hooks.captured[&HookPoint::block(i, Site::ResidPost)];
            let v: Vec<f64> = t
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
            let (wm, ws) = (b["mean"].as_f64().unwrap(), b["std"].as_f64().unwrap());
            assert!(
                close(mean, wm, 1e-4 * wm.abs().max(1.0)),
                "{label}: block {i} mean {mean} vs {wm}"
            );
            assert!(
                close(std, ws, 1e-4 * ws.abs().max(1.0)),
                "{label}: block {i} std {std} vs {ws}"
            );
            let d = t.dims()[2];
            let last: Vec<f32> = t
                .get(0)
                .unwrap()
                .get(ids.len() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(last.len(), d);
            for (k, w) in b["last_row_first8"].as_array().unwrap().iter().enumerate() {
                let (g, w) = (last[k] as f64, w.as_f64().unwrap());
                assert!(
                    close(g, w, 1e-4 * w.abs().max(1.0)),
                    "{label}: block {i} last row [{k}] {g} vs {w}"
                );
            }
        }

        // 10 greedy tokens with the KV cache, never stopping
        let opts = GenOptions {
            max_new_tokens: 10,
            temperature: 0.0,
            ..Default::default()
        };
        let got = generate(m, std::slice::from_ref(&ids), 0, &opts, None).unwrap();
        let want: Vec<u32> = p["greedy_10_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got[0], want, "{label}: greedy continuation");
    }
}

fn load(path: &Path) -> LanguageModel {
    LanguageModel::load(path.to_str().unwrap(), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

#[test]
fn every_family_matches_transformers_from_safetensors() {
    for fam in FAMILIES {
        let dir = arch_dir(fam);
        let lm = load(&dir);
        let reference = json(&dir.join("reference.json"));
        assert_eq!(
            lm.model.cfg.family.model_type(),
            reference["model_type"].as_str().unwrap(),
            "{fam}: family"
        );
        check_against_reference(&lm, &reference, &format!("{fam} (safetensors)"));
    }
}

#[test]
fn every_family_matches_transformers_from_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    for fam in FAMILIES {
        let dir = arch_dir(fam);
        let path = tmp.path().join(format!("{fam}.gguf"));
        write_gguf(&dir, &path);
        let lm = load(&path);
        let reference = json(&dir.join("reference.json"));
        check_against_reference(&lm, &reference, &format!("{fam} (GGUF)"));
        // the chat template travels in the GGUF
        assert!(lm.chat_template.is_some(), "{fam}: GGUF chat template");
    }
}

#[test]
fn unsupported_architectures_are_named_with_the_supported_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    let src = arch_dir("qwen3");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg = json(&src.join("config.json"));
    cfg["model_type"] = "falcon".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = LanguageModel::load(dir.to_str().unwrap(), &LoadOptions::default())
        .err()
        .expect("falcon is not supported")
        .to_string();
    assert!(
        err.contains("falcon") && err.contains("gemma2") && err.contains("config.json"),
        "{err}"
    );

    // a field the family needs, missing: named with the file
    let mut cfg = json(&src.join("config.json"));
    cfg.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = LanguageModel::load(dir.to_str().unwrap(), &LoadOptions::default())
        .err()
        .expect("missing intermediate_size")
        .to_string();
    assert!(
        err.contains("intermediate_size") && err.contains("config.json"),
        "{err}"
    );

    // Gemma 2 with sliding layers but no window
    let src = arch_dir("gemma2");
    let mut cfg = json(&src.join("config.json"));
    cfg["model_type"] = "gemma2".into();
    cfg.as_object_mut().unwrap().remove("sliding_window");
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = LanguageModel::load(dir.to_str().unwrap(), &LoadOptions::default())
        .err()
        .expect("missing sliding_window")
        .to_string();
    assert!(err.contains("sliding_window"), "{err}");

    // an unknown GGUF architecture
    let path = tmp.path().join("x.gguf");
    let arch = gguf_file::Value::String("falcon".into());
    let mut f = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    drop(f);
    let err = LanguageModel::load(path.to_str().unwrap(), &LoadOptions::default())
        .err()
        .expect("falcon GGUF")
        .to_string();
    assert!(
        err.contains("falcon") && err.contains("qwen3") && err.contains("x.gguf"),
        "{err}"
    );
}

#[test]
fn a_multimodal_gemma3_checkpoint_loads_its_language_model() {
    // Gemma 3 4B+ checkpoints: `model_type: gemma3` with the text config under `text_config`,
    // and the language model's tensors under `language_model.model.` (hub checkpoints).
    let src = arch_dir("gemma3");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let text_cfg = json(&src.join("config.json"));
    let cfg = serde_json::json!({
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text_cfg,
        "vision_config": {"model_type": "siglip_vision_model"},
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let st = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = st
        .into_iter()
        .map(|(k, v)| (format!("language_model.{k}"), v))
        .collect();
    candle_core::safetensors::save(&renamed, dir.join("model.safetensors")).unwrap();
    let lm = load(dir);
    assert_eq!(lm.model.cfg.family, lqa::config::Family::Gemma3);
    check_against_reference(
        &lm,
        &json(&src.join("reference.json")),
        "gemma3 (multimodal)",
    );
}

#[test]
fn both_rope_config_forms_give_the_same_model() {
    // transformers-5 `rope_parameters` and the hub's top-level `rope_theta`/`rope_scaling`
    // (and Gemma 3's `rope_local_base_freq`) describe the same RoPE.
    use lqa::config::ModelConfig;
    for fam in ["llama3", "gemma3", "qwen3"] {
        let text = std::fs::read_to_string(arch_dir(fam).join("config.json")).unwrap();
        let new = ModelConfig::from_hf_str(&text).unwrap();
        let mut v: Value = serde_json::from_str(&text).unwrap();
        let rp = v
            .as_object_mut()
            .unwrap()
            .remove("rope_parameters")
            .unwrap();
        let o = v.as_object_mut().unwrap();
        if fam == "gemma3" {
            o.insert(
                "rope_theta".into(),
                rp["full_attention"]["rope_theta"].clone(),
            );
            o.insert(
                "rope_local_base_freq".into(),
                rp["sliding_attention"]["rope_theta"].clone(),
            );
        } else {
            o.insert("rope_theta".into(), rp["rope_theta"].clone());
            if rp["rope_type"] != "default" {
                o.insert("rope_scaling".into(), rp.clone());
            }
        }
        let old = ModelConfig::from_hf_str(&v.to_string()).unwrap();
        assert_eq!(old, new, "{fam}");
        assert!(new.rope.theta > 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// A GGUF writer with llama.cpp's conventions (convert_hf_to_gguf.py, gguf-py tensor_mapping).

/// llama.cpp's tensor name for an HF one, per architecture.
fn llama_cpp_name(hf: &str, model_type: &str) -> String {
    let gemma = model_type.starts_with("gemma");
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (i, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if gemma => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("no llama.cpp name for {other}"),
    };
    format!("blk.{i}.{g}.{kind}")
}

/// llama.cpp's `permute` for Llama-style RoPE: rows `[head, 2, hd/2]` -> `[head, hd/2, 2]`.
fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let dims = w.dims().to_vec();
    let hd = dims[0] / n_head;
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, 2, hd / 2, rest))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(dims)
        .unwrap()
}

/// Write an HF tiny-model folder as a GGUF file the way llama.cpp's converter would.
fn write_gguf(dir: &Path, out: &Path) {
    use gguf_file::Value as V;
    let cfg = json(&dir.join("config.json"));
    let model_type = cfg["model_type"].as_str().unwrap().to_string();
    let arch = match model_type.as_str() {
        "llama" | "mistral" => "llama",
        "gemma3_text" => "gemma3",
        other => other,
    }
    .to_string();
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let n_head = u("num_attention_heads") as usize;
    let n_kv = u("num_key_value_heads") as usize;
    let hidden = u("hidden_size");
    let head_dim = cfg["head_dim"]
        .as_u64()
        .map(|h| h as u32)
        .unwrap_or(hidden / n_head as u32);
    let rp = &cfg["rope_parameters"];
    let global_rope = if rp.get("full_attention").is_some() {
        &rp["full_attention"]
    } else {
        rp
    };
    let theta = global_rope["rope_theta"].as_f64().unwrap();

    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.clone())),
        (
            format!("{arch}.block_count"),
            V::U32(u("num_hidden_layers")),
        ),
        (
            format!("{arch}.context_length"),
            V::U32(u("max_position_embeddings")),
        ),
        (format!("{arch}.embedding_length"), V::U32(hidden)),
        (
            format!("{arch}.feed_forward_length"),
            V::U32(u("intermediate_size")),
        ),
        (
            format!("{arch}.attention.head_count"),
            V::U32(n_head as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            V::U32(n_kv as u32),
        ),
        (format!("{arch}.attention.key_length"), V::U32(head_dim)),
        (format!("{arch}.attention.value_length"), V::U32(head_dim)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            V::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (format!("{arch}.rope.freq_base"), V::F32(theta as f32)),
        (format!("{arch}.rope.dimension_count"), V::U32(head_dim)),
    ];
    if let Some(w) = cfg["sliding_window"].as_u64() {
        md.push((format!("{arch}.attention.sliding_window"), V::U32(w as u32)));
    }
    for k in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(c) = cfg.get(k).and_then(|c| c.as_f64()) {
            md.push((format!("{arch}.{k}"), V::F32(c as f32)));
        }
    }
    if let Some(local) = rp.get("sliding_attention") {
        md.push((
            format!("{arch}.rope.freq_base_swa"),
            V::F32(local["rope_theta"].as_f64().unwrap() as f32),
        ));
    }

    // the tokenizer, as llama.cpp's gpt2-style BPE metadata
    let tj = json(&dir.join("tokenizer.json"));
    let tc = json(&dir.join("tokenizer_config.json"));
    let mut tokens: HashMap<u32, (String, i32)> = HashMap::new();
    for (t, id) in tj["model"]["vocab"].as_object().unwrap() {
        tokens.insert(id.as_u64().unwrap() as u32, (t.clone(), 1));
    }
    for a in tj["added_tokens"].as_array().unwrap() {
        let ty = if a["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
        tokens.insert(
            a["id"].as_u64().unwrap() as u32,
            (a["content"].as_str().unwrap().to_string(), ty),
        );
    }
    let vocab = u("vocab_size");
    let (mut toks, mut types) = (Vec::new(), Vec::new());
    for id in 0..vocab {
        let (t, ty) = tokens
            .get(&id)
            .cloned()
            .unwrap_or_else(|| (format!("[PAD{id}]"), 5));
        toks.push(V::String(t));
        types.push(V::I32(ty));
    }
    let merges: Vec<V> = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::Array(p) => V::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            Value::String(s) => V::String(s.clone()),
            other => panic!("merge {other}"),
        })
        .collect();
    md.push(("tokenizer.ggml.model".into(), V::String("gpt2".into())));
    md.push(("tokenizer.ggml.pre".into(), V::String("gpt2".into())));
    md.push(("tokenizer.ggml.tokens".into(), V::Array(toks)));
    md.push(("tokenizer.ggml.token_type".into(), V::Array(types)));
    md.push(("tokenizer.ggml.merges".into(), V::Array(merges)));
    let eos = cfg["eos_token_id"].as_u64().unwrap() as u32;
    md.push(("tokenizer.ggml.eos_token_id".into(), V::U32(eos)));
    md.push(("tokenizer.ggml.add_bos_token".into(), V::Bool(false)));
    if let Some(t) = tc["chat_template"].as_str() {
        md.push(("tokenizer.chat_template".into(), V::String(t.into())));
    }

    // the weights
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let gemma = model_type.starts_with("gemma");
    let permutes = matches!(model_type.as_str(), "llama" | "mistral");
    let mut names: Vec<&String> = st.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in names {
        let mut t = st[name].clone();
        if gemma && name.ends_with("norm.weight") {
            t = (t + 1.0).unwrap();
        }
        if permutes && name.contains("self_attn.q_proj") {
            t = permute(&t, n_head);
        }
        if permutes && name.contains("self_attn.k_proj") {
            t = permute(&t, n_kv);
        }
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        tensors.push((llama_cpp_name(name, &model_type), q));
    }
    // Llama 3.1's RoPE scaling as llama.cpp writes it: a tensor of frequency divisors
    if global_rope["rope_type"] == "llama3" {
        let f = |k: &str| global_rope[k].as_f64().unwrap();
        let (factor, low, high) = (f("factor"), f("low_freq_factor"), f("high_freq_factor"));
        let old = f("original_max_position_embeddings");
        let (low_wl, high_wl) = (old / low, old / high);
        let divisors: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let wl = 2.0 * std::f64::consts::PI / freq;
                let d = if wl < high_wl {
                    1.0
                } else if wl > low_wl {
                    factor
                } else {
                    let smooth = (old / wl - low) / (high - low);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                d as f32
            })
            .collect();
        let n = divisors.len();
        let t = Tensor::from_vec(divisors, n, &Device::Cpu).unwrap();
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
    }
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}
