//! Quantized frozen weights: a linear layer's `W` `[out, in]` kept in a GGUF block type
//! (Q4_0 ... Q8_0, Q2_K ... Q6_K), never as an f32 copy: Q4_0/Q4_1/Q8_0 repacked into
//! `super::qgemv`'s panels where its kernels run, the others as a candle `QTensor`.
//!
//! Forward `x @ W^T` with f32 activations, two ways by the number of rows: a prompt or a
//! training batch dequantizes `W` a block of rows at a time into an f32 matmul (the f32 path's
//! products); decoding reads `W` once in its blocks: lqa's panel kernels (`super::qgemv`) for
//! Q4_0/Q4_1/Q8_0 on AVX2 or AVX-512 VNNI up to [`PANEL_MAX_ROWS`] rows (a batch of sequences),
//! else candle's integer kernel for one row where it is vectorised (the K types, see
//! [`EXACT_MIN_ROWS`]). Both quantize the activation row to
//! 8 bits like llama.cpp, but in two 8-bit terms, so that the rounding is ~254 times smaller.
//! Backward gives only the input's gradient `dy @ W` (QLoRA: the frozen base gets none),
//! dequantizing `W` a bounded block of rows at a time.

use super::ops::f32_slice;
use super::qgemv::Panels;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// How a model's linear weights are kept in memory (the `weights` load option).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// Everything dequantized to f32 (or the `dtype` option): today's default.
    #[default]
    F32,
    /// bf16 weights: the same as the `dtype: "bf16"` option.
    Bf16,
    /// Each GGUF tensor of a block projection or the lm_head in its stored block type.
    Native,
    /// Quantize every linear weight to Q8_0 on load.
    Q8_0,
    /// Quantize every linear weight to Q4_K on load.
    Q4K,
}

impl WeightFormat {
    pub const NAMES: &'static str = "f32, bf16, native, q8_0 or q4_k";

    /// Parse the option's value as users write it (`"native"`, `"q8_0"`, `"q4_k"`...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => WeightFormat::F32,
            "bf16" | "bfloat16" => WeightFormat::Bf16,
            "native" => WeightFormat::Native,
            "q8_0" | "q8" => WeightFormat::Q8_0,
            "q4_k" | "q4k" => WeightFormat::Q4K,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Native => "native",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4K => "q4_k",
        }
    }

    /// The block type every linear weight is quantized to on load, if any.
    pub fn quantize_to(self) -> Option<GgmlDType> {
        match self {
            WeightFormat::Q8_0 => Some(GgmlDType::Q8_0),
            WeightFormat::Q4K => Some(GgmlDType::Q4K),
            _ => None,
        }
    }

    /// Are linear weights kept quantized (run by [`QuantWeight`])?
    pub fn is_quantized(self) -> bool {
        matches!(
            self,
            WeightFormat::Native | WeightFormat::Q8_0 | WeightFormat::Q4K
        )
    }
}

/// The block types a quantized weight may have (those common GGUF files use).
pub fn supported(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        t,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// The GGUF spelling of a block type (`Q4_K`), for messages and `info()`.
pub fn type_name(t: GgmlDType) -> &'static str {
    use GgmlDType::*;
    match t {
        F32 => "F32",
        F16 => "F16",
        BF16 => "BF16",
        Q4_0 => "Q4_0",
        Q4_1 => "Q4_1",
        Q5_0 => "Q5_0",
        Q5_1 => "Q5_1",
        Q8_0 => "Q8_0",
        Q8_1 => "Q8_1",
        Q2K => "Q2_K",
        Q3K => "Q3_K",
        Q4K => "Q4_K",
        Q5K => "Q5_K",
        Q6K => "Q6_K",
        Q8K => "Q8_K",
    }
}

/// Activation rows from which `W` is dequantized a block of [`FWD_ROWS`] rows at a time (in
/// parallel) into an f32 matmul, the same arithmetic as the f32 path up to summation order.
/// Below it (decode: one row per sequence) `W` is read once, in its blocks: by lqa's panel
/// kernels (`super::qgemv`: Q4_0, Q4_1, Q8_0), else by candle's integer kernel where it is
/// vectorised ([`simd_dot`]), both on two 8-bit terms of the row. With two rows or more a dequantized block is reused
/// across the rows and the matmul is compute-bound, which is where llama.cpp too hands batches
/// to f32 BLAS.
pub const EXACT_MIN_ROWS: usize = 2;

