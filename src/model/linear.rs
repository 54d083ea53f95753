//! The one linear layer type of the model: a frozen weight, an optional bias, and the slot where
//! a LoRA adapter plugs in (the only place adapters touch the model; the model code does not
//! change when LoRA is on).
//!
//! The frozen `x @ W^T` runs as a custom op whose backward returns only the input's gradient:
//! candle's matmul backward would also compute the (unused) gradient of every frozen weight, a
//! third of a training step's work. f32 block projections on x86 CPUs are packed once for
//! gemm's microkernels (`super::packed`), in inference and training alike.

use super::lora_linear::{Grads, LoraLinear};
use super::ops::{cpu_kernels, f32_slice};
use super::packed::{self, PackedWeight, Shared};
use super::quant::{self, QuantWeight};
use crate::rng::{fnv1a, splitmix, spread, FNV_OFFSET};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, Var};
use std::sync::Arc;

/// A LoRA adapter on one linear layer: `y += dropout(x) @ A^T @ B^T * scale`.
#[derive(Clone, Debug)]
pub struct LoraWeights {
    /// `[r, in]`
    pub a: Var,
    /// `[out, r]`
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// How a frozen weight is stored.
#[derive(Clone, Debug)]
enum Stored {
    /// `[out, in]` as in HF checkpoints (the lm_head, which may share its storage with the
    /// embedding table).
    Hf(Tensor),
    /// `[in, out]` (W^T, contiguous): gemm then reads the right-hand side row by row and skips
    /// packing it (measured 5-10 % faster per matmul, 60 % for the narrow k/v projections).
    /// Block projections where packing is not available (bf16, GPU, other CPUs).
    Transposed(Tensor),
    /// f32 block projections on x86 CPUs: packed once for gemm's microkernels.
    Packed(PackedWeight),
    /// `[out, in]` in a GGUF block type, run by `super::quant`'s kernels (f32 activations),
    /// never held as f32.
    Quant(QuantWeight),
}

#[derive(Clone, Debug)]
pub struct Linear {
    w: Stored,
    pub bias: Option<Tensor>,
    pub lora: Option<Arc<LoraWeights>>,
    /// A stable id (from the module name) that seeds this layer's dropout masks.
    pub uid: u64,
}

/// Dropout for LoRA inputs in training: a seed per forward, masks derived per layer.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub seed: u64,
}

/// A stable 64-bit id of a module name (FNV-1a).
pub fn name_uid(name: &str) -> u64 {
    fnv1a(FNV_OFFSET, name.as_bytes())
}

impl Dropout {
    /// Elements per independently seeded block of a mask (masks are drawn in parallel).
    pub(super) const BLOCK: usize = 1 << 14;

    /// An inverted-dropout mask of `shape`: keep/(1-p) or 0, deterministic in (seed, uid).
    /// Each block of [`Dropout::BLOCK`] elements has its own generator, so the mask does not
    /// depend on the thread count; each 64-bit draw decides four elements (16-bit thresholds,
    /// p is rounded to a multiple of 2^-16).
    fn mask(&self, uid: u64, shape: &Shape, p: f64, x: &Tensor) -> Result<Tensor> {
        let n = shape.elem_count();
        let base = splitmix(self.seed ^ splitmix(uid));
        if !x.device().is_cpu() {
            // On a GPU the mask is drawn there (its generator seeded the same way), rather than
            // drawn here and copied over for every layer of every step: deterministic in (seed,
            // uid) on that device, but not the CPU's masks.
            let dev = x.device();
            dev.set_seed(base)?;
            let u = Tensor::rand(0f32, 1f32, shape, dev)?;
            return u
                .ge(p as f32)?
                .to_dtype(x.dtype())?
                .affine(1.0 / (1.0 - p), 0.0);
        }
        let mut v = vec![0f32; n];
        self.fill(uid, p, &mut v);
        Tensor::from_vec(v, shape, x.device())?.to_dtype(x.dtype())
    }

