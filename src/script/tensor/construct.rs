//! Making tensors: `tensor(nested_array)` (f32), `zeros(shape)`, `ones(shape)`,
//! `randn(shape, seed)`.

use candle_core::{DType, Device, Tensor};
use rhai::{Array, Engine, NativeCallContext};

use super::args::{room, shape_arg, type_name};
use super::value::ScriptTensor;
use crate::script::error::{ctx_err, ScriptResult, ToScript};

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
    // The shape is read from the first elements only: check it before reserving room for it.
    room(ctx, "tensor", &shape, DType::F32)?;
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

fn filled(
    ctx: &NativeCallContext,
    op: &str,
    shape: &Array,
    value: f32,
) -> ScriptResult<ScriptTensor> {
    let shape = shape_arg(ctx, shape)?;
    room(ctx, op, &shape, DType::F32)?;
    let t = Tensor::full(value, shape, &Device::Cpu).at(ctx)?;
    Ok(ScriptTensor(t))
}

/// Standard normal values from a seeded generator (Box-Muller), so that scripts are repeatable.
fn randn(ctx: &NativeCallContext, shape: &Array, seed: i64) -> ScriptResult<ScriptTensor> {
    use rand::{Rng, SeedableRng};
    let shape = shape_arg(ctx, shape)?;
    room(ctx, "randn", &shape, DType::F32)?;
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

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn("tensor", |ctx: NativeCallContext, a: Array| {
        from_array(&ctx, &a)
    });
    engine.register_fn("zeros", |ctx: NativeCallContext, s: Array| {
        filled(&ctx, "zeros", &s, 0.0)
    });
    engine.register_fn("ones", |ctx: NativeCallContext, s: Array| {
        filled(&ctx, "ones", &s, 1.0)
    });
    engine.register_fn("randn", |ctx: NativeCallContext, s: Array, seed: i64| {
        randn(&ctx, &s, seed)
    });
}
