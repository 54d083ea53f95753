//! Argument checks shared by the tensor bindings: shapes, dimensions, non-empty tensors.

use rhai::{Array, Dynamic, NativeCallContext};

use super::value::ScriptTensor;
use crate::script::arg_usize;
use crate::script::error::{ctx_err, ScriptResult, ToScript};

pub(super) fn type_name(ctx: &NativeCallContext, value: &Dynamic) -> String {
    ctx.engine().map_type_name(value.type_name()).to_string()
}

/// A shape array: non-negative integers.
pub(super) fn shape_arg(ctx: &NativeCallContext, shape: &Array) -> ScriptResult<Vec<usize>> {
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

/// Check, before allocating, that `op` may make a tensor of `dims` and `dtype` (the
/// `--max-tensor-bytes` limit; see [`crate::budget`]).
pub(super) fn room(
    ctx: &NativeCallContext,
    op: &str,
    dims: &[usize],
    dtype: candle_core::DType,
) -> ScriptResult<()> {
    crate::budget::check(op, dims, dtype).at(ctx)
}

/// [`room`] for an op working on all of `t` in f64 (reductions, conversions to numbers).
pub(super) fn room_f64(ctx: &NativeCallContext, op: &str, t: &ScriptTensor) -> ScriptResult<()> {
    room(ctx, op, t.dims(), candle_core::DType::F64)
}

/// A dimension of `t`.
pub(super) fn dim_arg(
    ctx: &NativeCallContext,
    t: &ScriptTensor,
    what: &str,
    dim: i64,
) -> ScriptResult<usize> {
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

pub(super) fn not_empty(ctx: &NativeCallContext, t: &ScriptTensor, op: &str) -> ScriptResult<()> {
    if t.0.elem_count() == 0 {
        Err(ctx_err(
            ctx,
            format!("{op} of an empty tensor ({})", t.describe()),
        ))
    } else {
        Ok(())
    }
}
