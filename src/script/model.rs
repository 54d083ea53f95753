//! The `Model` script object: load a model, tokenize, chat, generate, read logits, capture and
//! patch activations at TransformerLens-named hook points.

use super::error::{ctx_err, ScriptResult, ToScript};
use super::options::options;
use super::tensor::{from_dynamic, to_dynamic};
use crate::chat::{ChatTemplate, Message};
use crate::generate::GenOptions;
use crate::hooks::{HookPoint, Hooks, Patch, PatchMode, Positions};
use crate::lm::{parse_device, parse_dtype, LanguageModel, LoadOptions};
use candle_core::DType;
use rhai::{Array, Dynamic, Engine, ImmutableString, Map, NativeCallContext};
use serde::Deserialize;
use std::sync::Arc;

/// A loaded model as the Rhai type `Model`: a shared handle, cheap to copy.
#[derive(Clone)]
pub struct ScriptModel {
    pub lm: Arc<LanguageModel>,
    /// A chat template set by the script, overriding the model's own.
    pub template: Option<Arc<ChatTemplate>>,
}

/// A hook built by `patch(...)` or `add(...)`, resolved against a model when run.
#[derive(Clone)]
pub struct ScriptHook {
    pub name: String,
    pub mode: PatchMode,
    pub value: candle_core::Tensor,
    /// `None` = every position (also generated tokens). Negative = from the end of the prompt.
    pub positions: Option<Vec<i64>>,
}

impl ScriptModel {
    pub fn template(&self) -> crate::Result<&ChatTemplate> {
        match &self.template {
            Some(t) => Ok(t),
            None => self.lm.template(),
        }
    }
    fn point(&self, ctx: &NativeCallContext, name: &str) -> ScriptResult<HookPoint> {
        HookPoint::parse(name, self.lm.model.n_layers()).at(ctx)
    }
}

/// `[#{role, content}, ...]` -> messages, with errors naming the item.
pub fn messages_from(ctx: &NativeCallContext, arr: &Array) -> ScriptResult<Vec<Message>> {
    messages_named(ctx, arr, "messages")
}

/// [`messages_from`] with errors naming the array `what` (`dialogs[2][1] has no content`).
pub fn messages_named(
    ctx: &NativeCallContext,
    arr: &Array,
    what: &str,
) -> ScriptResult<Vec<Message>> {
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let map = m.read_lock::<Map>().ok_or_else(|| {
                ctx_err(
                    ctx,
                    format!(
                        "{what}[{i}] is a {}, expected a map #{{role: ..., content: ...}}",
                        m.type_name()
                    ),
                )
            })?;
            let field = |k: &str| -> ScriptResult<String> {
                map.get(k)
                    .ok_or_else(|| ctx_err(ctx, format!("{what}[{i}] has no `{k}`")))?
                    .clone()
                    .into_string()
                    .map_err(|t| {
                        ctx_err(ctx, format!("{what}[{i}].{k} is a {t}, expected a string"))
                    })
            };
            Ok(Message::new(field("role")?, field("content")?))
        })
        .collect()
}

/// Generation options as a script gives them (`#{max_new_tokens: 40, temperature: 0.7}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenOpts {
    /// `None`: the caller's default (64 for `generate`, the decoder's for `ask`).
    pub max_new_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Stop a row at the model's end-of-turn/end-of-text tokens.
    pub stop: bool,
    pub use_cache: bool,
    /// The KV cache's storage type (`"f32"`, `"f16"`, `"bf16"`); absent: the model's compute
    /// type.
    pub kv_cache: Option<KvCacheType>,
}

/// A KV cache storage type as a script names it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheType {
    F32,
    F16,
    Bf16,
}

impl KvCacheType {
    pub fn dtype(self) -> DType {
        match self {
            KvCacheType::F32 => DType::F32,
            KvCacheType::F16 => DType::F16,
            KvCacheType::Bf16 => DType::BF16,
        }
    }
}

impl Default for GenOpts {
    fn default() -> Self {
        let d = GenOptions::default();
        GenOpts {
            max_new_tokens: None,
            temperature: d.temperature,
            top_p: d.top_p,
            seed: d.seed,
            stop: true,
            use_cache: d.use_cache,
            kv_cache: None,
        }
    }
}

