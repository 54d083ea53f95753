//! Conversions: `to_array()` (nested arrays of floats), `to_f32()`, `to_dtype(name)`.

use candle_core::DType;
use rhai::{Array, Dynamic, Engine, NativeCallContext};

use super::args::room;
use super::value::ScriptTensor;
use crate::script::error::{ctx_err, ScriptResult, ToScript};

impl ScriptTensor {
    /// Nested arrays of floats (a number for a rank-0 tensor).
    pub fn to_nested(&self) -> crate::Result<Dynamic> {
        let values = self.values_f64()?;
        Ok(nest(self.dims(), &values))
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

fn parse_dtype(ctx: &NativeCallContext, name: &str) -> ScriptResult<DType> {
    name.parse::<DType>().map_err(|_| {
        ctx_err(
            ctx,
            format!("unknown dtype `{name}` (known: f32, f16, bf16, f64, u8, u32, i64)"),
        )
    })
}

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn(
        "to_array",
        |ctx: NativeCallContext, t: &mut ScriptTensor| {
            // one script value per element, each as big as an f64 twice over
            room(&ctx, "to_array", &[t.0.elem_count(), 2], DType::F64)?;
            t.to_nested().at(&ctx)
        },
    );
    engine.register_fn(
        "to_f32",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<ScriptTensor> {
            room(&ctx, "to_f32", t.dims(), DType::F32)?;
            Ok(ScriptTensor(t.0.to_dtype(DType::F32).at(&ctx)?))
        },
    );
    engine.register_fn(
        "to_dtype",
        |ctx: NativeCallContext, t: &mut ScriptTensor, name: &str| -> ScriptResult<ScriptTensor> {
            let dtype = parse_dtype(&ctx, name)?;
            room(&ctx, "to_dtype", t.dims(), dtype)?;
            Ok(ScriptTensor(t.0.to_dtype(dtype).at(&ctx)?))
        },
    );
}
