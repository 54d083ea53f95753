//! Where weights come from: a GGUF file (dequantized, llama.cpp's q/k permutation undone, its
//! per-family tensor names mapped) or
//! HF safetensors (single file or shards). Both answer to HF tensor names, so the model loader
//! has one naming scheme; every failure names the file and the tensor.

use super::linear::Linear;
use super::names::Proj;
use super::quant::{self, QuantWeight, WeightFormat};
use crate::config::Family;
use crate::{Error, Result};
use candle_core::quantized::gguf_file;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// A store of named weights, addressed by HF names (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// Load a tensor with the given HF name and check its shape; `Ok(None)` if absent.
    fn get(&mut self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>>;
    /// Does the source hold a tensor with this HF name?
    fn has(&self, name: &str) -> bool;
    /// The file(s) this source reads, for error messages.
    fn describe(&self) -> String;
    /// Do norm weights already hold Gemma's `1 + w` (llama.cpp's converter folds it in)?
    fn norms_include_unit_offset(&self) -> bool {
        false
    }
    /// Load a linear layer's weight `[out, in]` kept as `format` says; `Ok(None)` if absent.
    /// A source without block types (safetensors) gives `native` as `dtype`.
    fn get_linear(
        &mut self,
        name: &str,
        format: WeightFormat,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<LinearWeight>> {
        dense_or_quantized(self, name, format, dtype, device)
    }
}

/// A linear layer's weight `[out, in]` as a source gives it.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// A float tensor (f32, or the `dtype` option).
    Dense(Tensor),
    /// Blocks of a GGUF type.
    Quant(QuantWeight),
}

impl LinearWeight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            LinearWeight::Dense(t) => t.dims().to_vec(),
            LinearWeight::Quant(q) => vec![q.n(), q.k()],
        }
    }

    /// Rows `[at, at + rows)` (one part of a fused projection).
    pub fn rows(&self, at: usize, rows: usize) -> candle_core::Result<Self> {
        Ok(match self {
            LinearWeight::Dense(t) => LinearWeight::Dense(t.narrow(0, at, rows)?.contiguous()?),
            LinearWeight::Quant(q) => LinearWeight::Quant(q.rows(at, rows)?),
        })
    }

    /// A block projection: f32 packed for the CPU's kernels, quantized kept as it is.
    pub fn into_linear(self, bias: Option<Tensor>) -> candle_core::Result<Linear> {
        match self {
            LinearWeight::Dense(t) => Linear::new_packed(t, bias),
            LinearWeight::Quant(q) => Ok(Linear::new_quant(q, bias)),
        }
    }
}

/// The default [`WeightSource::get_linear`]: the float tensor, quantized on load when
/// `format` asks for a block type.
pub fn dense_or_quantized<S: WeightSource + ?Sized>(
    src: &mut S,
    name: &str,
    format: WeightFormat,
    dtype: DType,
    device: &Device,
) -> Result<Option<LinearWeight>> {
    let Some(ty) = format.quantize_to() else {
        return Ok(src.get(name, dtype, device)?.map(LinearWeight::Dense));
    };
    let Some(t) = src.get(name, DType::F32, device)? else {
        return Ok(None);
    };
    let q = QuantWeight::quantize(&t, ty, name).map_err(|e| {
        Error::invalid(format!(
            "{}: weights: \"{}\": {e}",
            src.describe(),
            format.name()
        ))
    })?;
    Ok(Some(LinearWeight::Quant(q)))
}

/// Load a required linear weight and check its shape.
pub fn require_linear(
    src: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
    format: WeightFormat,
    dtype: DType,
    device: &Device,
) -> Result<LinearWeight> {
    let w = src
        .get_linear(name, format, dtype, device)?
        .ok_or_else(|| Error::BadFile {
            path: PathBuf::from(src.describe()),
            msg: format!("missing tensor `{name}`"),
        })?;
    if w.dims() != shape {
        return Err(Error::BadFile {
            path: PathBuf::from(src.describe()),
            msg: format!(
                "tensor `{name}` has shape {:?}, the config expects {:?}",
                w.dims(),
                shape
            ),
        });
    }
    Ok(w)
}