impl GenOpts {
    /// The generator's options for `lm` (its stop tokens), `max_new_tokens` defaulting to
    /// `default_max`.
    pub fn resolve(self, lm: &LanguageModel, default_max: usize) -> GenOptions {
        GenOptions {
            max_new_tokens: self.max_new_tokens.unwrap_or(default_max),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            row_seeds: vec![],
            stop_ids: if self.stop { lm.stop_ids() } else { vec![] },
            use_cache: self.use_cache,
            kv_dtype: self.kv_cache.map(KvCacheType::dtype),
        }
    }
}

/// Generation options from a script map; unknown keys are errors (typos never pass silently).
pub fn gen_options(
    ctx: &NativeCallContext,
    lm: &LanguageModel,
    opts: &Map,
) -> ScriptResult<GenOptions> {
    let o: GenOpts = options(ctx, opts, "generate")?;
    Ok(o.resolve(lm, GenOptions::default().max_new_tokens))
}

/// `load_model` options.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LoadOpts {
    /// `"f32"` (default), `"bf16"`, ...
    dtype: Option<String>,
    /// `"cpu"` (default), `"cuda"`, `"cuda:N"`.
    device: Option<String>,
    /// A PEFT adapter directory attached to (a copy of) the model.
    adapter: Option<String>,
    /// How linear weights are kept: `"f32"` (default), `"bf16"`, `"native"` (a GGUF's own
    /// block types), `"q8_0"`, `"q4_k"` (quantized on load).
    weights: Option<String>,
}

/// A prompt argument: one string, or an array of strings (a batch).
fn prompts_from(ctx: &NativeCallContext, v: &Dynamic) -> ScriptResult<(Vec<String>, bool)> {
    if let Some(s) = v.read_lock::<ImmutableString>() {
        return Ok((vec![s.to_string()], false));
    }
    if let Some(a) = v.read_lock::<Array>() {
        let p = a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.clone()
                    .into_string()
                    .map_err(|t| ctx_err(ctx, format!("prompts[{i}] is a {t}, expected a string")))
            })
            .collect::<ScriptResult<Vec<_>>>()?;
        if p.is_empty() {
            return Err(ctx_err(ctx, "the array of prompts is empty"));
        }
        return Ok((p, true));
    }
    Err(ctx_err(
        ctx,
        format!(
            "prompt is a {}, expected a string or an array of strings",
            v.type_name()
        ),
    ))
}

fn load(ctx: &NativeCallContext, name: &str, opts: &Map) -> ScriptResult<ScriptModel> {
    let o: LoadOpts = options(ctx, opts, "load_model")?;
    load_with(ctx, name, o)
}

fn load_with(ctx: &NativeCallContext, name: &str, o: LoadOpts) -> ScriptResult<ScriptModel> {
    if let Some(dir) = o.adapter {
        // the base model (shared), then a copy with the adapter attached
        let base = load_with(ctx, name, LoadOpts { adapter: None, ..o })?;
        let lm = base.lm.with_adapter(std::path::Path::new(&dir)).at(ctx)?;
        return Ok(ScriptModel {
            lm: Arc::new(lm),
            template: None,
        });
    }
    let mut lo = LoadOptions::default();
    if let Some(d) = &o.dtype {
        lo.dtype = parse_dtype(d).at(ctx)?;
    }
    if let Some(d) = &o.device {
        lo.device = parse_device(d).at(ctx)?;
    }
    if let Some(w) = &o.weights {
        lo = lo.with_weights(w, o.dtype.is_some()).at(ctx)?;
    }
    let lm = LanguageModel::load_shared(name, &lo).at(ctx)?;
    Ok(ScriptModel { lm, template: None })
}

fn generate(
    ctx: &NativeCallContext,
    m: &ScriptModel,
    prompt: &Dynamic,
    opts: &Map,
    hooks: Option<&Array>,
) -> ScriptResult<Dynamic> {
    let (prompts, batch) = prompts_from(ctx, prompt)?;
    let g = gen_options(ctx, &m.lm, opts)?;
    check_room(ctx, m, "generate", &prompts, g.max_new_tokens, g.use_cache)?;
    let mut hs = match hooks {
        Some(h) => Some(build_hooks(ctx, m, h, &prompts)?),
        None => None,
    };
    let out = m.lm.generate(&prompts, &g, hs.as_mut()).at(ctx)?;
    Ok(if batch {
        out.into_iter().map(Dynamic::from).collect::<Array>().into()
    } else {
        out.into_iter().next().unwrap_or_default().into()
    })
}

