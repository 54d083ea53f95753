//! The script value `Tensor` ([`ScriptTensor`]) and what every part of the binding asks of it.

use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Engine};

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
}

pub(super) fn shape_str(dims: &[usize]) -> String {
    let parts: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// Integer tensors become f32 for arithmetic that makes fractions.
pub(super) fn float(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype().is_int() {
        t.to_dtype(DType::F32)
    } else {
        Ok(t.clone())
    }
}

pub(super) fn scalar_f64(t: &Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .to_scalar::<f64>()
}

/// The type `Tensor` and its properties `shape`, `dtype`, `rank`.
pub(super) fn register(engine: &mut Engine) {
    engine.register_type_with_name::<ScriptTensor>("Tensor");
    // Properties
    engine.register_get("shape", |t: &mut ScriptTensor| -> Array {
        t.dims().iter().map(|&d| (d as i64).into()).collect()
    });
    engine.register_get("dtype", |t: &mut ScriptTensor| {
        t.0.dtype().as_str().to_string()
    });
    engine.register_get("rank", |t: &mut ScriptTensor| t.0.rank() as i64);
}