/// Load an optional linear weight and check its shape when present.
pub fn optional_linear(
    src: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
    format: WeightFormat,
    dtype: DType,
    device: &Device,
) -> Result<Option<LinearWeight>> {
    if !src.has(name) {
        return Ok(None);
    }
    require_linear(src, name, shape, format, dtype, device).map(Some)
}

/// Load a required tensor and check its shape.
pub fn require(
    src: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let t = src
        .get(name, dtype, device)?
        .ok_or_else(|| Error::BadFile {
            path: PathBuf::from(src.describe()),
            msg: format!("missing tensor `{name}`"),
        })?;
    check_shape(src, name, &t, shape)?;
    Ok(t)
}

/// Load an optional tensor and check its shape when present.
pub fn optional(
    src: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    match src.get(name, dtype, device)? {
        Some(t) => {
            check_shape(src, name, &t, shape)?;
            Ok(Some(t))
        }
        None => Ok(None),
    }
}

fn check_shape(src: &dyn WeightSource, name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dims() != shape {
        return Err(Error::BadFile {
            path: PathBuf::from(src.describe()),
            msg: format!(
                "tensor `{name}` has shape {:?}, the config expects {:?}",
                t.dims(),
                shape
            ),
        });
    }
    Ok(())
}

/// A GGUF file. Tensors are dequantized on load to the requested dtype.
pub struct GgufWeights {
    path: PathBuf,
    reader: BufReader<File>,
    /// The file memory-mapped (where the OS allows), so that `native` block weights are
    /// repacked straight from the page cache: one pass instead of read, copy and repack.
    map: Option<memmap2::Mmap>,
    pub content: gguf_file::Content,
    n_heads: usize,
    n_kv_heads: usize,
    /// The family decides llama.cpp's tensor names and conventions.
    family: Family,
}

impl GgufWeights {
    /// Open a GGUF file and read its header and metadata.
    pub fn open(path: &Path) -> Result<Self> {
        crate::sources::gguf_check::validate(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is only read; a concurrent writer is the user's responsibility, as
        // with every mmap-based loader (safetensors too).
        let map = unsafe { memmap2::Mmap::map(&file) }.ok();
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| Error::bad_file(path, format!("not a readable GGUF file: {e}")))?;
        Ok(GgufWeights {
            path: path.to_path_buf(),
            reader,
            map,
            content,
            n_heads: 0,
            n_kv_heads: 0,
            family: Family::Llama,
        })
    }