    /// The CPU mask of [`Dropout::mask`] written into `out` (its length is the shape's element
    /// count): the same values for the same (seed, uid, p).
    pub(super) fn fill(&self, uid: u64, p: f64, out: &mut [f32]) {
        use rayon::prelude::*;
        out.par_chunks_mut(Self::BLOCK)
            .enumerate()
            .for_each(|(bi, chunk)| self.fill_block(uid, p, bi, chunk));
    }

    /// Block `bi` of that mask (elements `bi * BLOCK..`, `out` at most [`Dropout::BLOCK`]
    /// long), so that a pass over a tensor can draw its mask block by block instead of
    /// keeping it.
    pub(super) fn fill_block(&self, uid: u64, p: f64, bi: usize, out: &mut [f32]) {
        let base = splitmix(self.seed ^ splitmix(uid));
        let keep = 1.0 / (1.0 - p) as f32;
        let thresh = (p * 65536.0).round() as u64;
        let mut s = splitmix(base ^ spread(bi as u64));
        for quad in out.chunks_mut(4) {
            s = splitmix(s);
            for (j, e) in quad.iter_mut().enumerate() {
                let r = (s >> (16 * j)) & 0xFFFF;
                *e = if r < thresh { 0.0 } else { keep };
            }
        }
    }
}

/// `x @ W^T` with a frozen `W` (`[out, in]`, or `[in, out]` when `transposed`): backward
/// gives the gradient of `x` only.
struct FrozenMatmul {
    w: Tensor,
    transposed: bool,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, k2) = if self.transposed {
            let (k2, n) = self.w.dims2()?;
            (n, k2)
        } else {
            self.w.dims2()?
        };
        if k != k2 {
            candle_core::bail!("frozen-matmul: x is [{m}, {k}] but W is [{n}, {k2}]");
        }
        let x = f32_slice(storage, layout, "frozen-matmul")?;
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("frozen-matmul: W must be a CPU tensor");
        };
        let w = f32_slice(ws, wl, "frozen-matmul (W)")?;
        let mut dst = vec![0f32; m * n];
        // W^T [k, n]: row stride, column stride
        let (rhs_rs, rhs_cs) = if self.transposed {
            (n as isize, 1)
        } else {
            (1, k as isize)
        };
        // A few rows against a wide HF-layout weight (the lm_head in decoding, or on the last
        // position of a prefill) is a matrix-vector product that gemm runs on one thread and
        // that streams the whole weight: split the outputs across the threads instead.
        let parts = if !self.transposed && m <= 4 && m * n * k >= 1 << 20 {
            crate::threads::num_threads()
        } else {
            1
        };
        let out = Shared(dst.as_mut_ptr());
        let part = |p: usize| {
            let (c0, c1) = (n * p / parts, n * (p + 1) / parts);
            let par = if parts == 1 {
                gemm::Parallelism::Rayon(crate::threads::num_threads())
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the slices have exactly the sizes the strides describe: x [m, k]
            // row-major, W^T [k, n] (stored [k, n] row-major, or W [n, k] row-major), dst
            // [m, n] row-major; this part reads columns c0..c1 of W^T and writes columns
            // c0..c1 of dst, which no other part writes.
            unsafe {
                gemm::gemm(
                    m,
                    c1 - c0,
                    k,
                    out.at(c0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr().offset(c0 as isize * rhs_cs),
                    rhs_cs,
                    rhs_rs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        };
        crate::threads::on_threads(parts, part);
        Ok((CpuStorage::F32(dst), Shape::from((m, n))))
    }

    /// On CUDA: candle's own matmul of the storages (cuBLAS), so that training on a GPU also
    /// skips the frozen weights' gradients.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = layout.shape().dims2()?;
        // W^T [k, n] as a view
        let wt = if self.transposed {
            self.w.clone()
        } else {
            self.w.t()?
        };
        let (k2, n) = wt.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: x is [{m}, {k}] but W^T is [{k2}, {n}]");
        }
        let (ws, wl) = wt.storage_and_layout();
        let candle_core::Storage::Cuda(ws) = &*ws else {
            candle_core::bail!("frozen-matmul: W must be on the GPU with x");
        };
        let out = storage.matmul(ws, (1, m, n, k), layout, wl)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let w = if self.transposed {
            self.w.t()?
        } else {
            self.w.clone()
        };
        Ok(Some(grad_res.matmul(&w)?))
    }
}

