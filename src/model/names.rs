//! Typed names of the model's linear layers. HF checkpoints and PEFT name them by strings
//! (`model.layers.3.self_attn.q_proj`, `lm_head`); those strings are parsed once, at the edge,
//! into these types, and written back from them.

use std::fmt;

/// A projection inside a block, by its HF (and PEFT `target_modules`) short name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    /// Every projection of a block, in forward order.
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// The short name (`q_proj`, ..., `down_proj`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The block submodule holding it (`self_attn` or `mlp`).
    pub fn group(self) -> &'static str {
        match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            Proj::Gate | Proj::Up | Proj::Down => "mlp",
        }
    }

    /// GGUF's name of the projection (`attn_q`, ..., `ffn_down`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Proj::Q => "attn_q",
            Proj::K => "attn_k",
            Proj::V => "attn_v",
            Proj::O => "attn_output",
            Proj::Gate => "ffn_gate",
            Proj::Up => "ffn_up",
            Proj::Down => "ffn_down",
        }
    }

    /// The projection with this short name.
    pub fn parse(short: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.hf_name() == short)
    }
}

/// A kind of linear module, as PEFT's `target_modules` names it: a block projection (in every
/// adapted layer) or the unembedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Proj(Proj),
    LmHead,
}

impl Target {
    /// Every target, projections in forward order then `lm_head`.
    pub const ALL: [Target; 8] = [
        Target::Proj(Proj::Q),
        Target::Proj(Proj::K),
        Target::Proj(Proj::V),
        Target::Proj(Proj::O),
        Target::Proj(Proj::Gate),
        Target::Proj(Proj::Up),
        Target::Proj(Proj::Down),
        Target::LmHead,
    ];

    /// The short name (`q_proj`, ..., `lm_head`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Target::Proj(p) => p.hf_name(),
            Target::LmHead => "lm_head",
        }
    }

    pub fn parse(short: &str) -> Option<Target> {
        match short {
            "lm_head" => Some(Target::LmHead),
            s => Proj::parse(s).map(Target::Proj),
        }
    }
}

/// One linear layer of a model: a block's projection or the unembedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearId {
    Block(usize, Proj),
    LmHead,
}

impl LinearId {
    /// The HF module name (`model.layers.{i}.self_attn.q_proj`, `lm_head`).
    pub fn hf_name(self) -> String {
        self.to_string()
    }

    /// Parse an HF module name.
    pub fn parse(name: &str) -> Option<LinearId> {
        if name == "lm_head" {
            return Some(LinearId::LmHead);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (i, module) = rest.split_once('.')?;
        let (group, short) = module.split_once('.')?;
        let proj = Proj::parse(short).filter(|p| p.group() == group)?;
        Some(LinearId::Block(i.parse().ok()?, proj))
    }
}

impl fmt::Display for LinearId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinearId::Block(l, p) => write!(f, "model.layers.{l}.{}.{}", p.group(), p.hf_name()),
            LinearId::LmHead => write!(f, "lm_head"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in Target::ALL {
            assert_eq!(Target::parse(t.hf_name()), Some(t));
        }
        let id = LinearId::Block(3, Proj::Gate);
        assert_eq!(id.hf_name(), "model.layers.3.mlp.gate_proj");
        assert_eq!(LinearId::parse(&id.hf_name()), Some(id));
        assert_eq!(LinearId::parse("lm_head"), Some(LinearId::LmHead));
        assert_eq!(LinearId::parse("model.layers.3.mlp.q_proj"), None);
        assert_eq!(LinearId::parse("model.layers.x.mlp.up_proj"), None);
    }
}