    /// Tell the loader the family (llama.cpp's names and conventions differ per family) and
    /// the head counts, needed to undo the q/k permutation.
    pub fn set_family(&mut self, family: Family, n_heads: usize, n_kv_heads: usize) {
        self.n_heads = n_heads;
        self.n_kv_heads = n_kv_heads;
        self.family = family;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF name of an HF tensor name, in llama.cpp's naming for `family` (Gemma's
    /// `post_attention_layernorm` is the norm after attention, Llama's the one before the MLP).
    pub fn gguf_name(hf: &str, family: Family) -> Option<String> {
        let simple = match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            "rope_freqs.weight" => Some("rope_freqs.weight"),
            _ => None,
        };
        if let Some(s) = simple {
            return Some(s.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (i, rest) = rest.split_once('.')?;
        let (module, kind) = rest.rsplit_once('.')?;
        let g = match (module, family.is_gemma()) {
            ("input_layernorm", _) => "attn_norm",
            ("post_attention_layernorm", false) => "ffn_norm",
            ("post_attention_layernorm", true) => "post_attention_norm",
            ("pre_feedforward_layernorm", _) => "ffn_norm",
            ("post_feedforward_layernorm", _) => "post_ffw_norm",
            ("self_attn.q_norm", _) => "attn_q_norm",
            ("self_attn.k_norm", _) => "attn_k_norm",
            ("self_attn.qkv_proj", _) => "attn_qkv",
            ("mlp.gate_up_proj", _) => "ffn_up",
            (m, _) => {
                let (group, short) = m.split_once('.')?;
                Proj::parse(short)
                    .filter(|p| p.group() == group)?
                    .gguf_name()
            }
        };
        Some(format!("blk.{i}.{g}.{kind}"))
    }
}

/// Undo llama.cpp's `permute`: rows grouped `[head, hd/2, 2]` back to HF's `[head, 2, hd/2]`.
pub fn unpermute_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let hd = out / n_head;
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, hd / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// llama.cpp's q/k row permutation undone as an index map: row `i` of HF's layout is row
/// `from[i]` of the file's (`[head, hd/2, 2]` back to `[head, 2, hd/2]`, as [`unpermute_rows`]).
pub fn unpermute_index(out: usize, n_head: usize) -> Vec<usize> {
    let hd = out / n_head.max(1);
    let half = hd / 2;
    let mut from = Vec::with_capacity(out);
    for h in 0..n_head {
        for a in 0..2 {
            for b in 0..half {
                from.push(h * hd + 2 * b + a);
            }
        }
    }
    from
}

impl WeightSource for GgufWeights {
    /// `native` keeps the block types of the file (the q/k permutation undone on whole rows
    /// of blocks, which is exact); f32/f16/bf16 tensors load as `dtype`.
    fn get_linear(
        &mut self,
        name: &str,
        format: WeightFormat,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<LinearWeight>> {
        if format != WeightFormat::Native {
            return dense_or_quantized(self, name, format, dtype, device);
        }
        let Some(gname) = Self::gguf_name(name, self.family) else {
            return Ok(None);
        };
        let Some(info) = self.content.tensor_infos.get(&gname) else {
            return Ok(None);
        };
        let ty = info.ggml_dtype;
        if matches!(
            ty,
            candle_core::quantized::GgmlDType::F32
                | candle_core::quantized::GgmlDType::F16
                | candle_core::quantized::GgmlDType::BF16
        ) {
            return Ok(self.get(name, dtype, device)?.map(LinearWeight::Dense));
        }
        if !quant::supported(ty) {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "tensor `{gname}` is {}, which lqa cannot keep as stored (weights: \"native\"); \
                     load it with weights: \"f32\" or \"q8_0\"",
                    quant::type_name(ty)
                ),
            ));
        }
        // llama.cpp's q/k row permutation, undone on whole rows of blocks
        let heads = if !self.family.gguf_permutes_qk() {
            None
        } else if gname.ends_with("attn_q.weight") {
            Some(self.n_heads)
        } else if gname.ends_with("attn_k.weight") {
            Some(self.n_kv_heads)
        } else {
            None
        };
        let bad =
            |e: candle_core::Error| Error::bad_file(&self.path, format!("tensor `{gname}`: {e}"));
        if let (Some(map), true) = (&self.map, super::qgemv::supported(ty)) {
            let (n, k) = info.shape.dims2().map_err(bad)?;
            let bs = ty.block_size();
            let start = self.content.tensor_data_offset.saturating_add(info.offset);
            let size = (n * k / bs * ty.type_size()) as u64;
            if !k.is_multiple_of(bs) || start.saturating_add(size) > map.len() as u64 {
                return Err(Error::bad_file(
                    &self.path,
                    format!(
                        "tensor `{gname}` [{n}, {k}] of {} needs {size} bytes at offset {start},                          past the end of the file ({} bytes)",
                        quant::type_name(ty),
                        map.len()
                    ),
                ));
            }
            let (start, size) = (start as usize, size as usize);
            let from = heads.map(|h| unpermute_index(n, h));
            let w = QuantWeight::from_blocks(
                ty,
                &map[start..start + size],
                (n, k),
                from.as_deref(),
                &gname,
            )
            .map_err(|e| Error::bad_file(&self.path, e))?;
            // the packed copy is all that is kept: hand the file's pages back, so that they
            // do not count in the process's RSS (the page cache keeps them for the OS)
            // SAFETY: no borrow of the mapping outlives `from_blocks`.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, size)
            };
            return Ok(Some(LinearWeight::Quant(w)));
        }
        let q = self
            .content
            .tensor(&mut self.reader, &gname, &Device::Cpu)
            .map_err(bad)?;
        let mut w = QuantWeight::new(q, &gname).map_err(|e| Error::bad_file(&self.path, e))?;
        if let Some(h) = heads {
            w = w.permute_rows(&unpermute_index(w.n(), h))?;
        }
        Ok(Some(LinearWeight::Quant(w)))
    }

    fn get(&mut self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        let Some(gname) = Self::gguf_name(name, self.family) else {
            return Ok(None);
        };
        if !self.content.tensor_infos.contains_key(&gname) {
            return Ok(None);
        }
        let q = self
            .content
            .tensor(&mut self.reader, &gname, device)
            .map_err(|e| Error::bad_file(&self.path, format!("tensor `{gname}`: {e}")))?;
        let mut t = q
            .dequantize(device)
            .map_err(|e| Error::bad_file(&self.path, format!("tensor `{gname}`: {e}")))?;
        if self.family.gguf_permutes_qk() {
            if gname.ends_with("attn_q.weight") || gname.ends_with("attn_q.bias") {
                t = unpermute_rows(&t, self.n_heads)?;
            } else if gname.ends_with("attn_k.weight") || gname.ends_with("attn_k.bias") {
                t = unpermute_rows(&t, self.n_kv_heads)?;
            }
        }
        Ok(Some(t.to_dtype(dtype)?))
    }
    fn has(&self, name: &str) -> bool {
        Self::gguf_name(name, self.family)
            .is_some_and(|g| self.content.tensor_infos.contains_key(&g))
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn norms_include_unit_offset(&self) -> bool {
        true
    }
}

