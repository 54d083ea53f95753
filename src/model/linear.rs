//! The one linear layer type of the model: a frozen weight, an optional bias, and the slot where
//! a LoRA adapter plugs in (the only place adapters touch the model).

use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`, as in HF checkpoints.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x @ W^T + b` for `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        let y = match x.dims() {
            [b, s, i] => x.reshape((b * s, *i))?.matmul(&w)?.reshape((*b, *s, ()))?,
            [_, _] => x.matmul(&w)?,
            _ => x.broadcast_matmul(&w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
