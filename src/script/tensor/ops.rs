//! Arithmetic: `+ - * /` between tensors (broadcasting) and with numbers on either side,
//! unary `-`.

use candle_core::{DType, Tensor};
use rhai::{Engine, NativeCallContext};

use super::args::room;
use super::value::{float, ScriptTensor};
use crate::script::error::{ctx_err, ScriptResult, ToScript};

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
    let Some(shape) = broadcast_shape(a.dims(), b.dims()) else {
        return Err(fail("shapes do not broadcast".to_string()));
    };
    // the result (in the wider of the two dtypes, at least f32) must fit before it is made
    let widest = [a.0.dtype(), b.0.dtype(), DType::F32]
        .into_iter()
        .max_by_key(|d| d.size_in_bytes())
        .expect("three dtypes");
    room(ctx, op.verb(), &shape, widest)?;
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
    let widest = if t.0.dtype().size_in_bytes() > 4 {
        t.0.dtype()
    } else {
        DType::F32
    };
    room(ctx, op.verb(), t.dims(), widest)?;
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

pub(super) fn register(engine: &mut Engine) {
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
            room(&ctx, "negate", a.dims(), a.0.dtype())?;
            Ok(ScriptTensor(a.0.neg().at(&ctx)?))
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
}
