//! `Tensor`: candle tensors in scripts.
//!
//! Construction: `tensor(nested_array)` (f32), `zeros(shape)`, `ones(shape)`, `randn(shape, seed)`,
//! `load_tensor(path)`, `load_tensors(path)` (a map). Properties: `shape`, `dtype`, `rank`.
//! Indexing `t[i]` selects along dim 0 and drops it (negative `i` counts from the end);
//! `slice(start, end)` (dim 0), `narrow(dim, start, len)`, `select(dim, i)`, `reshape(shape)`
//! (one `-1` is inferred), `transpose(d1, d2)`. Arithmetic `+ - * /` between tensors
//! (broadcasting) and with numbers on either side, unary `-`. Reductions to numbers: `sum()`,
//! `mean()`, `std()` (population), `max()`, `min()`, `argmax()` (flat index), `norm()`,
//! `dot(t)`, `cosine(t)`, `item()`; to tensors: `sum(dim)`, `mean(dim)`, `norm(dim)`.
//! `topk(k)` gives `[index, value]` pairs of a 1-D tensor. `to_array()`, `to_f32()`,
//! `to_dtype(name)`, `save(path)`, `save_tensors(map, path)`.
//!
//! Other bindings return tensors with [`to_dynamic`] and take them with [`from_dynamic`].

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};

use super::error::{ctx_err, ScriptResult, ToScript};
use super::{arg_usize, atomic_write};
use crate::Error;

/// A candle tensor as the Rhai type `Tensor`.
#[derive(Clone)]
pub struct ScriptTensor(pub Tensor);

/// Wrap a tensor as a script value.
pub fn to_dynamic(t: Tensor) -> Dynamic {
    Dynamic::from(ScriptTensor(t))
}

/// The tensor in a script value, if it holds one.
pub fn from_dynamic(value: &Dynamic) -> Option<Tensor> {
    value.read_lock::<ScriptTensor>().map(|t| t.0.clone())
}

/// The key `save`/`load_tensor` use for a single tensor.
pub const SINGLE_KEY: &str = "tensor";

/// Elements shown per dimension when a tensor is printed.
const PREVIEW: usize = 6;

impl ScriptTensor {
    pub fn dims(&self) -> &[usize] {
        self.0.dims()
    }

    /// `Tensor[2, 3] f32`: how errors name a tensor.
    pub fn describe(&self) -> String {
        format!(
            "Tensor{} {}",
            shape_str(self.dims()),
            self.0.dtype().as_str()
        )
    }

    /// All values, flattened, as f64 (on the CPU).
    pub fn values_f64(&self) -> crate::Result<Vec<f64>> {
        Ok(self
            .0
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f64>()?)
    }

    /// Nested arrays of floats (a number for a rank-0 tensor).
    pub fn to_nested(&self) -> crate::Result<Dynamic> {
        let values = self.values_f64()?;
        Ok(nest(self.dims(), &values))
    }

    fn preview(&self) -> crate::Result<String> {
        let mut t = self.0.clone();
        for (d, &n) in self.dims().iter().enumerate() {
            if n > PREVIEW {
                t = t.narrow(d, 0, PREVIEW)?;
            }
        }
        let values = ScriptTensor(t).values_f64()?;
        let is_int = self.0.dtype().is_int();
        let mut out = String::new();
        write_preview(&mut out, self.dims(), &values, is_int);
        Ok(out)
    }
}

impl fmt::Display for ScriptTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.preview() {
            Ok(p) => write!(f, "{} {p}", self.describe()),
            Err(e) => write!(f, "{} <{e}>", self.describe()),
        }
    }
}

impl fmt::Debug for ScriptTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn shape_str(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// `values` (the first `min(n, PREVIEW)` of every dim, row-major) printed with `...` where
/// `dims` has more.
fn write_preview(out: &mut String, dims: &[usize], values: &[f64], is_int: bool) {
    let Some((&n, rest)) = dims.split_first() else {
        out.push_str(&fmt_num(
            values.first().copied().unwrap_or(f64::NAN),
            is_int,
        ));
        return;
    };
    let shown = n.min(PREVIEW);
    let stride: usize = rest.iter().map(|&d| d.min(PREVIEW)).product();
    out.push('[');
    for i in 0..shown {
        if i > 0 {
            out.push_str(", ");
        }
        write_preview(out, rest, &values[i * stride..(i + 1) * stride], is_int);
    }
    if n > shown {
        out.push_str(", ...");
    }
    out.push(']');
}

fn fmt_num(x: f64, is_int: bool) -> String {
    if is_int {
        return format!("{}", x as i64);
    }
    if !x.is_finite() {
        return format!("{x}").to_lowercase();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e5).contains(&a) {
        return format!("{x:.3e}");
    }
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_string()
    }
}

