//! Tokenizers built from GGUF metadata or from Hugging Face `tokenizer.json` files.
//!
//! [`Tokenizer`] wraps a [`tokenizers::Tokenizer`] and the ids that the rest of the crate needs
//! (bos, eos, pad). Encoding never adds a BOS or EOS by itself; special tokens written in the
//! text (such as `<|im_start|>`) are recognised as single tokens.
//!
//! # From GGUF
//!
//! [`Tokenizer::from_gguf`] rebuilds the tokenizer from the `tokenizer.ggml.*` metadata the way
//! llama.cpp reads it:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` and `merges`. The
//!   pre-tokenizer comes from `tokenizer.ggml.pre`:
//!   - `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva`: each digit
//!     on its own, then the GPT-2 regex (llama.cpp's `\p{N}` split followed by the GPT-2 regex,
//!     which is HF's `Sequence[Digits(individual_digits=true), ByteLevel]`);
//!   - `llama-bpe`, `llama3`, `llama-v3`, `falcon3`, `falcon-h1`, `pixtral`, `midm-2.0`, `lfm2`:
//!     the Llama-3 regex with `ignore_merges` (as in Llama-3's `tokenizer.json`), and a BOS
//!     added by default; `smaug-bpe`, `dbrx`: the same regex without those two;
//!   - `qwen2`, `stablelm2`: NFC, then the Qwen2 regex;
//!   - `gpt2`, `default`, `mpt`, `olmo`, `jais`, `trillion`, or no `pre`: the GPT-2 regex
//!     (HF's `ByteLevel` with its built-in regex). Any other value also falls back to this and
//!     logs a warning: the ids may then differ from llama.cpp's for some inputs.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE. Merges are derived from the
//!   token scores (as HF's GGUF converter and `SentencePieceExtractor` do), with byte fallback
//!   to `<0xXX>` tokens, `" "` replaced by `"▁"` and, when `tokenizer.ggml.add_space_prefix` is
//!   true (the default), a `"▁"` prepended to each piece of text. This path is checked only on a
//!   synthetic vocabulary, not against llama.cpp on a real model.
//! - Any other model kind (`bert`, `t5`, `rwkv`...) is a [`Error::BadFile`] naming it.
//!
//! Tokens whose `tokenizer.ggml.token_type` is CONTROL (3) or UNKNOWN (2) become special added
//! tokens, USER_DEFINED (4) ones become (non-special) added tokens: all of them are matched as
//! whole tokens in the text, as llama.cpp does with `parse_special`.
//!
//! # EOS ids
//!
//! [`Tokenizer::eos_ids`] holds, in this order and without duplicates:
//! 1. the declared EOS (`tokenizer.ggml.eos_token_id`, or `eos_token` of `tokenizer_config.json`);
//! 2. `tokenizer.ggml.eot_token_id` and `tokenizer.ggml.eom_token_id` when present (GGUF);
//! 3. ids added with [`Tokenizer::add_eos_id`]: where a model's tokenizer and chat template
//!    are loaded together, the template's end-of-turn token (`<|im_end|>` for ChatML,
//!    `<|eot_id|>` for Llama-3, `<end_of_turn>` for Gemma, found without any per-model table).

use std::collections::HashSet;
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::{
    decoders::{
        byte_fallback::ByteFallback, byte_level::ByteLevel as ByteLevelDecoder, fuse::Fuse,
        sequence::Sequence as DecoderSequence, strip::Strip, DecoderWrapper,
    },
    models::bpe::{Vocab, BPE},
    normalizers::{prepend::Prepend, replace::Replace, unicode::NFC, NormalizerWrapper, Sequence},
    pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence as PreSequence, split::Split,
        PreTokenizerWrapper,
    },
    AddedToken, SplitDelimiterBehavior,
};

use crate::error::{Error, Result};

/// Llama-3's split regex (`(?i:...)` spelled out), as in llama.cpp and candle.
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: Llama-3's with single digits.
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_NORMAL: u32 = 1;
const TOKEN_TYPE_UNKNOWN: u32 = 2;
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Token ids and, for each, its byte span `[start, end)` in the encoded text.
pub type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// A text tokenizer plus the special ids a language model needs.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    /// The declared EOS first, then the other end-of-generation ids.
    eos: Vec<u32>,
    pad: Option<u32>,
    add_bos: bool,
}