/// Activation rows up to which a weight kept in panels takes lqa's integer kernels
/// (`super::qgemv`, each panel read once for all rows) instead of the f32 path: a batch of
/// decoding sequences. Measured (`quant_path_timing`, an Intel Xeon with AVX-512 VNNI, 2
/// threads) at 16 rows: 0.45 ms against 0.80 for a [1536, 576] Q4_1 weight, 8.4 ms against 37
/// for the [49152, 576] Q8_0 lm_head.
pub const PANEL_MAX_ROWS: usize = 16;

/// Does candle vectorise this type's integer dot product (x86 AVX2, aarch64 NEON)? Q4_1, Q5_0
/// and Q5_1 run a scalar loop there, slower than dequantizing into an f32 matrix-vector product
/// (measured on a [1536, 576] Q4_1 weight, one row: 6.2 ms against 0.8 ms, 2 cores), so one row
/// of those takes the f32 path too.
pub fn simd_dot(t: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(t, Q4_0 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K)
}

/// Rows of a weight dequantized per task in the f32 forward (64 rows of a
/// 14336-wide weight is 3.5 MiB per thread).
const FWD_ROWS: usize = 64;

/// Rows of a weight dequantized at a time in the backward pass (a bounded f32 scratch:
/// 256 rows of a 14336-wide weight is 14 MiB).
const GRAD_ROWS: usize = 256;

/// A frozen weight `[out, in]` (`[n, k]`) in a block type, on the CPU. Cloning shares it.
#[derive(Clone)]
pub struct QuantWeight {
    store: Store,
    n: usize,
    k: usize,
}

/// Where a quantized weight's blocks live.
#[derive(Clone)]
enum Store {
    /// ggml's row-major blocks, as the file holds them (types and CPUs without lqa's kernels).
    Blocks(Arc<QTensor>),
    /// The same bytes repacked for lqa's matrix-vector kernels (`super::qgemv`).
    Panels(Arc<Panels>),
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "QuantWeight[{}; {}, {}]",
            type_name(self.dtype()),
            self.n,
            self.k
        )
    }
}

impl QuantWeight {
    /// Keep a quantized tensor `[out, in]` (`name` is for errors).
    pub fn new(q: QTensor, name: &str) -> Result<Self> {
        let (n, k) = q.shape().dims2().map_err(|_| {
            candle_core::Error::Msg(format!("tensor `{name}`: {:?} is not a matrix", q.shape()))
        })?;
        if !supported(q.dtype()) {
            candle_core::bail!(
                "tensor `{name}` is {}, which lqa cannot keep quantized (supported: Q4_0, Q4_1, \
                 Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
                type_name(q.dtype())
            );
        }
        if !q.device().is_cpu() {
            candle_core::bail!("tensor `{name}`: quantized weights live on the CPU");
        }
        Self::keep(q, n, k)
    }

    /// A weight `[n, k]` of type `ty` from ggml's row-major blocks (a GGUF tensor's bytes, e.g.
    /// memory-mapped), row `i` taken from row `from[i]` when given: packed straight into panels
    /// where lqa's kernels run the type, else copied into a `QTensor`.
    pub fn from_blocks(
        ty: GgmlDType,
        blocks: &[u8],
        (n, k): (usize, usize),
        from: Option<&[usize]>,
        name: &str,
    ) -> Result<Self> {
        if super::qgemv::supported(ty) {
            let p = Panels::pack_rows(ty, blocks, n, k, from)
                .map_err(|e| candle_core::Error::Msg(format!("tensor `{name}`: {e}")))?;
            return Ok(QuantWeight {
                store: Store::Panels(Arc::new(p)),
                n,
                k,
            });
        }
        let w = Self::new(Self::from_bytes(blocks, ty, n, k)?, name)?;
        match from {
            Some(f) => w.permute_rows(f),
            None => Ok(w),
        }
    }