fn nest(dims: &[usize], values: &[f64]) -> Dynamic {
    match dims.split_first() {
        None => values.first().copied().unwrap_or(f64::NAN).into(),
        Some((&n, rest)) => {
            let stride: usize = rest.iter().product();
            (0..n)
                .map(|i| nest(rest, &values[i * stride..(i + 1) * stride]))
                .collect::<Array>()
                .into()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Argument checks

fn type_name(ctx: &NativeCallContext, value: &Dynamic) -> String {
    ctx.engine().map_type_name(value.type_name()).to_string()
}

/// A shape array: non-negative integers.
fn shape_arg(ctx: &NativeCallContext, shape: &Array) -> ScriptResult<Vec<usize>> {
    shape
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let n = v.as_int().map_err(|_| {
                ctx_err(
                    ctx,
                    format!("shape[{i}] must be an integer, got {}", type_name(ctx, v)),
                )
            })?;
            arg_usize(ctx, &format!("shape[{i}]"), n)
        })
        .collect()
}

/// A dimension of `t`.
fn dim_arg(ctx: &NativeCallContext, t: &ScriptTensor, what: &str, dim: i64) -> ScriptResult<usize> {
    let d = arg_usize(ctx, what, dim)?;
    if d >= t.0.rank() {
        return Err(ctx_err(
            ctx,
            format!(
                "{what} {d} out of range for {} (rank {})",
                t.describe(),
                t.0.rank()
            ),
        ));
    }
    Ok(d)
}

fn not_empty(ctx: &NativeCallContext, t: &ScriptTensor, op: &str) -> ScriptResult<()> {
    if t.0.elem_count() == 0 {
        Err(ctx_err(
            ctx,
            format!("{op} of an empty tensor ({})", t.describe()),
        ))
    } else {
        Ok(())
    }
}

/// Integer tensors become f32 for arithmetic that makes fractions.
fn float(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype().is_int() {
        t.to_dtype(DType::F32)
    } else {
        Ok(t.clone())
    }
}

fn scalar_f64(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .to_scalar::<f64>()
}

// ---------------------------------------------------------------------------------------------
// Construction

fn from_array(ctx: &NativeCallContext, array: &Array) -> ScriptResult<ScriptTensor> {
    // The shape follows the first element at each depth; everything else must match it.
    let mut shape = vec![array.len()];
    let mut first = array.first().cloned();
    while let Some(v) = first {
        match v.read_lock::<Array>() {
            Some(inner) => {
                shape.push(inner.len());
                first = inner.first().cloned();
            }
            None => first = None,
        }
    }
    let mut values = Vec::with_capacity(shape.iter().product());
    flatten(ctx, array, &shape, &mut String::new(), &mut values)?;
    let t = Tensor::from_vec(values, shape, &Device::Cpu).at(ctx)?;
    Ok(ScriptTensor(t))
}

fn flatten(
    ctx: &NativeCallContext,
    array: &Array,
    shape: &[usize],
    at: &mut String,
    out: &mut Vec<f32>,
) -> ScriptResult<()> {
    if array.len() != shape[0] {
        let at = if at.is_empty() {
            "the array"
        } else {
            at.as_str()
        };
        return Err(ctx_err(
            ctx,
            format!(
                "tensor: ragged nested array: {at} has {} elements, expected {}",
                array.len(),
                shape[0]
            ),
        ));
    }
    for (i, v) in array.iter().enumerate() {
        let len = at.len();
        at.push_str(&format!("[{i}]"));
        if shape.len() > 1 {
            match v.read_lock::<Array>() {
                Some(inner) => flatten(ctx, &inner, &shape[1..], at, out)?,
                None => {
                    return Err(ctx_err(
                        ctx,
                        format!(
                            "tensor: ragged nested array: {at} is a {}, expected an array",
                            type_name(ctx, v)
                        ),
                    ))
                }
            }
        } else if let Ok(x) = v.as_float() {
            out.push(x as f32);
        } else if let Ok(x) = v.as_int() {
            out.push(x as f32);
        } else {
            return Err(ctx_err(
                ctx,
                format!("tensor: {at} is a {}, not a number", type_name(ctx, v)),
            ));
        }
        at.truncate(len);
    }
    Ok(())
}

fn filled(ctx: &NativeCallContext, shape: &Array, value: f32) -> ScriptResult<ScriptTensor> {
    let shape = shape_arg(ctx, shape)?;
    let t = Tensor::full(value, shape, &Device::Cpu).at(ctx)?;
    Ok(ScriptTensor(t))
}

/// Standard normal values from a seeded generator (Box-Muller), so that scripts are repeatable.
fn randn(ctx: &NativeCallContext, shape: &Array, seed: i64) -> ScriptResult<ScriptTensor> {
    use rand::{Rng, SeedableRng};
    let shape = shape_arg(ctx, shape)?;
    let n: usize = shape.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed as u64);
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        values.push((r * theta.cos()) as f32);
        values.push((r * theta.sin()) as f32);
    }
    values.truncate(n);
    let t = Tensor::from_vec(values, shape, &Device::Cpu).at(ctx)?;
    Ok(ScriptTensor(t))
}