/// Check, before running the model, that a forward over `prompts` (then `new_tokens` generated)
/// stays under the tensor limit ([`crate::budget::check_forward`]).
fn check_room(
    ctx: &NativeCallContext,
    m: &ScriptModel,
    op: &str,
    prompts: &[String],
    new_tokens: usize,
    use_cache: bool,
) -> ScriptResult<()> {
    let mut longest = 0;
    for p in prompts {
        longest = longest.max(m.lm.encode_prompt(p).at(ctx)?.len());
    }
    let c = &m.lm.model.cfg;
    let shape = crate::budget::ForwardShape {
        batch: prompts.len(),
        prompt: longest,
        new_tokens,
        use_cache,
        layers: c.num_hidden_layers,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        d_model: c.hidden_size,
        d_ff: c.intermediate_size,
    };
    crate::budget::check_forward(op, &shape).at(ctx)
}

/// Resolve script hooks into model hooks; negative positions count from each prompt's end
/// ([`Positions::resolve`]).
fn build_hooks(
    ctx: &NativeCallContext,
    m: &ScriptModel,
    hooks: &Array,
    prompts: &[String],
) -> ScriptResult<Hooks> {
    let lens: Vec<usize> = prompts
        .iter()
        .map(|p| m.lm.encode_prompt(p).map(|v| v.len()))
        .collect::<crate::Result<_>>()
        .at(ctx)?;
    let mut out = Hooks::new();
    for (i, h) in hooks.iter().enumerate() {
        let h = h
            .read_lock::<ScriptHook>()
            .ok_or_else(|| {
                ctx_err(
                    ctx,
                    format!(
                        "hooks[{i}] is a {}, expected a hook from patch(...) or add(...)",
                        h.type_name()
                    ),
                )
            })?
            .clone();
        let point = m.point(ctx, &h.name)?;
        for (row, &len) in lens.iter().enumerate() {
            let positions = Positions::resolve(h.positions.as_deref(), len)
                .map_err(|e| ctx_err(ctx, format!("hooks[{i}]: {e}")))?;
            out = out.patch(Patch {
                point,
                mode: h.mode,
                value: h.value.clone(),
                positions,
                rows: Some(vec![row]),
            });
        }
    }
    Ok(out)
}

fn make_hook(
    ctx: &NativeCallContext,
    name: &str,
    value: &Dynamic,
    positions: &Dynamic,
    mode: PatchMode,
) -> ScriptResult<ScriptHook> {
    let value = from_dynamic(value).ok_or_else(|| {
        ctx_err(
            ctx,
            format!(
                "the value of a hook must be a Tensor, got {}",
                value.type_name()
            ),
        )
    })?;
    let positions = if let Some(a) = positions.read_lock::<Array>() {
        Some(
            a.iter()
                .map(|p| {
                    p.as_int()
                        .map_err(|t| ctx_err(ctx, format!("positions must be integers, got {t}")))
                })
                .collect::<ScriptResult<Vec<i64>>>()?,
        )
    } else if let Ok(i) = positions.as_int() {
        Some(vec![i])
    } else if positions.to_string() == "all" {
        None
    } else {
        return Err(ctx_err(
            ctx,
            "positions must be an array of integers, an integer, or \"all\"",
        ));
    };
    crate::hooks::check_finite(&format!("{} at {name}", mode.verb()), &value).at(ctx)?;
    Ok(ScriptHook {
        name: name.to_string(),
        mode,
        value,
        positions,
    })
}

