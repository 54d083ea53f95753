//! Per-layer key/value cache for incremental decoding, kept in the activations' dtype or in a
//! narrower one (`f16`/`bf16`: half the bytes, each key and value rounded once to that type
//! as it is stored).

use candle_core::{DType, Result, Tensor};

/// One layer's cache: keys and values `[batch, n_kv_heads, capacity, head_dim]`, of which the
/// first `len` positions are filled.
#[derive(Debug)]
struct Layer {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl Layer {
    /// Buffers of `capacity` positions shaped like `k` (`[b, h, s, d]`), holding `k`, `v`.
    fn new(k: &Tensor, v: &Tensor, capacity: usize) -> Result<Self> {
        let (b, h, s, d) = k.dims4()?;
        let (bv, hv, _, dv) = v.dims4()?;
        // a long generation grows the buffers: past the tensor limit it is an error, not an
        // allocation failure
        for dims in [[b, h, capacity, d], [bv, hv, capacity, dv]] {
            crate::budget::check("KV cache", &dims, k.dtype())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        }
        let l = Layer {
            k: Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?,
            v: Tensor::zeros((bv, hv, capacity, dv), v.dtype(), v.device())?,
            len: 0,
        };
        l.k.slice_set(k, 2, 0)?;
        l.v.slice_set(v, 2, 0)?;
        Ok(Layer { len: s, ..l })
    }

    fn capacity(&self) -> usize {
        self.k.dims()[2]
    }

    /// The filled positions (views of the buffers, no copy).
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }
}

/// Room for this many positions beyond a layer's first chunk; the buffers double when full.
const HEADROOM: usize = 128;

/// Keys and values per layer, written in place into buffers that grow by doubling, so a
/// decoding step copies only its own position (appending by concatenation copied the whole
/// cache at every step: 9 MB per token for the default model after 200 tokens). For inference:
/// the in-place writes record no gradients. Not `Clone`: two caches sharing buffers would write
/// into each other.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<Layer>>,
    /// The stored type; `None`: the type the model computes them in.
    dtype: Option<DType>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: (0..n_layers).map(|_| None).collect(),
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
        self.layers.iter().flatten().next().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the cached keys and values hold (the filled positions).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let per_pos = |t: &Tensor| t.elem_count() / l.capacity().max(1);
                (per_pos(&l.k) + per_pos(&l.v)) * l.len * l.k.dtype().size_in_bytes()
            })
            .sum()
    }

    /// Append this chunk's keys/values (`[b, n_kv_heads, s, head_dim]`) for `layer` and return
    /// the full keys/values, in the chunk's dtype.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let compute = k.dtype();
        let (k, v) = match self.dtype {
            Some(d) if d != compute => (k.to_dtype(d)?, v.to_dtype(d)?),
            _ => (k.contiguous()?, v.contiguous()?),
        };
        let s = k.dim(2)?;
        // an error (past the tensor limit, a chunk of another shape) leaves the cache as it was
        let slot = &mut self.layers[layer];
        let entry = match slot {
            None => slot.insert(Layer::new(&k, &v, s + HEADROOM)?),
            Some(l) if l.len + s > l.capacity() => {
                let (pk, pv) = l.filled()?;
                let (pk, pv) = (pk.contiguous()?, pv.contiguous()?);
                let mut grown = Layer::new(&pk, &pv, (2 * l.capacity()).max(l.len + s))?;
                grown.k.slice_set(&k, 2, grown.len)?;
                grown.v.slice_set(&v, 2, grown.len)?;
                grown.len += s;
                *l = grown;
                l
            }
            Some(l) => {
                l.k.slice_set(&k, 2, l.len)?;
                l.v.slice_set(&v, 2, l.len)?;
                l.len += s;
                l
            }
        };
        let (k, v) = entry.filled()?;
        Ok((k.to_dtype(compute)?, v.to_dtype(compute)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Appending chunks (across the buffers' growth) gives exactly the concatenation, in the
    /// stored dtype when one is set, and `len`/`bytes` count the filled positions.
    #[test]
    fn append_equals_concatenation_across_growth() {
        let dev = Device::Cpu;
        for dtype in [None, Some(DType::F16)] {
            let mut c = KvCache::with_dtype(2, dtype);
            let (mut all_k, mut all_v) = (Vec::new(), Vec::new());
            // a prompt, then single steps past the first capacity, then a chunk past the next
            let sizes: Vec<usize> = std::iter::once(5)
                .chain(std::iter::repeat_n(1, HEADROOM + 3))
                .chain(std::iter::once(300))
                .collect();
            for (i, &s) in sizes.iter().enumerate() {
                let k = Tensor::rand(-1f32, 1., (2, 3, s, 4), &dev).unwrap();
                let v = Tensor::rand(-1f32, 1., (2, 3, s, 4), &dev).unwrap();
                let (gk, gv) = c.append(1, k.clone(), v.clone()).unwrap();
                let round = |t: Tensor| match dtype {
                    Some(d) => t.to_dtype(d).unwrap().to_dtype(DType::F32).unwrap(),
                    None => t,
                };
                all_k.push(round(k));
                all_v.push(round(v));
                let want_k = Tensor::cat(&all_k, 2).unwrap();
                let want_v = Tensor::cat(&all_v, 2).unwrap();
                assert_eq!(gk.dims(), want_k.dims(), "step {i}");
                assert_eq!(gk.dtype(), DType::F32);
                let diff = |a: &Tensor, b: &Tensor| {
                    (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                assert_eq!(diff(&gk, &want_k), 0.0, "keys at step {i}");
                assert_eq!(diff(&gv, &want_v), 0.0, "values at step {i}");
            }
            let n: usize = sizes.iter().sum();
            // growing past the tensor limit is an error naming the cache, and keeps the cache
            let _limit = crate::budget::scoped(1 << 20);
            let big = Tensor::zeros((2, 3, 40_000, 4), DType::F32, &dev).unwrap();
            let err = c.append(1, big.clone(), big).unwrap_err().to_string();
            assert!(err.contains("KV cache"), "{err}");
            drop(_limit);
            assert_eq!(c.len(), n);
            let elem = dtype.map_or(4, |d| d.size_in_bytes());
            assert_eq!(c.bytes(), 2 * (2 * 3 * n * 4) * elem);
        }
    }
}