// ---------------------------------------------------------------------------------------------
// Indexing and views

fn index(ctx: &NativeCallContext, t: &ScriptTensor, i: i64) -> ScriptResult<ScriptTensor> {
    let Some(&n) = t.dims().first() else {
        return Err(ctx_err(
            ctx,
            format!("cannot index {}: it has no dimensions", t.describe()),
        ));
    };
    let j = if i < 0 { i + n as i64 } else { i };
    if j < 0 || j >= n as i64 {
        return Err(ctx_err(
            ctx,
            format!(
                "index {i} out of range for dim 0 of size {n} ({})",
                t.describe()
            ),
        ));
    }
    Ok(ScriptTensor(t.0.get(j as usize).at(ctx)?))
}

fn narrow(
    ctx: &NativeCallContext,
    t: &ScriptTensor,
    dim: usize,
    start: usize,
    len: usize,
    op: &str,
) -> ScriptResult<ScriptTensor> {
    let n = t.dims()[dim];
    if start.checked_add(len).is_none_or(|end| end > n) {
        return Err(ctx_err(
            ctx,
            format!(
                "{op}: range {start}..{} is past the end of dim {dim} of size {n} ({})",
                start.saturating_add(len),
                t.describe()
            ),
        ));
    }
    Ok(ScriptTensor(t.0.narrow(dim, start, len).at(ctx)?))
}

fn reshape(ctx: &NativeCallContext, t: &ScriptTensor, shape: &Array) -> ScriptResult<ScriptTensor> {
    let count = t.0.elem_count();
    let mut dims = Vec::with_capacity(shape.len());
    let mut hole = None;
    for (i, v) in shape.iter().enumerate() {
        let n = v.as_int().map_err(|_| {
            ctx_err(
                ctx,
                format!("shape[{i}] must be an integer, got {}", type_name(ctx, v)),
            )
        })?;
        if n == -1 && hole.is_none() {
            hole = Some(i);
            dims.push(1);
        } else {
            dims.push(arg_usize(ctx, &format!("shape[{i}]"), n)?);
        }
    }
    let known: usize = dims.iter().product();
    if let Some(h) = hole {
        if known == 0 || !count.is_multiple_of(known) {
            return Err(ctx_err(
                ctx,
                format!(
                    "cannot reshape {} ({count} elements) to {}: no size fits the -1",
                    t.describe(),
                    shape_str(&dims).replacen(&dims[h].to_string(), "-1", 1)
                ),
            ));
        }
        dims[h] = count / known;
    }
    let new_count: usize = dims.iter().product();
    if new_count != count {
        return Err(ctx_err(
            ctx,
            format!(
                "cannot reshape {} ({count} elements) to {} ({new_count} elements)",
                t.describe(),
                shape_str(&dims)
            ),
        ));
    }
    Ok(ScriptTensor(t.0.reshape(dims).at(ctx)?))
}