/// Store an HF-layout weight `[out, in]` for fast matmuls (see [`Stored`]).
fn store(weight: &Tensor) -> Result<Stored> {
    match packed::kernel() {
        Some(kernel) if weight.dtype() == DType::F32 && cpu_kernels(weight.device()) => {
            let (n, k) = weight.dims2()?;
            let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            Ok(Stored::Packed(PackedWeight::pack(&w, n, k, kernel)))
        }
        _ => Ok(Stored::Transposed(weight.t()?.contiguous()?)),
    }
}

/// `x @ W^T` with a packed frozen `W`; backward gives the gradient of `x` only.
struct PackedMatmul(PackedWeight);

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        if k != self.0.k() {
            candle_core::bail!("packed-matmul: x is [{m}, {k}] but W is {:?}", self.0);
        }
        let x = f32_slice(storage, layout, "packed-matmul")?;
        let y = self.0.forward(x, m);
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.n()))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res
                .contiguous()?
                .apply_op1_no_bwd(&PackedMatmulGrad(self.0.clone()))?,
        ))
    }
}

/// `dy @ W` with a packed `W`: the input gradient of [`PackedMatmul`].
struct PackedMatmulGrad(PackedWeight);

impl CustomOp1 for PackedMatmulGrad {
    fn name(&self) -> &'static str {
        "packed-matmul-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n) = layout.shape().dims2()?;
        if n != self.0.n() {
            candle_core::bail!("packed-matmul-grad: dy is [{m}, {n}] but W is {:?}", self.0);
        }
        let dy = f32_slice(storage, layout, "packed-matmul-grad")?;
        let dx = self.0.backward(dy, m);
        Ok((CpuStorage::F32(dx), Shape::from((m, self.0.k()))))
    }
}