/// HF safetensors, one file or shards, memory-mapped.
pub struct SafetensorsWeights {
    files: Vec<PathBuf>,
    st: MmapedSafetensors,
    /// What the files write instead of `model.` (multimodal checkpoints keep the language
    /// model under `language_model.model.` or `model.language_model.`).
    prefix: String,
}

impl SafetensorsWeights {
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::invalid("no safetensors files given"));
        }
        // Open each file alone first, so a corrupt one is named.
        for f in files {
            // SAFETY: the file is only read; a concurrent writer is the user's responsibility, as
            // with every mmap-based loader.
            unsafe { MmapedSafetensors::new(f) }
                .map_err(|e| Error::bad_file(f, format!("not a readable safetensors file: {e}")))?;
        }
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| Error::bad_file(&files[0], e))?;
        let prefix = st
            .tensors()
            .into_iter()
            .filter_map(|(n, _)| n.strip_suffix("embed_tokens.weight").map(str::to_string))
            .min_by_key(|p| p.len())
            .unwrap_or_else(|| "model.".into());
        Ok(SafetensorsWeights {
            files: files.to_vec(),
            st,
            prefix,
        })
    }

    /// The name in the files of an HF (text-model) name.
    fn stored(&self, name: &str) -> String {
        match name.strip_prefix("model.") {
            Some(rest) if self.prefix != "model." => format!("{}{rest}", self.prefix),
            _ => {
                if name == "lm_head.weight" && self.st.get(name).is_err() {
                    // `language_model.lm_head.weight` beside `language_model.model.`
                    let outer = self.prefix.trim_end_matches("model.");
                    return format!("{outer}lm_head.weight");
                }
                name.to_string()
            }
        }
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&mut self, name: &str, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        let name = &self.stored(name);
        if self.st.get(name).is_err() {
            return Ok(None);
        }
        let t = self
            .st
            .load(name, device)
            .map_err(|e| Error::bad_file(self.describe(), format!("tensor `{name}`: {e}")))?;
        Ok(Some(t.to_dtype(dtype)?))
    }
    fn has(&self, name: &str) -> bool {
        self.st.get(&self.stored(name)).is_ok()
    }
    fn describe(&self) -> String {
        if self.files.len() == 1 {
            self.files[0].display().to_string()
        } else {
            format!(
                "{} (+{} shards)",
                self.files[0].display(),
                self.files.len() - 1
            )
        }
    }
}