// ---------------------------------------------------------------------------------------------
// Arithmetic

#[derive(Debug, Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Sub => "subtract",
            Op::Mul => "multiply",
            Op::Div => "divide",
        }
    }
}

/// The broadcast shape of `a` and `b` (numpy rules), if they broadcast.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let x = if i < rank - a.len() {
            1
        } else {
            a[i - (rank - a.len())]
        };
        let y = if i < rank - b.len() {
            1
        } else {
            b[i - (rank - b.len())]
        };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
}

fn binary(
    ctx: &NativeCallContext,
    op: Op,
    a: &ScriptTensor,
    b: &ScriptTensor,
) -> ScriptResult<ScriptTensor> {
    let fail = |why: String| {
        ctx_err(
            ctx,
            format!(
                "cannot {} {} and {}: {why}",
                op.verb(),
                a.describe(),
                b.describe()
            ),
        )
    };
    if broadcast_shape(a.dims(), b.dims()).is_none() {
        return Err(fail("shapes do not broadcast".to_string()));
    }
    let run = || -> candle_core::Result<Tensor> {
        let (mut x, mut y) = (a.0.clone(), b.0.clone());
        if x.dtype() != y.dtype() {
            let common = if x.dtype() == DType::F64 || y.dtype() == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            x = x.to_dtype(common)?;
            y = y.to_dtype(common)?;
        }
        if !x.device().same_device(y.device()) {
            y = y.to_device(x.device())?;
        }
        match op {
            Op::Add => x.broadcast_add(&y),
            Op::Sub => x.broadcast_sub(&y),
            Op::Mul => x.broadcast_mul(&y),
            Op::Div => float(&x)?.broadcast_div(&float(&y)?),
        }
    };
    run().map(ScriptTensor).map_err(|e| fail(e.to_string()))
}