impl Linear {
    /// A layer from an HF-layout weight `[out, in]`, kept as it is (shared storage stays
    /// shared).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            w: Stored::Hf(weight),
            bias,
            lora: None,
            uid: 0,
        }
    }

    /// A layer from an HF-layout weight `[out, in]`, stored for fast matmuls: packed for the
    /// CPU microkernels when it is f32 on a CPU that has them, transposed otherwise.
    pub fn new_packed(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Linear {
            w: store(&weight)?,
            bias,
            lora: None,
            uid: 0,
        })
    }

    /// A layer from a quantized weight `[out, in]`: frozen, LoRA adds on top.
    pub fn new_quant(weight: QuantWeight, bias: Option<Tensor>) -> Self {
        Linear {
            w: Stored::Quant(weight),
            bias,
            lora: None,
            uid: 0,
        }
    }

    /// The weight in HF layout `[out, in]` (a transposed view when stored transposed, a copy
    /// when packed, an f32 copy when quantized).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.w {
            Stored::Hf(w) => Ok(w.clone()),
            Stored::Transposed(w) => w.t(),
            Stored::Packed(p) => {
                Tensor::from_vec(p.unpack(), (p.n(), p.k()), &candle_core::Device::Cpu)
            }
            Stored::Quant(q) => q.dequantize(),
        }
    }

    /// The quantized weight, when the layer keeps one.
    pub fn quant(&self) -> Option<&QuantWeight> {
        match &self.w {
            Stored::Quant(q) => Some(q),
            _ => None,
        }
    }

    /// How the weight is stored (`"f32"`, `"bf16"`, `"Q4_1"`...) and the bytes it holds.
    pub fn storage_kind(&self) -> (String, usize) {
        match &self.w {
            Stored::Quant(q) => (quant::type_name(q.dtype()).to_string(), q.bytes()),
            Stored::Packed(p) => ("f32".into(), p.n() * p.k() * 4),
            Stored::Hf(w) | Stored::Transposed(w) => (
                format!("{:?}", w.dtype()).to_lowercase(),
                w.elem_count() * w.dtype().size_in_bytes(),
            ),
        }
    }

    /// Replace the weight with `f(W)`, `W` and the result in HF layout `[out, in]`; the
    /// storage layout is kept (a quantized weight is quantized again to its type, which adds
    /// that type's rounding to `f(W)`).
    pub fn map_weight(&mut self, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<()> {
        let w = f(&self.weight()?)?;
        if w.dims() != [self.out_features(), self.in_features()] {
            candle_core::bail!(
                "a new weight {:?} for a [{}, {}] layer",
                w.dims(),
                self.out_features(),
                self.in_features()
            );
        }
        self.w = match &self.w {
            Stored::Hf(_) => Stored::Hf(w),
            Stored::Transposed(_) | Stored::Packed(_) => store(&w)?,
            Stored::Quant(q) => Stored::Quant(QuantWeight::quantize(
                &w,
                q.dtype(),
                &format!("(re-quantized) {:?}", q),
            )?),
        };
        Ok(())
    }

    pub fn with_uid(mut self, name: &str) -> Self {
        self.uid = name_uid(name);
        self
    }

    pub fn out_features(&self) -> usize {
        match &self.w {
            Stored::Hf(w) => w.dims()[0],
            Stored::Transposed(w) => w.dims()[1],
            Stored::Packed(p) => p.n(),
            Stored::Quant(q) => q.n(),
        }
    }
    pub fn in_features(&self) -> usize {
        match &self.w {
            Stored::Hf(w) => w.dims()[1],
            Stored::Transposed(w) => w.dims()[0],
            Stored::Packed(p) => p.k(),
            Stored::Quant(q) => q.k(),
        }
    }

    /// `x @ W^T + b (+ LoRA)` for `x` of shape `[..., in]`, inference (no dropout).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, None, true)
    }

    /// The same with LoRA dropout when `dropout` is given (training).
    /// The adapter's factors for `x2` `[rows, in]`: `h = drop(x2) A^T` `[rows, r]` and `s B`
    /// `[out, r]`, so that the adapter adds `h (s B)^T`.
    fn lora_factors(
        &self,
        l: &LoraWeights,
        x2: &Tensor,
        dropout: Option<Dropout>,
        grad: bool,
    ) -> Result<(Tensor, Tensor)> {
        let xin = match dropout {
            Some(d) if l.dropout > 0.0 => {
                let m = d.mask(self.uid, x2.shape(), l.dropout, x2)?;
                (x2 * m)?
            }
            _ => x2.clone(),
        };
        // without `grad` (reading, generating) the factors are constants: nothing of the
        // forward is kept for a backward
        let (a, b) = match grad {
            true => (l.a.as_tensor().clone(), l.b.as_tensor().clone()),
            false => (l.a.as_tensor().detach(), l.b.as_tensor().detach()),
        };
        let (a, b) = (a.to_dtype(x2.dtype())?, b.to_dtype(x2.dtype())?);
        Ok((xin.matmul(&a.t()?)?, (b * l.scale)?))
    }

    /// The frozen product `x2 W^T` as the custom op that computes it for f32 activations on the
    /// CPU (packed, quantized, or HF-layout in training), or `None` where `forward_t` takes
    /// another path.
    /// `train`: the product is differentiated (HF-layout and transposed weights then take the
    /// frozen-weight op).
    fn frozen_op(
        &self,
        x2: &Tensor,
        train: bool,
    ) -> Result<Option<Box<dyn CustomOp1 + Send + Sync>>> {
        let f32_cpu = x2.dtype() == DType::F32 && x2.device().is_cpu();
        Ok(match &self.w {
            Stored::Quant(q) if f32_cpu => Some(Box::new(quant::QuantMatmul(q.clone()))),
            Stored::Packed(p) if f32_cpu => Some(Box::new(PackedMatmul(p.clone()))),
            // in training (the frozen-weight backward), and for the lm_head always (see
            // FrozenMatmul's split of matrix-vector products)
            Stored::Hf(w) | Stored::Transposed(w)
                if (train || matches!(self.w, Stored::Hf(_)))
                    && f32_cpu
                    && w.dtype() == DType::F32
                    && cpu_kernels(w.device())
                    && cpu_kernels(x2.device()) =>
            {
                Some(Box::new(FrozenMatmul {
                    w: w.contiguous()?,
                    transposed: matches!(self.w, Stored::Transposed(_)),
                }))
            }
            _ => None,
        })
    }

    /// Several linears of one input (a layer's q, k and v; gate and up) in one product, with
    /// one hand-off to the threads instead of one per weight, where every weight is packed f32
    /// or in lqa's quantized panels (decoding: up to `PANEL_MAX_ROWS` rows), none carries an
    /// adapter and nothing is differentiated; the same values as each `forward`. `None`
    /// otherwise: the caller runs each `forward_t`.
    pub fn forward_many<const N: usize>(
        ls: [&Linear; N],
        x: &Tensor,
    ) -> Result<Option<[Tensor; N]>> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        if x.dtype() != DType::F32 || !x.device().is_cpu() || x.track_op() || rows == 0 {
            return Ok(None);
        }
        let plain = |l: &Linear| l.lora.is_none();
        let packed: Vec<&PackedWeight> = ls
            .iter()
            .filter_map(|l| match &l.w {
                Stored::Packed(p) if plain(l) && p.k() == k => Some(p),
                _ => None,
            })
            .collect();
        let panels: Vec<&super::qgemv::Panels> = ls
            .iter()
            .filter_map(|l| match &l.w {
                Stored::Quant(q) if plain(l) && q.k() == k && rows <= quant::PANEL_MAX_ROWS => {
                    q.panels()
                }
                _ => None,
            })
            .collect();
        let x2 = x.reshape((rows, k))?.contiguous()?;
        let ys: Vec<Vec<f32>> = if packed.len() == N {
            let xs = x2.flatten_all()?.to_vec1::<f32>()?;
            PackedWeight::forward_many(&packed, &xs, rows)
        } else if panels.len() == N {
            let xs = x2.flatten_all()?.to_vec1::<f32>()?;
            let mut ys: Vec<Vec<f32>> = ls
                .iter()
                .map(|l| vec![0f32; rows * l.out_features()])
                .collect();
            let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
            super::qgemv::gemm_many(&panels, &xs, rows, &mut outs)?;
            ys
        } else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(N);
        for (l, y) in ls.iter().zip(ys) {
            let mut od = dims.clone();
            if let Some(last) = od.last_mut() {
                *last = l.out_features();
            }
            let mut t = Tensor::from_vec(y, od, x.device())?;
            if let Some(b) = &l.bias {
                t = t.broadcast_add(b)?;
            }
            out.push(t);
        }
        Ok(out.try_into().ok())
    }

    /// `x W^T (+ bias) (+ the adapter)`, with LoRA dropout when `dropout` is given; `grad`:
    /// track the adapter's factors for a backward (training), else they are constants.
    pub fn forward_t(&self, x: &Tensor, dropout: Option<Dropout>, grad: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let x2 = x.reshape((rows, k))?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.out_features();
        }
        let mut y = match (self.frozen_op(&x2, x2.track_op())?, &self.lora) {
            // with an adapter, `x W^T + s drop(x) A^T B^T` as one op (see `super::lora_linear`)
            (Some(base), Some(l)) if l.a.dtype() == DType::F32 && l.b.dtype() == DType::F32 => {
                let (a, b) = match grad {
                    true => (l.a.as_tensor().clone(), l.b.as_tensor().clone()),
                    false => (l.a.as_tensor().detach(), l.b.as_tensor().detach()),
                };
                let op = self.adapter_op(base, l, dropout);
                let mut y = x2
                    .contiguous()?
                    .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
                if let Some(b) = &self.bias {
                    y = y.broadcast_add(b)?;
                }
                return y.reshape(out_dims);
            }
            (Some(base), _) => x2.contiguous()?.apply_op1_arc(Arc::new(base))?,
            (None, _) => self.forward_other(&x2)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let (h, bs) = self.lora_factors(l, &x2, dropout, grad)?;
            y = (y + h.matmul(&bs.t()?)?)?;
        }
        y.reshape(out_dims)
    }

    /// The adapted product's op (`super::lora_linear`) over the frozen product `base`, with this
    /// forward's dropout.
    fn adapter_op(
        &self,
        base: Box<dyn CustomOp1 + Send + Sync>,
        l: &LoraWeights,
        dropout: Option<Dropout>,
    ) -> LoraLinear {
        LoraLinear {
            base,
            scale: l.scale as f32,
            drop: dropout
                .filter(|_| l.dropout > 0.0)
                .map(|d| (d, self.uid, l.dropout)),
            h: Default::default(),
        }
    }

    /// The layer's forward and backward as functions of untracked tensors `[rows, in]`, with
    /// the adapter's dropout of this forward, for a node that holds a whole block
    /// (`super::block_node`): f32 activations on the CPU with an f32 adapter, else `None`.
    pub(super) fn fns(&self, x2: &Tensor, dropout: Option<Dropout>) -> Result<Option<LayerFns>> {
        let Some(base) = self.frozen_op(x2, true)? else {
            return Ok(None);
        };
        let kind = match &self.lora {
            None => LayerKind::Frozen(base),
            Some(l) if l.a.dtype() == DType::F32 && l.b.dtype() == DType::F32 => {
                LayerKind::Adapted {
                    op: self.adapter_op(base, l, dropout),
                    a: l.a.as_tensor().detach().contiguous()?,
                    b: l.b.as_tensor().detach().contiguous()?,
                }
            }
            Some(_) => return Ok(None),
        };
        Ok(Some(LayerFns {
            kind,
            bias: self.bias.clone(),
        }))
    }

    /// `x2 W^T` where [`Self::frozen_op`] has no custom op: other dtypes and devices.
    fn forward_other(&self, x2: &Tensor) -> Result<Tensor> {
        Ok(match &self.w {
            // not f32 activations on the CPU: an error naming the layer's type
            Stored::Quant(q) => q.matmul_t(x2)?,
            Stored::Packed(_) => x2.matmul(
                &self
                    .weight()?
                    .t()?
                    .to_dtype(x2.dtype())?
                    .to_device(x2.device())?,
            )?,
            // training on a GPU: the same frozen-weight backward
            Stored::Hf(w) | Stored::Transposed(w)
                if cfg!(feature = "cuda")
                    && x2.track_op()
                    && x2.device().is_cuda()
                    && w.device().same_device(x2.device())
                    && w.dtype() == x2.dtype() =>
            {
                x2.contiguous()?.apply_op1(FrozenMatmul {
                    w: w.contiguous()?,
                    transposed: matches!(self.w, Stored::Transposed(_)),
                })?
            }
            Stored::Transposed(w) => x2.matmul(w)?,
            Stored::Hf(w) => x2.matmul(&w.t()?)?,
        })
    }
}

