//! Per-layer key/value cache for incremental decoding, kept in the activations' dtype or in a
//! narrower one (`f16`/`bf16`: half the bytes, each key and value rounded once to that type
//! as it is stored).

use candle_core::{DType, Result, Tensor};

#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, n_kv_heads, seq, head_dim]`, in `dtype` when set.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The stored type; `None`: the type the model computes them in.
    dtype: Option<DType>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            dtype: None,
        }
    }

    /// A cache that stores keys and values as `dtype` (`None`: as computed) and hands them back
    /// in the type they were computed in.
    pub fn with_dtype(n_layers: usize, dtype: Option<DType>) -> Self {
        KvCache {
            dtype,
            ..Self::new(n_layers)
        }
    }

    /// The type keys and values are stored in (`None`: as computed).
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Tokens already cached (the padded length).
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the cached keys and values hold.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Append this chunk's keys/values for `layer` and return the full keys/values, in the
    /// chunk's dtype.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let compute = k.dtype();
        let (k, v) = match self.dtype {
            Some(d) if d != compute => (k.to_dtype(d)?, v.to_dtype(d)?),
            _ => (k, v),
        };
        let kv = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        let (k, v) = kv;
        Ok((k.to_dtype(compute)?, v.to_dtype(compute)?))
    }
}
