//! Memory limits, checked before allocating: no input may abort the process with an
//! allocation failure.
//!
//! - The largest tensor one operation may make ([`max_tensor_bytes`], `--max-tensor-bytes`,
//!   default half the machine's physical memory; 0 = no limit). Script bindings call [`check`]
//!   with the shape and dtype an op will produce *before* running it, so `zeros([100000, 100000,
//!   100])` is a script error naming the op, the shape and the limit, and the REPL keeps its state.
//!   The limit is per thread: a [`crate::script::Runtime`] sets it (with [`scoped`]) for the
//!   code it runs, so runtimes with different limits do not see each other's.
//! - Whether a model's weights fit ([`check_model_fits`]): every weight tensor under the tensor
//!   limit and the whole model under physical memory, read from the files' headers before any
//!   weight is read.

use std::cell::Cell;
use std::path::Path;

use candle_core::DType;

use crate::model::quant::WeightFormat;
use crate::sources::ModelSource;
use crate::{Error, Result};

thread_local! {
    /// `None`: not set on this thread, use [`default_max_tensor_bytes`].
    static MAX_TENSOR_BYTES: Cell<Option<u64>> = const { Cell::new(None) };
}

/// The machine's physical memory in bytes (`None` if the OS does not say).
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads system constants.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages > 0 && page > 0).then(|| (pages as u64).saturating_mul(page as u64))
}

/// The default tensor limit: half of physical memory (8 GiB when that is unknown).
pub fn default_max_tensor_bytes() -> u64 {
    physical_memory().map_or(8 << 30, |m| m / 2)
}

/// The tensor limit in force on this thread (0 = no limit).
pub fn max_tensor_bytes() -> u64 {
    MAX_TENSOR_BYTES
        .with(Cell::get)
        .unwrap_or_else(default_max_tensor_bytes)
}

/// Restores the previous limit when dropped (see [`scoped`]).
pub struct LimitGuard(Option<u64>);

impl Drop for LimitGuard {
    fn drop(&mut self) {
        MAX_TENSOR_BYTES.with(|c| c.set(self.0));
    }
}

/// Set this thread's tensor limit until the guard is dropped.
#[must_use = "the limit is restored when the guard is dropped"]
pub fn scoped(limit: u64) -> LimitGuard {
    LimitGuard(MAX_TENSOR_BYTES.with(|c| c.replace(Some(limit))))
}