/// A layer as plain functions of untracked CPU f32 tensors ([`Linear::fns`]).
pub(super) struct LayerFns {
    kind: LayerKind,
    bias: Option<Tensor>,
}

enum LayerKind {
    Frozen(Box<dyn CustomOp1 + Send + Sync>),
    Adapted {
        op: LoraLinear,
        /// `[r, in]`, `[out, r]`
        a: Tensor,
        b: Tensor,
    },
}

impl LayerFns {
    /// `x2 W^T + b (+ the adapter)` `[rows, out]` for `x2` `[rows, in]`.
    pub fn forward(&self, x2: &Tensor) -> Result<Tensor> {
        let x2 = x2.contiguous()?;
        let y = match &self.kind {
            LayerKind::Frozen(op) => {
                let (s, l) = x2.storage_and_layout();
                let candle_core::Storage::Cpu(s) = &*s else {
                    candle_core::bail!("linear: not a CPU tensor");
                };
                let (out, shape) = op.cpu_fwd(s, l)?;
                let CpuStorage::F32(v) = out else {
                    candle_core::bail!("linear: the frozen product is not f32");
                };
                Tensor::from_vec(v, shape, x2.device())?
            }
            LayerKind::Adapted { op, a, b } => x2.apply_op3_no_bwd(a, b, op)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// From `dy` `[rows, out]`: `dx` when `need_dx`, and the adapter's `(dA, dB)` when it has
    /// one and `need_factors`.
    pub fn backward(
        &self,
        x2: &Tensor,
        dy: &Tensor,
        need_dx: bool,
        need_factors: bool,
    ) -> Result<Grads> {
        match &self.kind {
            // the frozen ops' backward reads only `dy`
            LayerKind::Frozen(op) => Ok((
                match need_dx {
                    true => op.bwd(x2, dy, dy)?,
                    false => None,
                },
                None,
            )),
            LayerKind::Adapted { op, a, b } => op.grads(x2, a, b, dy, need_dx, need_factors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{rel_diff, t};

    /// The fused adapted linear (f32: `super::lora_linear`) against candle's composition of the
    /// same layer in f64: the output and the gradients of x, A and B, with and without dropout
    /// (the same masks), for an HF-layout and a packed weight.
    #[test]
    fn fused_lora_linear_matches_the_composition_and_its_gradients() {
        // x spans several dropout blocks (of 2^14 values) and a partial one
        let (m, k, n, r) = (701, 48, 40, 4);
        let w = t(&[n, k], 1.0);
        let (a, b) = (t(&[r, k], 2.0), t(&[n, r], 3.0));
        let x = t(&[m, k], 4.0);
        for packed in [false, true] {
            for p in [0.0, 0.3] {
                let run = |dt: DType| {
                    let w = w.to_dtype(dt).unwrap();
                    let mut l = match packed && dt == DType::F32 {
                        true => Linear::new_packed(w, None).unwrap(),
                        false => Linear::new(w, None),
                    }
                    .with_uid("blocks.0.mlp.up");
                    let va = Var::from_tensor(&a.to_dtype(dt).unwrap()).unwrap();
                    let vb = Var::from_tensor(&b.to_dtype(dt).unwrap()).unwrap();
                    l.lora = Some(Arc::new(LoraWeights {
                        a: va.clone(),
                        b: vb.clone(),
                        scale: 2.0,
                        dropout: p,
                    }));
                    let vx = Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
                    let y = l
                        .forward_t(vx.as_tensor(), Some(Dropout { seed: 7 }), true)
                        .unwrap();
                    let c = t(&[m, n], 5.0).to_dtype(dt).unwrap();
                    let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
                    let get = |v: &Var| g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
                    let y = y.to_dtype(DType::F64).unwrap();
                    [y, get(&vx), get(&va), get(&vb)]
                };
                let (f, c) = (run(DType::F32), run(DType::F64));
                for (name, (f, c)) in ["y", "dx", "dA", "dB"].iter().zip(f.iter().zip(&c)) {
                    let r = rel_diff(f, c);
                    assert!(r < 1e-5, "packed {packed}, p {p}: {name} differs by {r}");
                }
            }
        }
    }
}