fn info(m: &ScriptModel) -> Map {
    let c = &m.lm.model.cfg;
    let mut map = Map::new();
    let mut put = |k: &str, v: Dynamic| {
        map.insert(k.into(), v);
    };
    put("name", m.lm.name.clone().into());
    put("path", m.lm.path.display().to_string().into());
    put("architecture", c.architecture.clone().into());
    put("n_layers", (c.num_hidden_layers as i64).into());
    put("d_model", (c.hidden_size as i64).into());
    put("d_mlp", (c.intermediate_size as i64).into());
    put("n_heads", (c.num_attention_heads as i64).into());
    put("n_kv_heads", (c.num_key_value_heads as i64).into());
    put("d_head", (c.head_dim as i64).into());
    put("vocab_size", (c.vocab_size as i64).into());
    put("family", c.family.model_type().into());
    put("rope_theta", c.rope.theta.into());
    put(
        "max_position_embeddings",
        (c.max_position_embeddings as i64).into(),
    );
    put("tied_embeddings", c.tie_word_embeddings.into());
    put(
        "dtype",
        format!("{:?}", m.lm.model.dtype()).to_lowercase().into(),
    );
    put(
        "device",
        format!("{:?}", m.lm.model.device()).to_lowercase().into(),
    );
    put("weights", m.lm.model.weight_format().name().into());
    let by = m.lm.model.weight_bytes();
    put("weight_bytes", (by.values().sum::<usize>() as i64).into());
    let mut kinds = Map::new();
    for (k, b) in by {
        kinds.insert(k.into(), (b as i64).into());
    }
    put("weight_types", kinds.into());
    map
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptModel>("Model");
    engine.register_type_with_name::<ScriptHook>("Hook");

    engine.register_fn("load_model", |ctx: NativeCallContext, name: &str| {
        load(&ctx, name, &Map::new())
    });
    engine.register_fn(
        "load_model",
        |ctx: NativeCallContext, name: &str, opts: Map| load(&ctx, name, &opts),
    );
    engine.register_fn(
        "patch",
        |ctx: NativeCallContext, name: &str, value: Dynamic, positions: Dynamic| {
            make_hook(&ctx, name, &value, &positions, PatchMode::Replace)
        },
    );
    engine.register_fn(
        "add",
        |ctx: NativeCallContext, name: &str, value: Dynamic, positions: Dynamic| {
            make_hook(&ctx, name, &value, &positions, PatchMode::Add)
        },
    );
    engine.register_fn(
        "add_norm_matched",
        |ctx: NativeCallContext, name: &str, value: Dynamic, positions: Dynamic| {
            make_hook(&ctx, name, &value, &positions, PatchMode::AddNormMatched)
        },
    );
    engine.register_fn("to_string", |h: &mut ScriptHook| {
        format!(
            "Hook({} {} at {:?}, value {:?})",
            h.mode.verb(),
            h.name,
            h.positions,
            h.value.dims()
        )
    });

    engine.register_get("name", |m: &mut ScriptModel| m.lm.name.clone());
    engine.register_fn("info", |m: &mut ScriptModel| info(m));
    engine.register_fn("to_string", |m: &mut ScriptModel| {
        let c = &m.lm.model.cfg;
        format!(
            "Model({}: {} layers, d_model {}, {} heads / {} kv, vocab {})",
            m.lm.name,
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size
        )
    });
    engine.register_fn("hook_names", |m: &mut ScriptModel| {
        HookPoint::all(m.lm.model.n_layers())
            .iter()
            .map(|p| p.to_string().into())
            .collect::<Array>()
    });

    engine.register_fn(
        "tokenize",
        |ctx: NativeCallContext, m: &mut ScriptModel, text: &str| -> ScriptResult<Array> {
            Ok(m.lm
                .tokenizer
                .encode(text)
                .at(&ctx)?
                .into_iter()
                .map(|t| Dynamic::from(t as i64))
                .collect())
        },
    );
    engine.register_fn(
        "tokens",
        |ctx: NativeCallContext, m: &mut ScriptModel, text: &str| -> ScriptResult<Array> {
            let ids = m.lm.tokenizer.encode(text).at(&ctx)?;
            Ok(ids
                .iter()
                .map(|&t| m.lm.tokenizer.id_to_token(t).unwrap_or_default().into())
                .collect())
        },
    );
    engine.register_fn(
        "detokenize",
        |ctx: NativeCallContext, m: &mut ScriptModel, ids: Array| -> ScriptResult<String> {
            let vocab = m.lm.tokenizer.vocab_size();
            let ids = ids
                .iter()
                .enumerate()
                .map(|(i, x)| match x.as_int() {
                    Ok(n) if n >= 0 && (n as usize) < vocab => Ok(n as u32),
                    Ok(n) => Err(ctx_err(
                        &ctx,
                        format!("ids[{i}] = {n} is not a token id (vocabulary of {vocab})"),
                    )),
                    Err(t) => Err(ctx_err(
                        &ctx,
                        format!("ids[{i}] is a {t}, expected an integer"),
                    )),
                })
                .collect::<ScriptResult<Vec<u32>>>()?;
            m.lm.tokenizer.decode(&ids).at(&ctx)
        },
    );

    engine.register_fn(
        "chat_template",
        |ctx: NativeCallContext,
         m: &mut ScriptModel,
         messages: Array,
         add_gen: bool|
         -> ScriptResult<String> {
            let msgs = messages_from(&ctx, &messages)?;
            m.template().and_then(|t| t.render(&msgs, add_gen)).at(&ctx)
        },
    );
    engine.register_fn(
        "set_chat_template",
        |ctx: NativeCallContext, m: &mut ScriptModel, source: &str| -> ScriptResult<()> {
            let t = ChatTemplate::new(
                source,
                m.lm.tokenizer.bos_token(),
                m.lm.tokenizer.eos_token(),
            )
            .at(&ctx)?;
            m.template = Some(Arc::new(t));
            Ok(())
        },
    );

    engine.register_fn(
        "generate",
        |ctx: NativeCallContext, m: &mut ScriptModel, prompt: Dynamic| {
            generate(&ctx, m, &prompt, &Map::new(), None)
        },
    );
    engine.register_fn(
        "generate",
        |ctx: NativeCallContext, m: &mut ScriptModel, prompt: Dynamic, opts: Map| {
            generate(&ctx, m, &prompt, &opts, None)
        },
    );
    let chat = |ctx: &NativeCallContext,
                m: &ScriptModel,
                messages: &Array,
                opts: &Map|
     -> ScriptResult<Dynamic> {
        let msgs = messages_from(ctx, messages)?;
        let prompt = m.template().and_then(|t| t.render(&msgs, true)).at(ctx)?;
        generate(ctx, m, &Dynamic::from(prompt), opts, None)
    };
    engine.register_fn(
        "chat",
        move |ctx: NativeCallContext, m: &mut ScriptModel, messages: Array| {
            chat(&ctx, m, &messages, &Map::new())
        },
    );
    engine.register_fn(
        "chat",
        move |ctx: NativeCallContext, m: &mut ScriptModel, messages: Array, opts: Map| {
            chat(&ctx, m, &messages, &opts)
        },
    );
    engine.register_fn(
        "logits",
        |ctx: NativeCallContext, m: &mut ScriptModel, prompt: &str| -> ScriptResult<Dynamic> {
            check_room(&ctx, m, "logits", &[prompt.to_string()], 0, false)?;
            Ok(to_dynamic(m.lm.logits(prompt).at(&ctx)?))
        },
    );
    engine.register_fn(
        "run_with_cache",
        |ctx: NativeCallContext,
         m: &mut ScriptModel,
         prompt: Dynamic,
         names: Array|
         -> ScriptResult<Map> {
            let (prompts, batch) = prompts_from(&ctx, &prompt)?;
            let mut points = Vec::with_capacity(names.len());
            for (i, n) in names.iter().enumerate() {
                let n = n.clone().into_string().map_err(|t| {
                    ctx_err(&ctx, format!("hook names[{i}] is a {t}, expected a string"))
                })?;
                points.push((n.clone(), m.point(&ctx, &n)?));
            }
            if points.is_empty() {
                return Err(ctx_err(&ctx, "run_with_cache needs at least one hook name"));
            }
            let pts: Vec<HookPoint> = points.iter().map(|p| p.1).collect();
            check_room(&ctx, m, "run_with_cache", &prompts, 0, false)?;
            let (cap, pads) = m.lm.run_with_cache(&prompts, &pts).at(&ctx)?;
            let mut out = Map::new();
            for (name, p) in points {
                let t = cap[&p].clone();
                let t = if batch { t } else { t.get(0).at(&ctx)? };
                out.insert(name.into(), to_dynamic(t));
            }
            if batch {
                out.insert(
                    "pads".into(),
                    pads.into_iter()
                        .map(|p| Dynamic::from(p as i64))
                        .collect::<Array>()
                        .into(),
                );
            }
            Ok(out)
        },
    );
    engine.register_fn(
        "run_with_hooks",
        |ctx: NativeCallContext, m: &mut ScriptModel, prompt: Dynamic, hooks: Array| {
            generate(&ctx, m, &prompt, &Map::new(), Some(&hooks))
        },
    );
    engine.register_fn(
        "run_with_hooks",
        |ctx: NativeCallContext, m: &mut ScriptModel, prompt: Dynamic, hooks: Array, opts: Map| {
            generate(&ctx, m, &prompt, &opts, Some(&hooks))
        },
    );
}
