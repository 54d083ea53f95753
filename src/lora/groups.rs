//! Named groups of LoRA target modules (the paper's control code's `lora_modules`), one table
//! for every caller. Each group lists its modules in the order its PEFT config writes them.

use crate::model::{Proj, Target};
use crate::{Error, Result};

const Q: Target = Target::Proj(Proj::Q);
const K: Target = Target::Proj(Proj::K);
const V: Target = Target::Proj(Proj::V);
const O: Target = Target::Proj(Proj::O);
const GATE: Target = Target::Proj(Proj::Gate);
const UP: Target = Target::Proj(Proj::Up);
const DOWN: Target = Target::Proj(Proj::Down);
const LM_HEAD: Target = Target::LmHead;

/// Every module group by name.
pub const MODULE_GROUPS: &[(&str, &[Target])] = &[
    // the paper's groups (control): MLP groups include the lm_head
    ("both", &[GATE, UP, DOWN, LM_HEAD, Q, K, V, O]),
    ("mlp", &[GATE, UP, DOWN, LM_HEAD]),
    ("attn", &[Q, K, V, O]),
    ("qv", &[Q, V]),
    // block projections only, no lm_head
    ("all", &[Q, K, V, O, GATE, UP, DOWN]),
    ("mlp_proj", &[GATE, UP, DOWN]),
];

/// The modules of a named group.
pub fn module_group(name: &str) -> Result<&'static [Target]> {
    MODULE_GROUPS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, g)| *g)
        .ok_or_else(|| {
            let names: Vec<&str> = MODULE_GROUPS.iter().map(|(n, _)| *n).collect();
            Error::invalid(format!(
                "lora_modules `{name}`: expected one of {}",
                names.join(", ")
            ))
        })
}

/// The short names (`target_modules`) of a named group.
pub fn module_group_names(name: &str) -> Result<Vec<String>> {
    Ok(module_group(name)?
        .iter()
        .map(|t| t.hf_name().to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_resolve() {
        assert_eq!(module_group_names("qv").unwrap(), ["q_proj", "v_proj"]);
        assert_eq!(module_group("both").unwrap().len(), 8);
        let e = module_group("bogus").unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("both, mlp"), "{e}");
    }
}
