//! Files: `save(path)`, `save_tensors(map, path)`, `load_tensor(path)`, `load_tensors(path)`
//! (safetensors).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rhai::{Engine, Map, NativeCallContext};

use super::args::type_name;
use super::value::{from_dynamic, to_dynamic, ScriptTensor};
use crate::script::atomic_write;
use crate::script::error::{ctx_err, ScriptResult, ToScript};
use crate::Error;

/// The key `save`/`load_tensor` use for a single tensor.
pub const SINGLE_KEY: &str = "tensor";

fn save_map(path: &str, tensors: HashMap<String, Tensor>) -> crate::Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<crate::Result<HashMap<_, _>>>()?;
    atomic_write(Path::new(path), |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(|e| Error::bad_file(path, e))
    })
}

fn load_map(path: &str) -> crate::Result<HashMap<String, Tensor>> {
    std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    for t in crate::budget::safetensors_header(Path::new(path))? {
        crate::budget::check_declared("load_tensors", Path::new(path), &t)?;
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::bad_file(path, e))
}

fn load_one(path: &str) -> crate::Result<Tensor> {
    let mut map = load_map(path)?;
    if let Some(t) = map.remove(SINGLE_KEY) {
        return Ok(t);
    }
    if map.len() == 1 {
        return Ok(map.into_values().next().expect("one entry"));
    }
    let mut keys: Vec<_> = map.into_keys().collect();
    keys.sort();
    Err(Error::bad_file(
        path,
        format!(
            "no tensor named `{SINGLE_KEY}` (it holds {}: use load_tensors)",
            if keys.is_empty() {
                "nothing".to_string()
            } else {
                keys.join(", ")
            }
        ),
    ))
}

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn(
        "save",
        |ctx: NativeCallContext, t: &mut ScriptTensor, path: &str| -> ScriptResult<()> {
            save_map(path, HashMap::from([(SINGLE_KEY.to_string(), t.0.clone())])).at(&ctx)
        },
    );
    engine.register_fn(
        "save_tensors",
        |ctx: NativeCallContext, map: Map, path: &str| -> ScriptResult<()> {
            let mut tensors = HashMap::new();
            for (k, v) in map {
                let t = from_dynamic(&v).ok_or_else(|| {
                    ctx_err(
                        &ctx,
                        format!(
                            "save_tensors: `{k}` is a {}, not a Tensor",
                            type_name(&ctx, &v)
                        ),
                    )
                })?;
                tensors.insert(k.to_string(), t);
            }
            save_map(path, tensors).at(&ctx)
        },
    );
    engine.register_fn(
        "load_tensor",
        |ctx: NativeCallContext, path: &str| -> ScriptResult<ScriptTensor> {
            Ok(ScriptTensor(load_one(path).at(&ctx)?))
        },
    );
    engine.register_fn(
        "load_tensors",
        |ctx: NativeCallContext, path: &str| -> ScriptResult<Map> {
            let map = load_map(path).at(&ctx)?;
            Ok(map
                .into_iter()
                .map(|(k, t)| (k.into(), to_dynamic(t)))
                .collect())
        },
    );
}
