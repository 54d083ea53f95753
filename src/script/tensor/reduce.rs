//! Reductions: to numbers (`sum`, `mean`, `std`, `norm`, `max`, `min`, `argmax`, `item`,
//! `dot`, `cosine`), to `[index, value]` pairs (`topk`), and along a dimension (`sum(dim)`,
//! `mean(dim)`, `norm(dim)`).

use candle_core::DType;
use rhai::{Array, Dynamic, Engine, NativeCallContext};

use super::args::{dim_arg, not_empty, room_f64};
use super::value::{float, scalar_f64, ScriptTensor};
use crate::script::arg_usize;
use crate::script::error::{ctx_err, ScriptResult, ToScript};

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
    room_f64(ctx, "topk", t)?;
    let values = t.values_f64().at(ctx)?;
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[j].total_cmp(&values[i]).then(i.cmp(&j)));
    Ok(order
        .into_iter()
        .take(k)
        .map(|i| Dynamic::from_array(vec![(i as i64).into(), values[i].into()]))
        .collect())
}

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn("sum", |ctx: NativeCallContext, t: &mut ScriptTensor| {
        room_f64(&ctx, "sum", t)?;
        sum_all(t).at(&ctx)
    });
    engine.register_fn(
        "mean",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<f64> {
            not_empty(&ctx, t, "mean")?;
            room_f64(&ctx, "mean", t)?;
            mean_all(t).at(&ctx)
        },
    );
    engine.register_fn(
        "std",
        |ctx: NativeCallContext, t: &mut ScriptTensor| -> ScriptResult<f64> {
            not_empty(&ctx, t, "std")?;
            room_f64(&ctx, "std", t)?;
            std_all(t).at(&ctx)
        },
    );
    engine.register_fn("norm", |ctx: NativeCallContext, t: &mut ScriptTensor| {
        room_f64(&ctx, "norm", t)?;
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
            room_f64(&ctx, "argmax", t)?;
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
            room_f64(&ctx, "dot", a)?;
            dot(a, &b).at(&ctx)
        },
    );
    engine.register_fn(
        "cosine",
        |ctx: NativeCallContext, a: &mut ScriptTensor, b: ScriptTensor| -> ScriptResult<f64> {
            same_count(&ctx, "cosine", a, &b)?;
            room_f64(&ctx, "cosine", a)?;
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
}
