//! The layer plan of a LatentQA decoder: which block of the target is read
//! (`blocks.{read}.hook_resid_post`, HF's `hidden_states[read + 1]`), which block of the
//! decoder is written at the placeholders, and how ([`Injection`]). Resolved once against the
//! model; every reader and writer takes the plan, not loose layer numbers.

use crate::hooks::PatchMode;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the target's activation `v` enters the decoder's residual stream `h` at a placeholder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Injection {
    /// The paper's: `h <- v` (the placeholder's residual is overwritten).
    #[default]
    Replace,
    /// Activation Oracles' (Karvonen et al. 2025): `h <- h + ||h|| v / ||v||`, the activation's
    /// direction added at the norm of the residual it joins, so that a read layer of larger norm
    /// does not blow up the decoder's early layers.
    AddNormMatched,
}

impl Injection {
    /// The hook patch that performs this injection.
    pub fn patch_mode(self) -> PatchMode {
        match self {
            Injection::Replace => PatchMode::Replace,
            Injection::AddNormMatched => PatchMode::AddNormMatched,
        }
    }

    /// The name scripts and `lqa_decoder.json` use.
    pub fn name(self) -> &'static str {
        match self {
            Injection::Replace => "replace",
            Injection::AddNormMatched => "add_norm_matched",
        }
    }

    /// The injection named `name` (see [`Injection::name`]).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "replace" => Ok(Injection::Replace),
            "add_norm_matched" => Ok(Injection::AddNormMatched),
            _ => Err(Error::invalid(format!(
                "unknown injection {name:?}: expected \"replace\" or \"add_norm_matched\""
            ))),
        }
    }
}

/// Read and write layers, and the injection at the write layer. Serialised as
/// `lqa_decoder.json` names them (`read_layer`, `write_layer`, `injection`); a file without
/// `injection` (written before it existed) is [`Injection::Replace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerPlan {
    /// The target's block whose output is read.
    #[serde(rename = "read_layer")]
    pub read: usize,
    /// The decoder's block whose output is written at the placeholders.
    #[serde(rename = "write_layer")]
    pub write: usize,
    /// How the activations are written.
    #[serde(rename = "injection", default)]
    pub inject: Injection,
    /// Contrast reading: where the read prompt masks a part (a system prompt, a control turn),
    /// the decoder gets what that hidden part changed in the stimulus's activations: the
    /// read minus the target's activations on the same dialog without the masked turns
    /// ([`super::format::ReadPrompt::baseline`]), at the same tokens. Unmasked reads are
    /// unchanged. Off in the paper's decoders (and in files written before it existed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub contrast: bool,
}

impl LayerPlan {
    /// A plan that writes by [`Injection::Replace`].
    pub fn new(read: usize, write: usize) -> Self {
        LayerPlan {
            read,
            write,
            inject: Injection::Replace,
            contrast: false,
        }
    }

    /// This plan with another injection.
    pub fn injecting(self, inject: Injection) -> Self {
        LayerPlan { inject, ..self }
    }

    /// This plan with contrast reading on or off (see [`LayerPlan::contrast`]).
    pub fn contrasting(self, contrast: bool) -> Self {
        LayerPlan { contrast, ..self }
    }

    /// The plan when nothing names one (a plain PEFT adapter without `lqa_decoder.json`): the
    /// paper's layers scaled to the model, the middle block read (15 of SmolLM2's 30, as the
    /// shipped decoder reads) and block 0 written.
    pub fn default_for(n_layers: usize) -> Self {
        LayerPlan::new(n_layers / 2, 0)
    }

    /// This plan with the given layers replaced (a script's or a config's overrides).
    pub fn with(self, read: Option<usize>, write: Option<usize>) -> Self {
        LayerPlan {
            read: read.unwrap_or(self.read),
            write: write.unwrap_or(self.write),
            ..self
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
        check_write_layer(self.write, n_layers)?;
        Ok(self)
    }
}

/// A write layer some block reads: the output of the last block feeds only the unembedding at
/// the placeholders themselves, so no answer token could depend on what is written there.
pub fn check_write_layer(write: usize, n_layers: usize) -> Result<()> {
    if n_layers > 1 && write + 1 >= n_layers {
        return Err(Error::invalid(format!(
            "write layer {write} is the last block of {n_layers}: no block reads what is \
             written there, so the answers could not depend on the activations (use a layer \
             below {})",
            n_layers - 1
        )));
    }
    Ok(())
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
        let last = LayerPlan::new(0, 3).check(4).unwrap_err().to_string();
        assert!(last.contains("write layer 3 is the last block"), "{last}");
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"read_layer":3,"write_layer":0,"injection":"replace"}"#
        );
        // a file written before `injection` existed reads as the paper's replacement
        let old: LayerPlan = serde_json::from_str(r#"{"read_layer":3,"write_layer":0}"#).unwrap();
        assert_eq!(old, p);
        let ao = p.injecting(Injection::AddNormMatched);
        let json = serde_json::to_string(&ao).unwrap();
        assert!(json.contains(r#""injection":"add_norm_matched""#), "{json}");
        assert_eq!(serde_json::from_str::<LayerPlan>(&json).unwrap(), ao);
        assert_eq!(ao.with(Some(1), None).inject, Injection::AddNormMatched);
        // contrast reading is written only when on; files without it read plainly
        assert!(!old.contrast);
        let c = ao.contrasting(true);
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""contrast":true"#), "{json}");
        assert_eq!(serde_json::from_str::<LayerPlan>(&json).unwrap(), c);
        assert!(c.with(Some(2), Some(1)).contrast);
        for i in [Injection::Replace, Injection::AddNormMatched] {
            assert_eq!(Injection::parse(i.name()).unwrap(), i);
        }
        let e = Injection::parse("add").unwrap_err().to_string();
        assert!(e.contains("add_norm_matched"), "{e}");
    }
}
