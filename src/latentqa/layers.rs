//! The layer plan of a LatentQA decoder: which block of the target is read
//! (`blocks.{read}.hook_resid_post`, HF's `hidden_states[read + 1]`) and which block of the
//! decoder is written at the placeholders. Resolved once against the model; every reader and
//! writer takes the plan, not loose layer numbers.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Read and write layers. Serialised as `lqa_decoder.json` names them (`read_layer`,
/// `write_layer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerPlan {
    /// The target's block whose output is read.
    #[serde(rename = "read_layer")]
    pub read: usize,
    /// The decoder's block whose output is overwritten at the placeholders.
    #[serde(rename = "write_layer")]
    pub write: usize,
}

impl LayerPlan {
    pub fn new(read: usize, write: usize) -> Self {
        LayerPlan { read, write }
    }

    /// The plan when nothing names one (a plain PEFT adapter without `lqa_decoder.json`): the
    /// paper's layers scaled to the model, the middle block read (15 of SmolLM2's 30, as the
    /// shipped decoder reads) and block 0 written.
    pub fn default_for(n_layers: usize) -> Self {
        LayerPlan {
            read: n_layers / 2,
            write: 0,
        }
    }

    /// This plan with the given layers replaced (a script's or a config's overrides).
    pub fn with(self, read: Option<usize>, write: Option<usize>) -> Self {
        LayerPlan {
            read: read.unwrap_or(self.read),
            write: write.unwrap_or(self.write),
        }
    }

    /// The plan, if both layers exist in a model of `n_layers` (target and decoder share the
    /// architecture).
    pub fn check(self, n_layers: usize) -> Result<Self> {
        if self.read >= n_layers || self.write >= n_layers {
            return Err(Error::invalid(format!(
                "read layer {} / write layer {} do not fit a model of {n_layers} layers",
                self.read, self.write
            )));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_resolves() {
        assert_eq!(LayerPlan::default_for(30), LayerPlan::new(15, 0));
        let p = LayerPlan::new(15, 0).with(Some(3), None);
        assert_eq!(p, LayerPlan::new(3, 0));
        assert!(p.check(4).is_ok());
        assert!(p.check(3).is_err());
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"{"read_layer":3,"write_layer":0}"#);
    }
}