    /// Keep `q`'s blocks: as panels where lqa's kernels run this type, else as they are.
    fn keep(q: QTensor, n: usize, k: usize) -> Result<Self> {
        let store = if super::qgemv::supported(q.dtype()) {
            Store::Panels(Arc::new(Panels::pack(q.dtype(), &q.data()?, n, k)?))
        } else {
            Store::Blocks(Arc::new(q))
        };
        Ok(QuantWeight { store, n, k })
    }

    /// Quantize an f32 (or bf16/f16) weight `[out, in]` to `ty`; a row length that is not a
    /// multiple of the type's block size is an error naming the tensor.
    pub fn quantize(w: &Tensor, ty: GgmlDType, name: &str) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let bs = ty.block_size();
        if !k.is_multiple_of(bs) {
            candle_core::bail!(
                "tensor `{name}` [{n}, {k}] cannot be quantized to {}: its rows ({k}) are not a \
                 multiple of the block size {bs}",
                type_name(ty)
            );
        }
        let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        Self::new(QTensor::quantize(&w, ty)?, name)
    }

    /// Output features (rows of `W`).
    pub fn n(&self) -> usize {
        self.n
    }
    /// Input features (columns of `W`).
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn dtype(&self) -> GgmlDType {
        match &self.store {
            Store::Blocks(q) => q.dtype(),
            Store::Panels(p) => p.dtype(),
        }
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Blocks(q) => q.storage_size_in_bytes(),
            Store::Panels(p) => p.bytes(),
        }
    }
    /// Do the two share their blocks (a tied embedding and lm_head)?
    pub fn same(&self, other: &QuantWeight) -> bool {
        match (&self.store, &other.store) {
            (Store::Blocks(a), Store::Blocks(b)) => Arc::ptr_eq(a, b),
            (Store::Panels(a), Store::Panels(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
    /// Are the blocks repacked for lqa's matrix-vector kernels?
    pub fn is_panels(&self) -> bool {
        matches!(self.store, Store::Panels(_))
    }

    /// Rows `[r0, r1)` as ggml's row-major blocks (borrowed where the weight keeps them so).
    pub fn blocks(&self, r0: usize, r1: usize) -> Result<Cow<'_, [u8]>> {
        if r0 > r1 || r1 > self.n {
            candle_core::bail!("rows {r0}..{r1} of a {self:?}");
        }
        Ok(match &self.store {
            Store::Blocks(q) => {
                let rb = self.row_bytes();
                match q.data()? {
                    Cow::Borrowed(d) => Cow::Borrowed(&d[r0 * rb..r1 * rb]),
                    Cow::Owned(d) => Cow::Owned(d[r0 * rb..r1 * rb].to_vec()),
                }
            }
            Store::Panels(p) => Cow::Owned(p.unpack_rows(r0, r1)),
        })
    }

    /// Rows `ids` dequantized, `[ids.len(), k]` (an embedding lookup).
    pub fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.k);
        for &i in ids {
            let i = i as usize;
            if i >= self.n {
                candle_core::bail!("token id {i} is outside the embedding table of {}", self.n);
            }
            out.extend(self.dequantize_rows(i, i + 1)?);
        }
        Tensor::from_vec(out, (ids.len(), self.k), &Device::Cpu)
    }

    /// Bytes of one row (a whole number of blocks).
    fn row_bytes(&self) -> usize {
        self.k / self.dtype().block_size() * self.dtype().type_size()
    }

    /// A weight of `rows` rows from raw block bytes. The bytes are copied into block-aligned
    /// storage by candle.
    fn from_bytes(bytes: &[u8], ty: GgmlDType, rows: usize, k: usize) -> Result<QTensor> {
        QTensor::new(
            QStorage::from_data(Cow::Borrowed(bytes), &Device::Cpu, ty)?,
            (rows, k),
        )
    }

    /// Rows `[at, at + rows)` (a fused projection's part): exact, whole rows of blocks.
    pub fn rows(&self, at: usize, rows: usize) -> Result<Self> {
        if at + rows > self.n {
            candle_core::bail!("rows {at}..{} of a {self:?}", at + rows);
        }
        let q = Self::from_bytes(&self.blocks(at, at + rows)?, self.dtype(), rows, self.k)?;
        Self::keep(q, rows, self.k)
    }

    /// The weight with its rows reordered: row `i` of the result is row `from[i]` of this one
    /// (exact: rows are moved as whole blocks).
    pub fn permute_rows(&self, from: &[usize]) -> Result<Self> {
        if from.len() != self.n || from.iter().any(|&r| r >= self.n) {
            candle_core::bail!("a bad row permutation of a {self:?}");
        }
        let rb = self.row_bytes();
        let data = self.blocks(0, self.n)?;
        // u64 words so that the buffer is aligned for every block type
        let mut words = vec![0u64; (self.n * rb).div_ceil(8)];
        // SAFETY: `words` holds at least n * rb bytes, initialised, and u8 has no alignment.
        let out =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, self.n * rb) };
        for (i, &r) in from.iter().enumerate() {
            out[i * rb..(i + 1) * rb].copy_from_slice(&data[r * rb..(r + 1) * rb]);
        }
        let q = Self::from_bytes(out, self.dtype(), self.n, self.k)?;
        Self::keep(q, self.n, self.k)
    }

    /// The whole weight dequantized, `[n, k]` f32 (a copy; for callers that need it).
    pub fn dequantize(&self) -> Result<Tensor> {
        match &self.store {
            Store::Blocks(q) => q.dequantize(&Device::Cpu),
            Store::Panels(_) => Tensor::from_vec(
                self.dequantize_rows(0, self.n)?,
                (self.n, self.k),
                &Device::Cpu,
            ),
        }
    }

    /// Rows `[r0, r1)` dequantized, row-major `[r1 - r0, k]`.
    pub fn dequantize_rows(&self, r0: usize, r1: usize) -> Result<Vec<f32>> {
        let data = self.blocks(r0, r1)?;
        if super::qgemv::supported(self.dtype()) {
            let mut out = vec![0f32; (r1 - r0) * self.k];
            super::qgemv::dequantize(self.dtype(), &data, &mut out)?;
            return Ok(out);
        }
        let blocks = self.dtype().from_data(Cow::Borrowed(&data[..]));
        match blocks.dequantize((r1 - r0) * self.k)? {
            CpuStorage::F32(v) => Ok(v),
            _ => candle_core::bail!("dequantize gave no f32"),
        }
    }

    /// Rows `[r0, r1)` dequantized for a matmul (`r0` a multiple of 16): `(w, rs, ks)` with row
    /// `r0 + i`, column `c` at `w[i rs + c ks]`, row-major from blocks, k-major from panels
    /// (their lanes are rows). The same values either way.
    fn dequantize_tile(&self, r0: usize, r1: usize) -> Result<(Vec<f32>, usize, usize)> {
        match &self.store {
            Store::Panels(p) => {
                let (w, ld) = p.dequantize_rows_t(r0, r1)?;
                Ok((w, 1, ld))
            }
            Store::Blocks(_) => Ok((self.dequantize_rows(r0, r1)?, self.k, 1)),
        }
    }

    /// `x @ W^T` for a few rows `x` `[m, k]`, each row a matrix-vector product straight from
    /// the panels, on two 8-bit terms of the row (`super::qgemv`; Q4_0, Q4_1, Q8_0 on AVX2 or
    /// AVX-512 VNNI). Returns `[m, n]`.
    pub fn matmul_t_gemv(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k {
            candle_core::bail!("quant-matmul: x has {} values, not [{m}, {k}]", x.len());
        }
        let Store::Panels(p) = &self.store else {
            candle_core::bail!("quant-matmul: {self:?} is not kept in panels");
        };
        let mut y = vec![0f32; m * n];
        p.gemm(x, m, &mut y)?;
        Ok(y)
    }

    /// The panels, for the kernels' tests and benchmarks.
    pub fn panels(&self) -> Option<&Panels> {
        match &self.store {
            Store::Panels(p) => Some(p),
            Store::Blocks(_) => None,
        }
    }

    /// `x @ W^T` for a few rows `x` `[m, k]` by candle's integer kernel, activations in two
    /// 8-bit terms: `x^ = q8(x)` and `r^ = q8(x - x^)` (the vec-dot type's blocks), run as
    /// `2m` rows of one matmul (the kernel reads each weight block once for the row tile) and
    /// summed. The activation rounding error drops from `max|x| / 254` per block to
    /// `max|x - x^| / 254 <= max|x| / 254^2`. Returns `[m, n]`.
    pub fn matmul_t_split(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        use candle_core::quantized::k_quants::*;
        use GgmlDType as D;
        let (n, k) = (self.n, self.k);
        // ggml's blocks in candle's aligned storage
        let q = match &self.store {
            Store::Blocks(q) => q.clone(),
            Store::Panels(_) => {
                Arc::new(Self::from_bytes(&self.blocks(0, n)?, self.dtype(), n, k)?)
            }
        };
        let data = q.data()?;
        match self.dtype() {
            D::Q4_0 => split_matmul::<BlockQ4_0>(&data, x, m, k, n),
            D::Q4_1 => split_matmul::<BlockQ4_1>(&data, x, m, k, n),
            D::Q5_0 => split_matmul::<BlockQ5_0>(&data, x, m, k, n),
            D::Q5_1 => split_matmul::<BlockQ5_1>(&data, x, m, k, n),
            D::Q8_0 => split_matmul::<BlockQ8_0>(&data, x, m, k, n),
            D::Q2K => split_matmul::<BlockQ2K>(&data, x, m, k, n),
            D::Q3K => split_matmul::<BlockQ3K>(&data, x, m, k, n),
            D::Q4K => split_matmul::<BlockQ4K>(&data, x, m, k, n),
            D::Q5K => split_matmul::<BlockQ5K>(&data, x, m, k, n),
            D::Q6K => split_matmul::<BlockQ6K>(&data, x, m, k, n),
            other => candle_core::bail!("quant-matmul: {} is not kept quantized", type_name(other)),
        }
    }

    /// `x @ W^T` for `x` `[m, k]` (row-major) with f32 activations: blocks of [`FWD_ROWS`]
    /// rows of `W` dequantized in parallel, each into its own f32 matmul. Returns `[m, n]`.
    pub fn matmul_t_f32(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let (n, k) = (self.n, self.k);
        if x.len() != m * k {
            candle_core::bail!("quant-matmul: x has {} values, not [{m}, {k}]", x.len());
        }
        // [m, n]
        let mut y = vec![0f32; m * n];
        let out = super::packed::Shared(y.as_mut_ptr());
        let tasks = n.div_ceil(FWD_ROWS);
        crate::threads::install(|| {
            (0..tasks).into_par_iter().try_for_each(|t| -> Result<()> {
                let (r0, r1) = (t * FWD_ROWS, ((t + 1) * FWD_ROWS).min(n));
                // rows r0..r1 of W, row i column c at wc[i rs + c ks]
                let (wc, rs, ks) = self.dequantize_tile(r0, r1)?;
                // SAFETY: x is [m, k] row-major, wc^T [k, r1 - r0] is read through wc's
                // strides (rs, ks), y is [m, n] row-major and this task writes only its
                // columns r0..r1.
                unsafe {
                    gemm::gemm(
                        m,
                        r1 - r0,
                        k,
                        out.at(r0),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        wc.as_ptr(),
                        rs as isize,
                        ks as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                Ok(())
            })
        })?;
        Ok(y)
    }

    /// `x @ W^T` for `x` `[m, k]` f32 on the CPU; differentiable in `x` only.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            candle_core::bail!(
                "quantized weights take f32 activations on the CPU, got {:?} on {:?}",
                x.dtype(),
                x.device()
            );
        }
        x.contiguous()?.apply_op1(QuantMatmul(self.clone()))
    }
}

