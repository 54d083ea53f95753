//! Local model files: a HF-style directory or a single `.gguf` file.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::ModelSource;
use crate::{Error, Result};

pub(crate) const CONFIG: &str = "config.json";
pub(crate) const TOKENIZER: &str = "tokenizer.json";
pub(crate) const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub(crate) const GENERATION_CONFIG: &str = "generation_config.json";
pub(crate) const WEIGHTS: &str = "model.safetensors";
pub(crate) const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

const DIR_SHAPE: &str =
    "a model directory needs config.json, tokenizer.json and safetensors weights";

/// Resolve a local HF-style model directory.
pub(crate) fn resolve_dir(dir: &Path) -> Result<ModelSource> {
    let root = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
    let required = |name: &str| -> Result<PathBuf> {
        let path = root.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::bad_file(&path, format!("not found ({DIR_SHAPE})")))
        }
    };
    let optional = |name: &str| Some(root.join(name)).filter(|p| p.is_file());
    let config = required(CONFIG)?;
    let tokenizer = required(TOKENIZER)?;
    let weights = dir_weights(&root)?;
    Ok(ModelSource::Dir {
        config,
        tokenizer,
        tokenizer_config: optional(TOKENIZER_CONFIG),
        generation_config: optional(GENERATION_CONFIG),
        weights,
        root,
    })
}

/// The safetensors files of a directory: the shards named by `model.safetensors.index.json` when
/// present (each must exist), else every `*.safetensors` file, sorted by name.
fn dir_weights(root: &Path) -> Result<Vec<PathBuf>> {
    let index = root.join(WEIGHTS_INDEX);
    if index.is_file() {
        let mut weights = Vec::new();
        for shard in shard_names(&index)? {
            let path = root.join(&shard);
            if !path.is_file() {
                return Err(Error::bad_file(
                    &path,
                    format!("not found (a shard listed in {WEIGHTS_INDEX})"),
                ));
            }
            weights.push(path);
        }
        return Ok(weights);
    }
    let entries = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    let mut weights: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    weights.sort();
    if weights.is_empty() {
        return Err(Error::bad_file(
            root.join(WEIGHTS),
            format!("not found, and no {WEIGHTS_INDEX} or other *.safetensors file either ({DIR_SHAPE})"),
        ));
    }
    Ok(weights)
}

/// The distinct shard file names in a `model.safetensors.index.json`, sorted.
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_file(index, "no `weight_map` object"))?;
    let mut names = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::bad_file(index, format!("weight_map[{tensor:?}] is not a file name"))
        })?;
        let plain = Path::new(file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if file.is_empty() || !plain {
            return Err(Error::bad_file(
                index,
                format!("weight_map[{tensor:?}] = {file:?} is not a relative file name"),
            ));
        }
        names.push(file.to_string());
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(Error::bad_file(index, "empty `weight_map`"));
    }
    Ok(names)
}

/// Resolve a local `.gguf` file, checking its magic bytes.
pub(crate) fn resolve_gguf(path: &Path) -> Result<ModelSource> {
    let path = std::path::absolute(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == b"GGUF" => Ok(ModelSource::Gguf(path)),
        Ok(()) => Err(Error::bad_file(&path, "not a GGUF file (bad magic bytes)")),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(Error::bad_file(&path, "not a GGUF file (too short)"))
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}
