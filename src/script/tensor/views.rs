//! Indexing and views: `t[i]`, `slice`, `narrow`, `select`, `reshape`, `transpose`.

use rhai::{Array, Engine, NativeCallContext};

use super::args::{dim_arg, room, type_name};
use super::value::{shape_str, ScriptTensor};
use crate::script::arg_usize;
use crate::script::error::{ctx_err, ScriptResult, ToScript};

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
    let overflow = |dims: &[usize]| {
        ctx_err(
            ctx,
            format!(
                "cannot reshape {} to {}: the shape's product overflows",
                t.describe(),
                shape_str(dims)
            ),
        )
    };
    let known = crate::budget::elem_count(&dims).ok_or_else(|| overflow(&dims))?;
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
    let new_count = crate::budget::elem_count(&dims).ok_or_else(|| overflow(&dims))?;
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
    room(ctx, "reshape", &dims, t.0.dtype())?;
    Ok(ScriptTensor(t.0.reshape(dims).at(ctx)?))
}

pub(super) fn register(engine: &mut Engine) {
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
}