/// `x @ W^T` with a quantized frozen `W`; backward gives the gradient of `x` only.
pub(crate) struct QuantMatmul(pub(crate) QuantWeight);

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quant-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        if k != self.0.k {
            candle_core::bail!("quant-matmul: x is [{m}, {k}] but W is {:?}", self.0);
        }
        let x = f32_slice(storage, layout, "quant-matmul")?;
        let ty = self.0.dtype();
        let y = if m <= PANEL_MAX_ROWS && self.0.is_panels() {
            self.0.matmul_t_gemv(x, m)?
        } else if m < EXACT_MIN_ROWS && simd_dot(ty) {
            self.0.matmul_t_split(x, m)?
        } else {
            self.0.matmul_t_f32(x, m)?
        };
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res
                .contiguous()?
                .apply_op1_no_bwd(&QuantMatmulGrad(self.0.clone()))?,
        ))
    }
}

/// `dy @ W` with a quantized `W`: the input gradient of [`QuantMatmul`], in f32, `W`
/// dequantized [`GRAD_ROWS`] rows at a time and accumulated.
struct QuantMatmulGrad(QuantWeight);

impl CustomOp1 for QuantMatmulGrad {
    fn name(&self) -> &'static str {
        "quant-matmul-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n) = layout.shape().dims2()?;
        let w = &self.0;
        if n != w.n {
            candle_core::bail!("quant-matmul-grad: dy is [{m}, {n}] but W is {w:?}");
        }
        let k = w.k;
        // [m, n]
        let dy = f32_slice(storage, layout, "quant-matmul-grad")?;
        // [m, k]
        let mut dx = vec![0f32; m * k];
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + GRAD_ROWS).min(n);
            // rows r0..r1 of W, row i column c at wc[i rs + c ks]
            let (wc, rs, ks) = w.dequantize_tile(r0, r1)?;
            // SAFETY: dy is [m, n] row-major (columns r0..r1 read), wc is [r1 - r0, k]
            // through its strides (rs, ks), dx is [m, k] row-major;
            // dx = 1 * dx + 1 * dy[:, r0..r1] @ wc.
            unsafe {
                gemm::gemm(
                    m,
                    k,
                    r1 - r0,
                    dx.as_mut_ptr(),
                    1,
                    k as isize,
                    r0 > 0,
                    dy.as_ptr().add(r0),
                    1,
                    n as isize,
                    wc.as_ptr(),
                    ks as isize,
                    rs as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(crate::threads::num_threads()),
                );
            }
            r0 = r1;
        }
        Ok((CpuStorage::F32(dx), Shape::from((m, k))))
    }
}