/// `t op x` (`tensor_left`) or `x op t`.
fn scalar(
    ctx: &NativeCallContext,
    op: Op,
    t: &ScriptTensor,
    x: f64,
    tensor_left: bool,
) -> ScriptResult<ScriptTensor> {
    let run = || -> candle_core::Result<Tensor> {
        let t = float(&t.0)?;
        match (op, tensor_left) {
            (Op::Add, _) => t.affine(1.0, x),
            (Op::Sub, true) => t.affine(1.0, -x),
            (Op::Sub, false) => t.affine(-1.0, x),
            (Op::Mul, _) => t.affine(x, 0.0),
            (Op::Div, true) => t.affine(1.0 / x, 0.0),
            (Op::Div, false) => t.recip()?.affine(x, 0.0),
        }
    };
    run().map(ScriptTensor).map_err(|e| {
        ctx_err(
            ctx,
            format!("cannot {} {} and {x}: {e}", op.verb(), t.describe()),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Reductions

fn sum_all(t: &ScriptTensor) -> candle_core::Result<f64> {
    scalar_f64(&t.0.to_dtype(DType::F64)?.sum_all()?)
}

fn mean_all(t: &ScriptTensor) -> candle_core::Result<f64> {
    Ok(sum_all(t)? / t.0.elem_count() as f64)
}

fn std_all(t: &ScriptTensor) -> candle_core::Result<f64> {
    let x = t.0.to_dtype(DType::F64)?;
    let mean = mean_all(t)?;
    let var = scalar_f64(&x.affine(1.0, -mean)?.sqr()?.sum_all()?)? / t.0.elem_count() as f64;
    Ok(var.sqrt())
}

fn norm_all(t: &ScriptTensor) -> candle_core::Result<f64> {
    Ok(scalar_f64(&t.0.to_dtype(DType::F64)?.sqr()?.sum_all()?)?.sqrt())
}

fn same_count(
    ctx: &NativeCallContext,
    op: &str,
    a: &ScriptTensor,
    b: &ScriptTensor,
) -> ScriptResult<()> {
    if a.0.elem_count() != b.0.elem_count() {
        return Err(ctx_err(
            ctx,
            format!(
                "{op}: {} and {} have different numbers of elements",
                a.describe(),
                b.describe()
            ),
        ));
    }
    Ok(())
}

fn dot(a: &ScriptTensor, b: &ScriptTensor) -> candle_core::Result<f64> {
    let x = a.0.flatten_all()?.to_dtype(DType::F64)?;
    let y =
        b.0.flatten_all()?
            .to_dtype(DType::F64)?
            .to_device(x.device())?;
    scalar_f64(&(x * y)?.sum_all()?)
}

fn topk(ctx: &NativeCallContext, t: &ScriptTensor, k: i64) -> ScriptResult<Array> {
    if t.0.rank() != 1 {
        return Err(ctx_err(
            ctx,
            format!("topk needs a 1-D tensor, got {}", t.describe()),
        ));
    }
    let k = arg_usize(ctx, "k", k)?;
    let values = t.values_f64().at(ctx)?;
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[j].total_cmp(&values[i]).then(i.cmp(&j)));
    Ok(order
        .into_iter()
        .take(k)
        .map(|i| Dynamic::from_array(vec![(i as i64).into(), values[i].into()]))
        .collect())
}

fn parse_dtype(ctx: &NativeCallContext, name: &str) -> ScriptResult<DType> {
    name.parse::<DType>().map_err(|_| {
        ctx_err(
            ctx,
            format!("unknown dtype `{name}` (known: f32, f16, bf16, f64, u8, u32, i64)"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Files

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

// ---------------------------------------------------------------------------------------------

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptTensor>("Tensor");
    engine.register_fn("to_string", |t: &mut ScriptTensor| t.to_string());
    engine.register_fn("to_debug", |t: &mut ScriptTensor| t.to_string());

    // Construction
    engine.register_fn("tensor", |ctx: NativeCallContext, a: Array| {
        from_array(&ctx, &a)
    });
    engine.register_fn("zeros", |ctx: NativeCallContext, s: Array| {
        filled(&ctx, &s, 0.0)
    });
    engine.register_fn("ones", |ctx: NativeCallContext, s: Array| {
        filled(&ctx, &s, 1.0)
    });
    engine.register_fn("randn", |ctx: NativeCallContext, s: Array, seed: i64| {
        randn(&ctx, &s, seed)
    });

    // Properties
    engine.register_get("shape", |t: &mut ScriptTensor| -> Array {
        t.dims().iter().map(|&d| (d as i64).into()).collect()
    });
    engine.register_get("dtype", |t: &mut ScriptTensor| {
        t.0.dtype().as_str().to_string()
    });
    engine.register_get("rank", |t: &mut ScriptTensor| t.0.rank() as i64);

    // Indexing and views
    engine.register_indexer_get(|ctx: NativeCallContext, t: &mut ScriptTensor, i: i64| {
        index(&ctx, t, i)
    });
    engine.register_fn(
        "slice",
        |ctx: NativeCallContext,
         t: &mut ScriptTensor,
         start: i64,
         end: i64|
         -> ScriptResult<ScriptTensor> {
            if t.0.rank() == 0 {
                return Err(ctx_err(
                    &ctx,
                    format!("cannot slice {}: it has no dimensions", t.describe()),
                ));
            }
            let start = arg_usize(&ctx, "start", start)?;
            let end = arg_usize(&ctx, "end", end)?;
            if end < start {
                return Err(ctx_err(
                    &ctx,
                    format!("slice: end {end} is before start {start}"),
                ));
            }
            narrow(&ctx, t, 0, start, end - start, "slice")
        },
    );
    engine.register_fn(
        "narrow",
        |ctx: NativeCallContext, t: &mut ScriptTensor, dim: i64, start: i64, len: i64| {
            let dim = dim_arg(&ctx, t, "dim", dim)?;
            let start = arg_usize(&ctx, "start", start)?;
            let len = arg_usize(&ctx, "len", len)?;
            narrow(&ctx, t, dim, start, len, "narrow")
        },
    );
    engine.register_fn(
        "select",
        |ctx: NativeCallContext,
         t: &mut ScriptTensor,
         dim: i64,
         i: i64|
         -> ScriptResult<ScriptTensor> {
            let dim = dim_arg(&ctx, t, "dim", dim)?;
            let i = arg_usize(&ctx, "index", i)?;
            let n = t.dims()[dim];
            if i >= n {
                return Err(ctx_err(
                    &ctx,
                    format!(
                        "index {i} out of range for dim {dim} of size {n} ({})",
                        t.describe()
                    ),
                ));
            }
            Ok(ScriptTensor(
                t.0.narrow(dim, i, 1)
                    .and_then(|x| x.squeeze(dim))
                    .at(&ctx)?,
            ))
        },
    );
    engine.register_fn(
        "reshape",
        |ctx: NativeCallContext, t: &mut ScriptTensor, s: Array| reshape(&ctx, t, &s),
    );
    engine.register_fn(
        "transpose",
        |ctx: NativeCallContext,
         t: &mut ScriptTensor,
         d1: i64,
         d2: i64|
         -> ScriptResult<ScriptTensor> {
            let d1 = dim_arg(&ctx, t, "dim", d1)?;
            let d2 = dim_arg(&ctx, t, "dim", d2)?;
            Ok(ScriptTensor(t.0.transpose(d1, d2).at(&ctx)?))
        },
    );

    // Arithmetic
    for (name, op) in [
        ("+", Op::Add),
        ("-", Op::Sub),
        ("*", Op::Mul),
        ("/", Op::Div),
    ] {
        engine.register_fn(
            name,
            move |ctx: NativeCallContext, a: ScriptTensor, b: ScriptTensor| {
                binary(&ctx, op, &a, &b)
            },
        );
        engine.register_fn(
            name,
            move |ctx: NativeCallContext, a: ScriptTensor, x: i64| {
                scalar(&ctx, op, &a, x as f64, true)
            },
        );
        engine.register_fn(
            name,
            move |ctx: NativeCallContext, a: ScriptTensor, x: f64| scalar(&ctx, op, &a, x, true),
        );
        engine.register_fn(
            name,
            move |ctx: NativeCallContext, x: i64, a: ScriptTensor| {
                scalar(&ctx, op, &a, x as f64, false)
            },
        );
        engine.register_fn(
            name,
            move |ctx: NativeCallContext, x: f64, a: ScriptTensor| scalar(&ctx, op, &a, x, false),
        );
    }
    engine.register_fn(
        "-",
        |ctx: NativeCallContext, a: ScriptTensor| -> ScriptResult<ScriptTensor> {
            Ok(ScriptTensor(a.0.neg().at(&ctx)?))
        },
    );

    // Reductions to numbers
    engine.register_fn("sum", |ctx: NativeCallContext, t: &mut ScriptTensor| {
        sum_all(t).at(&ctx)
    });
    engine.register_fn(
        "mean",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<f64> {
            not_empty(&ctx, t, "mean")?;
            mean_all(t).at(&ctx)
        },
    );
    engine.register_fn(
        "std",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<f64> {
            not_empty(&ctx, t, "std")?;
            std_all(t).at(&ctx)
        },
    );
    engine.register_fn("norm", |ctx: NativeCallContext, t: &mut ScriptTensor| {
        norm_all(t).at(&ctx)
    });
    engine.register_fn(
        "max",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<f64> {
            not_empty(&ctx, t, "max")?;
            t.0.max_all().and_then(|m| scalar_f64(&m)).at(&ctx)
        },
    );
    engine.register_fn(
        "min",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<f64> {
            not_empty(&ctx, t, "min")?;
            t.0.min_all().and_then(|m| scalar_f64(&m)).at(&ctx)
        },
    );
    engine.register_fn(
        "argmax",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<i64> {
            not_empty(&ctx, t, "argmax")?;
            let values = t.values_f64().at(&ctx)?;
            let best = (0..values.len())
                .max_by(|&i, &j| values[i].total_cmp(&values[j]).then(j.cmp(&i)))
                .expect("not empty");
            Ok(best as i64)
        },
    );
    engine.register_fn(
        "item",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<f64> {
            if t.0.elem_count() != 1 {
                return Err(ctx_err(
                    &ctx,
                    format!(
                        "item() needs a tensor with exactly 1 element, got {}",
                        t.describe()
                    ),
                ));
            }
            t.values_f64().map(|v| v[0]).at(&ctx)
        },
    );
    engine.register_fn(
        "dot",
        |ctx: NativeCallContext, a: &mut ScriptTensor, b: ScriptTensor| -> ScriptResult<f64> {
            same_count(&ctx, "dot", a, &b)?;
            dot(a, &b).at(&ctx)
        },
    );
    engine.register_fn(
        "cosine",
        |ctx: NativeCallContext, a: &mut ScriptTensor, b: ScriptTensor| -> ScriptResult<f64> {
            same_count(&ctx, "cosine", a, &b)?;
            let run =
                || -> candle_core::Result<f64> { Ok(dot(a, &b)? / (norm_all(a)? * norm_all(&b)?)) };
            run().at(&ctx)
        },
    );
    engine.register_fn(
        "topk",
        |ctx: NativeCallContext, t: &mut ScriptTensor, k: i64| topk(&ctx, t, k),
    );

    // Reductions along a dimension (the dimension is dropped)
    engine.register_fn(
        "sum",
        |ctx: NativeCallContext, t: &mut ScriptTensor, dim: i64| -> ScriptResult<ScriptTensor> {
            let d = dim_arg(&ctx, t, "dim", dim)?;
            Ok(ScriptTensor(t.0.sum(d).at(&ctx)?))
        },
    );
    engine.register_fn(
        "mean",
        |ctx: NativeCallContext, t: &mut ScriptTensor, dim: i64| -> ScriptResult<ScriptTensor> {
            let d = dim_arg(&ctx, t, "dim", dim)?;
            Ok(ScriptTensor(float(&t.0).and_then(|x| x.mean(d)).at(&ctx)?))
        },
    );
    engine.register_fn(
        "norm",
        |ctx: NativeCallContext, t: &mut ScriptTensor, dim: i64| -> ScriptResult<ScriptTensor> {
            let d = dim_arg(&ctx, t, "dim", dim)?;
            let run = || float(&t.0)?.sqr()?.sum(d)?.sqrt();
            Ok(ScriptTensor(run().at(&ctx)?))
        },
    );

    // Conversions
    engine.register_fn(
        "to_array",
        |ctx: NativeCallContext, t: &mut ScriptTensor| t.to_nested().at(&ctx),
    );
    engine.register_fn(
        "to_f32",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<ScriptTensor> {
            Ok(ScriptTensor(t.0.to_dtype(DType::F32).at(&ctx)?))
        },
    );
    engine.register_fn(
        "to_dtype",
        |ctx: NativeCallContext, t: &mut ScriptTensor, name: &str| -> ScriptResult<ScriptTensor> {
            let dtype = parse_dtype(&ctx, name)?;
            Ok(ScriptTensor(t.0.to_dtype(dtype).at(&ctx)?))
        },
    );

    // Files
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_rules() {
        assert_eq!(broadcast_shape(&[2, 3], &[3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[2, 1], &[1, 4]), Some(vec![2, 4]));
        assert_eq!(broadcast_shape(&[2, 3], &[4]), None);
        assert_eq!(broadcast_shape(&[], &[5]), Some(vec![5]));
    }

    #[test]
    fn number_format() {
        assert_eq!(fmt_num(0.1, false), "0.1");
        assert_eq!(fmt_num(2.0, false), "2.0");
        assert_eq!(fmt_num(0.123456, false), "0.1235");
        assert_eq!(fmt_num(1e-7, false), "1.000e-7");
        assert_eq!(fmt_num(3.0, true), "3");
    }

    #[test]
    fn preview_truncates() {
        let t = ScriptTensor(Tensor::arange(0f32, 20., &Device::Cpu).unwrap());
        assert_eq!(
            t.to_string(),
            "Tensor[20] f32 [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, ...]"
        );
        let t =
            ScriptTensor(Tensor::new(&[[0.1f32, 0.2, 0.3], [1., 2., 3.]], &Device::Cpu).unwrap());
        assert_eq!(
            t.to_string(),
            "Tensor[2, 3] f32 [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]"
        );
        let t = ScriptTensor(Tensor::new(0.5f32, &Device::Cpu).unwrap());
        assert_eq!(t.to_string(), "Tensor[] f32 0.5");
    }
}