/// A byte count as people read it: `4.0 TB`, `12.3 GB`, `512 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn shape_str(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// Elements of a shape, `None` if the product overflows `usize`.
pub fn elem_count(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Bytes of a tensor of this shape and dtype, `None` if that overflows.
pub fn tensor_bytes(dims: &[usize], dtype: DType) -> Option<u64> {
    elem_count(dims).and_then(|n| (n as u64).checked_mul(dtype.size_in_bytes() as u64))
}

/// Check that `op` may make a tensor of `dims` and `dtype` under this thread's limit; the error
/// names the op, the shape and the limit.
pub fn check(op: &str, dims: &[usize], dtype: DType) -> Result<()> {
    check_with(op, dims, dtype, max_tensor_bytes())
}

/// [`check`] against an explicit limit (0 = no limit; overflow is still an error).
pub fn check_with(op: &str, dims: &[usize], dtype: DType, limit: u64) -> Result<()> {
    let what = format!("Tensor{} {}", shape_str(dims), dtype.as_str());
    let Some(bytes) = tensor_bytes(dims, dtype) else {
        return Err(Error::invalid(format!(
            "{op}: {what} has more elements than memory can address (the shape's product overflows)"
        )));
    };
    // A tensor's elements are indexed by usize everywhere; bytes must fit too.
    if bytes > isize::MAX as u64 {
        return Err(Error::invalid(format!(
            "{op}: {what} needs {} bytes, more than memory can address",
            bytes
        )));
    }
    if limit > 0 && bytes > limit {
        return Err(Error::invalid(format!(
            "{op}: {what} needs {} ({bytes} bytes), over the tensor limit of {} \
             (--max-tensor-bytes {limit})",
            human(bytes),
            human(limit)
        )));
    }
    Ok(())
}

/// The sizes a forward pass (or a generation) works with, for [`check_forward`].
#[derive(Debug, Clone, Copy)]
pub struct ForwardShape {
    pub batch: usize,
    /// Longest prompt, in tokens.
    pub prompt: usize,
    /// Tokens generated after the prompt (0 for one forward).
    pub new_tokens: usize,
    /// Whether generation keeps a KV cache (else each step reruns the whole sequence).
    pub use_cache: bool,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub d_model: usize,
    pub d_ff: usize,
}

/// Check, before running it, that a forward pass or generation stays under this thread's
/// tensor limit: the attention scores, the MLP's hidden layer and the KV cache it will make.
pub fn check_forward(op: &str, f: &ForwardShape) -> Result<()> {
    let total = f.prompt.checked_add(f.new_tokens).ok_or_else(|| {
        Error::invalid(format!(
            "{op}: {} + {} tokens overflows",
            f.prompt, f.new_tokens
        ))
    })?;
    let queries = if f.use_cache || f.new_tokens == 0 {
        f.prompt
    } else {
        total
    };
    let f32 = DType::F32;
    check(
        &format!("{op} (attention scores)"),
        &[f.batch, f.heads, queries, total],
        f32,
    )?;
    check(
        &format!("{op} (MLP activations)"),
        &[f.batch, total, f.d_ff.max(f.d_model)],
        f32,
    )?;
    if f.new_tokens > 0 && f.use_cache {
        check(
            &format!("{op} (KV cache)"),
            &[f.layers, 2, f.batch, f.kv_heads, total, f.head_dim],
            f32,
        )?;
    }
    Ok(())
}

/// Check a model config's sizes before anything is built from them: every size at least 1,
/// the layer count no more than the weight files could hold, and the weights they imply
/// countable (products that overflow are errors). `declared` is the number of tensors the
/// weight files declare.
pub fn check_config(cfg: &crate::config::ModelConfig, declared: usize, path: &Path) -> Result<()> {
    let bad = |m: String| Err(Error::bad_file(path, m));
    for (name, v) in [
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
        ("head_dim", cfg.head_dim),
    ] {
        if v == 0 {
            return bad(format!("{name} is 0"));
        }
    }
    // every layer has several weights: more layers than tensors cannot be loaded
    if cfg.num_hidden_layers > declared {
        return bad(format!(
            "num_hidden_layers is {}, but the weights hold only {declared} tensors",
            cfg.num_hidden_layers
        ));
    }
    let (d, ff, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads.checked_mul(cfg.head_dim);
    let kv = cfg.num_key_value_heads.checked_mul(cfg.head_dim);
    let per_layer = q
        .zip(kv)
        .and_then(|(q, kv)| q.checked_add(kv)?.checked_mul(2)?.checked_mul(d))
        .and_then(|attn| attn.checked_add(ff.checked_mul(d)?.checked_mul(3)?));
    let total = per_layer
        .and_then(|l| l.checked_mul(cfg.num_hidden_layers))
        .and_then(|t| t.checked_add(v.checked_mul(d)?.checked_mul(2)?));
    match total.and_then(|t| t.checked_mul(4)) {
        Some(_) => Ok(()),
        None => bad(format!(
            "the sizes (vocab {v}, hidden {d}, intermediate {ff}, {} layers of {} x {} heads) \
             describe more weights than memory can address",
            cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
        )),
    }
}

/// One weight tensor as a file's header declares it.
#[derive(Debug, Clone)]
pub struct DeclaredTensor {
    pub name: String,
    pub dims: Vec<usize>,
    /// Bits of one element as stored (GGUF: as dequantized, f32).
    pub elem_bits: usize,
    /// Bytes of its data in the file, where it is in a block type (GGUF).
    pub block_bytes: Option<u64>,
}

/// The weight tensors a model's files declare, from their headers only.
pub fn declared_tensors(src: &ModelSource) -> Result<Vec<DeclaredTensor>> {
    match src {
        ModelSource::Gguf(path) => Ok(crate::sources::gguf_check::validate(path)?
            .into_iter()
            .map(|t| DeclaredTensor {
                block_bytes: (t.dtype.block_size() > 1).then_some(t.bytes),
                name: t.name,
                dims: t.dims,
                elem_bits: 32,
            })
            .collect()),
        ModelSource::Dir { weights, .. } => {
            let mut out = Vec::new();
            for f in weights {
                out.extend(safetensors_header(f)?);
            }
            Ok(out)
        }
    }
}

/// The tensors of a safetensors file, from its header (the data is not read).
pub fn safetensors_header(path: &Path) -> Result<Vec<DeclaredTensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map; a concurrent writer is the user's responsibility, as with every
    // mmap-based loader.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| Error::bad_file(path, format!("not a readable safetensors file: {e}")))?;
    Ok(meta
        .tensors()
        .into_iter()
        .map(|(name, info)| DeclaredTensor {
            name,
            dims: info.shape.clone(),
            elem_bits: info.dtype.bitsize(),
            block_bytes: None,
        })
        .collect())
}

/// Check, before reading it, that a tensor a file declares fits under this thread's limit.
pub fn check_declared(op: &str, path: &Path, t: &DeclaredTensor) -> Result<()> {
    let limit = max_tensor_bytes();
    let bytes = elem_count(&t.dims)
        .and_then(|n| (n as u64).checked_mul(t.elem_bits as u64))
        .map(|bits| bits.div_ceil(8));
    match bytes {
        None => Err(Error::bad_file(
            path,
            format!(
                "tensor `{}` {}: the shape's product overflows",
                t.name,
                shape_str(&t.dims)
            ),
        )),
        Some(b) if limit > 0 && b > limit => Err(Error::bad_file(
            path,
            format!(
                "{op}: tensor `{}` {} needs {} ({b} bytes), over the tensor limit of {} \
                 (--max-tensor-bytes {limit})",
                t.name,
                shape_str(&t.dims),
                human(b),
                human(limit)
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// Check, from the headers alone, that a model's weights fit before any is read: each tensor at
/// `dtype` under this thread's tensor limit, the whole model under physical memory. The error
/// suggests a smaller dtype when one would fit. Under a quantized `weights` format a matrix
/// counts at its kept size (its stored bits under `native`, 8.5 or 4.5 bits a weight under
/// `q8_0`/`q4_k`).
pub fn check_model_fits(src: &ModelSource, dtype: DType, weights: WeightFormat) -> Result<()> {
    let tensors = declared_tensors(src)?;
    let path = src.path();
    let limit = max_tensor_bytes();
    let blocks = tensors.iter().any(|t| t.block_bytes.is_some());
    let hint = |bytes_at_dtype: u64| -> String {
        if weights.is_quantized() {
            String::new()
        } else if blocks {
            " (load_model(name, #{weights: \"native\"}) keeps the file's quantized blocks)"
                .to_string()
        } else if dtype == DType::F32 && bytes_at_dtype / 2 <= physical_memory().unwrap_or(u64::MAX)
        {
            " (load_model(name, #{dtype: \"bf16\"}) halves it)".to_string()
        } else {
            String::new()
        }
    };
    let mut total: u64 = 0;
    for t in &tensors {
        let overflow = || {
            Error::bad_file(
                path,
                format!(
                    "tensor `{}` {}: the shape's product overflows",
                    t.name,
                    shape_str(&t.dims)
                ),
            )
        };
        let matrix = t.dims.len() == 2;
        let kept_bits = match weights {
            WeightFormat::Q8_0 if matrix => Some(17.0 / 2.0),
            WeightFormat::Q4K if matrix => Some(9.0 / 2.0),
            _ => None,
        };
        let native = weights == WeightFormat::Native && matrix && t.block_bytes.is_some();
        let bytes = match (kept_bits, t.block_bytes) {
            (_, Some(b)) if native => b,
            (Some(bits), _) => elem_count(&t.dims)
                .map(|n| (n as f64 * bits / 8.0).ceil() as u64)
                .ok_or_else(overflow)?,
            _ => tensor_bytes(&t.dims, dtype).ok_or_else(overflow)?,
        };
        // a weight is read in its stored type (GGUF: dequantized to f32 unless kept as
        // stored), then cast: the wider of the two is what one weight needs at once
        let bits = t.elem_bits.max(8 * dtype.size_in_bytes()) as u64;
        let at_once = if native {
            bytes
        } else {
            elem_count(&t.dims)
                .and_then(|n| (n as u64).checked_mul(bits))
                .map(|b| b.div_ceil(8))
                .ok_or_else(overflow)?
        };
        if limit > 0 && at_once > limit {
            return Err(Error::bad_file(
                path,
                format!(
                    "weight `{}` {} needs {} to load, over the tensor limit of {} \
                     (--max-tensor-bytes){}",
                    t.name,
                    shape_str(&t.dims),
                    human(at_once),
                    human(limit),
                    // a smaller dtype helps only if the weight is stored that small
                    if t.elem_bits <= 16 && at_once / 2 <= limit {
                        hint(bytes)
                    } else {
                        String::new()
                    }
                ),
            ));
        }
        total = total.saturating_add(bytes);
    }
    if let Some(mem) = physical_memory() {
        if total > mem {
            return Err(Error::bad_file(
                path,
                format!(
                    "the model's weights need {} at {}, more than this machine's memory ({}){}",
                    human(total),
                    if weights.is_quantized() {
                        format!("weights {}", weights.name())
                    } else {
                        dtype.as_str().to_string()
                    },
                    human(mem),
                    hint(total)
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_overflow() {
        assert!(check_with("zeros", &[10, 10], DType::F32, 400).is_ok());
        let e = check_with("zeros", &[10, 11], DType::F32, 400).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("zeros: Tensor[10, 11] f32 needs 440 B"),
            "{msg}"
        );
        assert!(msg.contains("--max-tensor-bytes 400"), "{msg}");
        let e = check_with("ones", &[usize::MAX, 3], DType::F32, 0).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        let e = check_with("ones", &[usize::MAX / 4], DType::F32, 0).unwrap_err();
        assert!(
            e.to_string().contains("more than memory can address"),
            "{e}"
        );
        assert!(check_with("zeros", &[0, usize::MAX], DType::F32, 1).is_ok());
    }

    #[test]
    fn scoped_limit_restores() {
        let before = max_tensor_bytes();
        {
            let _g = scoped(123);
            assert_eq!(max_tensor_bytes(), 123);
            {
                let _h = scoped(0);
                assert_eq!(max_tensor_bytes(), 0);
            }
            assert_eq!(max_tensor_bytes(), 123);
        }
        assert_eq!(max_tensor_bytes(), before);
        assert!(physical_memory().unwrap_or(1) > 0);
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(4_000_000_000_000), "4.0 TB");
    }
}