/// [`QuantWeight::matmul_t_split`] for the block type `T` of `w` (the weight's raw blocks).
fn split_matmul<T: candle_core::quantized::k_quants::GgmlType>(
    w: &[u8],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Result<Vec<f32>> {
    use candle_core::quantized::k_quants::GgmlType;
    let size = std::mem::size_of::<T>();
    if w.len() != n * (k / T::BLCK_SIZE) * size
        || !(w.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        candle_core::bail!(
            "quant-matmul: the weight's blocks are not [{n}, {k}] of {:?}",
            T::DTYPE
        );
    }
    // SAFETY: `w` is the QTensor's storage, a `Vec<T>` of n * k / BLCK_SIZE blocks (length and
    // alignment checked above); the block types are plain integers and halfs.
    let w: &[T] = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const T, w.len() / size) };
    type V<T> = <T as GgmlType>::VecDotType;
    let kb = k / V::<T>::BLCK_SIZE;
    // [2m, k]: the rows of x, then their residuals after the kernel's own 8-bit rounding
    let mut lhs = vec![0f32; 2 * m * k];
    lhs[..m * k].copy_from_slice(x);
    let mut blocks = vec![V::<T>::zeros(); kb];
    let mut deq = vec![0f32; k];
    for i in 0..m {
        let xi = &x[i * k..(i + 1) * k];
        V::<T>::from_float(xi, &mut blocks);
        V::<T>::to_float(&blocks, &mut deq);
        for ((r, a), b) in lhs[(m + i) * k..(m + i + 1) * k]
            .iter_mut()
            .zip(xi)
            .zip(&deq)
        {
            *r = a - b;
        }
    }
    // [2m, n]
    let mut dst = vec![0f32; 2 * m * n];
    candle_core::quantized::k_quants::matmul((2 * m, k, n), &lhs, w, &mut dst)?;
    let (hi, lo) = dst.split_at_mut(m * n);
    for (a, b) in hi.iter_mut().zip(lo.iter()) {
        *a += b;
    }
    dst.truncate(m * n);
    Ok(dst)
}