fn gguf_u32(v: &gguf_file::Value) -> Option<u32> {
    use gguf_file::Value::*;
    match v {
        U8(v) => Some(*v as u32),
        I8(v) => u32::try_from(*v).ok(),
        U16(v) => Some(*v as u32),
        I16(v) => u32::try_from(*v).ok(),
        U32(v) => Some(*v),
        I32(v) => u32::try_from(*v).ok(),
        U64(v) => u32::try_from(*v).ok(),
        I64(v) => u32::try_from(*v).ok(),
        _ => None,
    }
}

fn gguf_f32(v: &gguf_file::Value) -> Option<f32> {
    use gguf_file::Value::*;
    match v {
        F32(v) => Some(*v),
        F64(v) => Some(*v as f32),
        other => gguf_u32(other).map(|x| x as f32),
    }
}

/// Metadata accessors that name the file and key in their errors.
struct Meta<'a> {
    ct: &'a gguf_file::Content,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&gguf_file::Value> {
        self.ct.metadata.get(key)
    }
    fn bad(&self, msg: impl std::fmt::Display) -> Error {
        Error::bad_file(self.path, msg)
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.clone()))
                .map_err(|_| self.bad(format!("GGUF metadata `{key}` is not a string"))),
        }
    }
    fn id(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => gguf_u32(v)
                .map(Some)
                .ok_or_else(|| self.bad(format!("GGUF metadata `{key}` is not a token id: {v:?}"))),
        }
    }
    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_bool()
                .map(Some)
                .map_err(|_| self.bad(format!("GGUF metadata `{key}` is not a bool"))),
        }
    }
    fn array(&self, key: &str) -> Result<Option<&Vec<gguf_file::Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_vec()
                .map(Some)
                .map_err(|_| self.bad(format!("GGUF metadata `{key}` is not an array"))),
        }
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(arr) = self.array(key)? else {
            return Ok(None);
        };
        arr.iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.bad(format!("GGUF metadata `{key}` holds a non-string")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("tokenizer: {e}"))
}

/// Byte-level pre-tokenizer pipeline for a `tokenizer.ggml.pre` value:
/// (normalizer, pre-tokenizer, ignore_merges, llama.cpp's default for add_bos).
fn byte_level_pipeline(
    pre: &str,
) -> Result<(Option<NormalizerWrapper>, PreTokenizerWrapper, bool, bool)> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let gpt2 = || -> PreTokenizerWrapper { ByteLevel::new(false, true, true).into() };
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            None,
            PreSequence::new(vec![Digits::new(true).into(), gpt2()]).into(),
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (None, split(REGEX_LLAMA3)?, true, true),
        "smaug-bpe" | "dbrx" => (None, split(REGEX_LLAMA3)?, false, false),
        "qwen2" | "stablelm2" => (Some(NFC.into()), split(REGEX_QWEN2)?, false, false),
        "gpt2" | "default" | "mpt" | "olmo" | "jais" | "trillion" => (None, gpt2(), false, false),
        other => {
            tracing::warn!(
                "tokenizer.ggml.pre = `{other}` is not known here: using the GPT-2 pre-tokenizer, \
                 token ids may differ from llama.cpp's"
            );
            (None, gpt2(), false, false)
        }
    })
}

/// SentencePiece merges from scores: every split of a token into two vocabulary tokens is a
/// merge ranked by the token's score (higher first), as HF's `SentencePieceExtractor`.
fn spm_merges(
    tokens: &[String],
    types: &[u32],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if types.get(id).copied().unwrap_or(TOKEN_TYPE_NORMAL) != TOKEN_TYPE_NORMAL {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((score, id as u32, li, ri, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges.into_iter().map(|m| (m.4, m.5)).collect()
}

/// A `tokenizer.json` through the `tokenizers` library, which panics on some malformed input
/// (it `expect`s parts of the JSON to parse): the text must be valid JSON first, and a panic
/// left inside the library still becomes an error naming the file.
fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
    let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>());
    match parsed {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::bad_file(path, format!("cannot load tokenizer: {e}"))),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Error::bad_file(
                path,
                format!("cannot load tokenizer: {msg}"),
            ))
        }
    }
}

impl Tokenizer {
    /// Build the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata (see the module
    /// docs for what is supported). `path` is used only in error messages.
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let m = Meta { ct, path };
        let model = m
            .string("tokenizer.ggml.model")?
            .ok_or_else(|| m.bad("no tokenizer in the GGUF metadata (tokenizer.ggml.model)"))?;
        let tokens = m
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| m.bad("GGUF metadata has no tokenizer.ggml.tokens"))?;
        let types: Vec<u32> = match m.array("tokenizer.ggml.token_type")? {
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
            Some(arr) => arr
                .iter()
                .map(|v| {
                    gguf_u32(v)
                        .ok_or_else(|| m.bad("tokenizer.ggml.token_type holds a non-integer"))
                })
                .collect::<Result<_>>()?,
        };
        // As llama.cpp's token_to_id map: a later duplicate string wins.
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bos = m.id("tokenizer.ggml.bos_token_id")?;
        let eos = m.id("tokenizer.ggml.eos_token_id")?;
        let pad = m.id("tokenizer.ggml.padding_token_id")?;
        let unk = match m.id("tokenizer.ggml.unknown_token_id")? {
            Some(id) => Some(id),
            None => m.id("tokenizer.ggml.unk_token_id")?,
        };
        for (what, id) in [
            ("bos", bos),
            ("eos", eos),
            ("padding", pad),
            ("unknown", unk),
        ] {
            if let Some(id) = id {
                if id as usize >= tokens.len() {
                    return Err(m.bad(format!(
                        "tokenizer.ggml.{what}_token_id = {id} is outside the vocabulary of {}",
                        tokens.len()
                    )));
                }
            }
        }
        let unk_token = unk.map(|id| tokens[id as usize].clone());

        let mut inner;
        let default_add_bos;
        match model.as_str() {
            "gpt2" => {
                let merges: Vec<(String, String)> = m
                    .strings("tokenizer.ggml.merges")?
                    .ok_or_else(|| m.bad("gpt2 tokenizer without tokenizer.ggml.merges"))?
                    .into_iter()
                    .map(|s| {
                        s.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| {
                                m.bad(format!("bad merge `{s}` in tokenizer.ggml.merges"))
                            })
                    })
                    .collect::<Result<_>>()?;
                let pre = m
                    .string("tokenizer.ggml.pre")?
                    .unwrap_or_else(|| "default".to_string());
                let (normalizer, pre_tok, ignore_merges, add_bos) = byte_level_pipeline(&pre)?;
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab.clone(), merges)
                    .ignore_merges(ignore_merges);
                if let Some(unk) = &unk_token {
                    builder = builder.unk_token(unk.clone());
                }
                let bpe = builder
                    .build()
                    .map_err(|e| m.bad(format!("tokenizer: {e}")))?;
                inner = tokenizers::Tokenizer::new(bpe);
                if let Some(n) = normalizer {
                    inner.with_normalizer(Some(n)).map_err(tok_err)?;
                }
                inner.with_pre_tokenizer(Some(pre_tok));
                inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
                default_add_bos = add_bos;
            }
            "llama" => {
                let scores: Vec<f32> = match m.array("tokenizer.ggml.scores")? {
                    None => vec![0.0; tokens.len()],
                    Some(arr) => arr
                        .iter()
                        .map(|v| {
                            gguf_f32(v)
                                .ok_or_else(|| m.bad("tokenizer.ggml.scores holds a non-number"))
                        })
                        .collect::<Result<_>>()?,
                };
                let merges = spm_merges(&tokens, &types, &scores, &vocab);
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab.clone(), merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = &unk_token {
                    builder = builder.unk_token(unk.clone());
                }
                let bpe = builder
                    .build()
                    .map_err(|e| m.bad(format!("tokenizer: {e}")))?;
                inner = tokenizers::Tokenizer::new(bpe);
                let space_prefix = m.bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let mut norms: Vec<NormalizerWrapper> = Vec::new();
                if space_prefix {
                    norms.push(Prepend::new("▁".to_string()).into());
                }
                norms.push(Replace::new(" ", "▁").map_err(tok_err)?.into());
                inner
                    .with_normalizer(Some(Sequence::new(norms)))
                    .map_err(tok_err)?;
                let mut decs: Vec<DecoderWrapper> = vec![
                    Replace::new("▁", " ").map_err(tok_err)?.into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ];
                if space_prefix {
                    decs.push(Strip::new(' ', 1, 0).into());
                }
                inner.with_decoder(Some(DecoderSequence::new(decs)));
                default_add_bos = true;
            }
            other => {
                return Err(m.bad(format!(
                "tokenizer.ggml.model = `{other}` is not supported (supported: `gpt2` byte-level \
                     BPE and `llama` SentencePiece BPE)"
            )))
            }
        }

        // Special tokens: matched as whole tokens anywhere in the text.
        let mut added = Vec::new();
        let mut special_ids: HashSet<u32> = HashSet::new();
        for (id, (tok, ty)) in tokens.iter().zip(types.iter()).enumerate() {
            match *ty {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                    special_ids.insert(id as u32);
                }
                TOKEN_TYPE_USER_DEFINED => {
                    added.push(AddedToken::from(tok.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        // The declared special ids are special even when token_type says otherwise.
        special_ids.extend([bos, eos, pad, unk].into_iter().flatten());
        let mut special_ids: Vec<u32> = special_ids.into_iter().collect();
        special_ids.sort_unstable();
        let specials: Vec<AddedToken> = special_ids
            .iter()
            .filter(|&&id| !tokens[id as usize].is_empty())
            .map(|&id| AddedToken::from(tokens[id as usize].clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        inner.add_tokens(added).map_err(tok_err)?;

        let add_bos = m
            .bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_add_bos);
        let mut eos_ids: Vec<u32> = eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = m.id(key)? {
                if (id as usize) < tokens.len() && !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        Ok(Tokenizer {
            inner,
            bos,
            eos: eos_ids,
            pad,
            add_bos,
        })
    }

    /// Load a Hugging Face `tokenizer.json`, and optionally its `tokenizer_config.json` for the
    /// special tokens (`bos_token`, `eos_token`, `pad_token`, `add_bos_token`). Without a config, bos/eos/pad are unknown (`None`/empty).
    /// When the config has no `add_bos_token`, [`Self::add_bos`] is whether the
    /// `tokenizer.json` post-processor inserts the BOS.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let inner = load_tokenizer_json(tokenizer_json)?;
        let mut tok = Tokenizer {
            inner,
            bos: None,
            eos: Vec::new(),
            pad: None,
            add_bos: false,
        };
        let mut add_bos = None;
        if let Some(cfg_path) = tokenizer_config {
            let text = std::fs::read_to_string(cfg_path).map_err(|e| Error::io(cfg_path, e))?;
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(cfg_path, format!("invalid JSON: {e}")))?;
            let special = |key: &str| -> Result<Option<u32>> {
                let content = match cfg.get(key) {
                    None | Some(serde_json::Value::Null) => return Ok(None),
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    Some(v) => match v.get("content").and_then(|c| c.as_str()) {
                        Some(s) => s,
                        None => {
                            return Err(Error::bad_file(
                                cfg_path,
                                format!("`{key}` is not a token"),
                            ))
                        }
                    },
                };
                tok.inner.token_to_id(content).map(Some).ok_or_else(|| {
                    Error::bad_file(
                        cfg_path,
                        format!("`{key}` = `{content}` is not in the tokenizer's vocabulary"),
                    )
                })
            };
            let bos = special("bos_token")?;
            let eos = special("eos_token")?;
            let pad = special("pad_token")?;
            tok.bos = bos;
            tok.eos = eos.into_iter().collect();
            tok.pad = pad;
            add_bos = cfg.get("add_bos_token").and_then(|v| v.as_bool());
        }
        tok.add_bos = match (add_bos, tok.bos) {
            (Some(b), _) => b,
            (None, Some(bos)) => {
                let enc = tok.inner.encode("a", true).map_err(tok_err)?;
                enc.get_ids().first() == Some(&bos)
            }
            (None, None) => false,
        };
        Ok(tok)
    }

    /// Add `id` to [`Self::eos_ids`] (after those already there) unless it is one of them.
    pub fn add_eos_id(&mut self, id: u32) {
        if !self.eos.contains(&id) {
            self.eos.push(id);
        }
    }

    /// Token ids of `text`. No BOS/EOS is added; special tokens written in the text are
    /// recognised as single tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` and each token's byte span `[start, end)` in `text`. For byte-level
    /// tokenizers the spans of consecutive tokens tile the text, except that a token holding
    /// only part of a multi-byte character gets that whole character's span.
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsAndOffsets> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Whether `id` is a special (added) token, such as `<|im_end|>`.
    pub fn is_special(&self, id: u32) -> bool {
        self.id_to_token(id)
            .is_some_and(|t| self.inner.get_added_vocabulary().is_special_token(&t))
    }

    /// The token string of `id` (in the vocabulary's own spelling, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string (vocabulary spelling, or an added/special token).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS id, if the model declares one (it may be a chat token that is never prepended:
    /// see [`Self::add_bos`]).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Ids that end generation: the declared EOS first, then the end-of-turn tokens (see the
    /// module docs).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The padding id, if declared.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// The BOS token string.
    pub fn bos_token(&self) -> Option<String> {
        self.bos.and_then(|id| self.id_to_token(id))
    }

    /// The declared EOS token string (the first of [`Self::eos_ids`]).
    pub fn eos_token(&self) -> Option<String> {
        self.eos.first().and_then(|&id| self.id_to_token(id))
    }

    /// Whether a BOS should be prepended to a prompt (`tokenizer.ggml.add_bos_token`, or
    /// `add_bos_token` of `tokenizer_config.json`). [`Self::encode`] never prepends it.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
