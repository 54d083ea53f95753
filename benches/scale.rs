//! Benchmark (not a test, too big for CI): lqa at the scale of an 8B model. Writes once, to a
//! cache folder, a GGUF with random Q4_0 weights in the shape of Llama-3-8B (32 layers,
//! d_model 4096, 32 heads / 8 KV heads, FFN 14336, vocabulary 128256; about 4.5 GB), the
//! default model's tokenizer and chat template in its metadata; then loads it with
//! `weights: "native"` and reports the load time, RSS, prefill tokens/s (128-token prompt),
//! greedy decode tokens/s (64 single-token steps with the KV cache), decode as a fraction of
//! the memory-bandwidth bound measured in the same run (GB/s / linear weight bytes per token),
//! one hook capture (`blocks.16.hook_resid_post`: the middle block, which a decoder reads by
//! default), one LatentQA read (a decoder on the same weights with a random LoRA, one
//! question, 16 new tokens) and the peak RSS from the load to the end (VmHWM; the file's
//! writing and the bandwidth measurement come before and stay below it).
//! Prefill and decode: median of 3 runs (`LQA_BENCH_RUNS`) after one warm-up prefill.
//!
//!     cargo bench --bench scale
//!     LQA_SCALE_LAYERS=2 cargo bench --bench scale    # a 2-layer file of the same widths
//!
//! The file is `$LQA_SCALE_DIR/llama3-8b-shape-q4_0.gguf` (default dir `$LQA_HOME/bench`, i.e.
//! `~/.cache/lqa/bench`), reused when it exists with the expected size; it is written to a
//! temporary file first and renamed into place. Targets (issue 13): peak RSS <= 5.5 GiB,
//! decode >= 0.8 of the bandwidth bound.

mod common;

use anyhow::Context;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Tensor};
use common::{median, report, reset_peak, rss_mib};
use lqa::chat::Message;
use lqa::hooks::HookPoint;
use lqa::latentqa::decoder::Decoder;
use lqa::latentqa::Activations;
use lqa::lm::{LanguageModel, LoadOptions};
use lqa::lora::{Adapter, LoraConfig};
use lqa::model::{Input, KvCache, Logits, Model};
use lqa::rng::SplitMix64;
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

// Llama-3-8B's shape.
const D: usize = 4096;
const FF: usize = 14336;
const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = D / HEADS;
const VOCAB: usize = 128256;
const LAYERS: usize = 32;
const CONTEXT: u32 = 8192;

const ALIGN: u64 = 32;
/// Q4_0: 32 weights in 18 bytes (an f16 scale, then 16 bytes of 4-bit values).
const QK: usize = 32;
const Q4_0_BYTES: usize = 18;
const GGML_F32: u32 = 0;
const GGML_Q4_0: u32 = 2;
/// The scale of a block: weights `d * (q - 8)`, q uniform in 1..16 except that 8 (a zero) is
/// twice as likely (a random nibble of 0 becomes 8), so the weights have mean 0 (with q in
/// 0..16 their mean `-d / 2` adds up, layer after layer, to a residual stream of constant
/// vectors) and std `d * sqrt(2 (1^2 + ... + 7^2) / 16) = 4.18 d`; d drawn in
/// `D0 * [0.8, 1.2]` gives a std of about 0.02.
const D0: f32 = 0.02 / 4.18;
/// The lowest bit of each nibble of a u64.
const NIBBLE_LOW: u64 = 0x1111_1111_1111_1111;
const SEED: u64 = 0x8B_5CA1E;

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg \
    combined movable metal type, oil-based inks and a wooden press adapted from wine making. Books became \
    cheaper, literacy spread across Europe, and scientists could share their results faster than ever. \
    Within fifty years, presses operated in more than two hundred cities, printing bibles, grammars, \
    almanacs and pamphlets that carried the ideas of the Renaissance and the Reformation to readers.";
const PREFILL: usize = 128;
const DECODE: usize = 64;
const READ_TOKENS: usize = 16;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Random Q4_0 blocks.
    Q4_0,
    /// f32 ones (norm weights).
    Ones,
}

struct Spec {
    name: String,
    /// candle's order, outermost first (`[out, in]`); GGUF writes it innermost first.
    dims: Vec<usize>,
    kind: Kind,
}

impl Spec {
    fn new(name: impl Into<String>, dims: &[usize], kind: Kind) -> Self {
        Spec {
            name: name.into(),
            dims: dims.to_vec(),
            kind,
        }
    }
    fn elems(&self) -> usize {
        self.dims.iter().product()
    }
    fn bytes(&self) -> u64 {
        match self.kind {
            Kind::Q4_0 => (self.elems() / QK * Q4_0_BYTES) as u64,
            Kind::Ones => (self.elems() * 4) as u64,
        }
    }
}

fn aligned(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// The tensors of the file, in llama.cpp's names, in forward order.
fn tensors(layers: usize) -> Vec<Spec> {
    let kv = KV_HEADS * HEAD_DIM;
    let mut v = vec![Spec::new("token_embd.weight", &[VOCAB, D], Kind::Q4_0)];
    for i in 0..layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        v.extend([
            Spec::new(p("attn_norm.weight"), &[D], Kind::Ones),
            Spec::new(p("attn_q.weight"), &[HEADS * HEAD_DIM, D], Kind::Q4_0),
            Spec::new(p("attn_k.weight"), &[kv, D], Kind::Q4_0),
            Spec::new(p("attn_v.weight"), &[kv, D], Kind::Q4_0),
            Spec::new(p("attn_output.weight"), &[D, HEADS * HEAD_DIM], Kind::Q4_0),
            Spec::new(p("ffn_norm.weight"), &[D], Kind::Ones),
            Spec::new(p("ffn_gate.weight"), &[FF, D], Kind::Q4_0),
            Spec::new(p("ffn_up.weight"), &[FF, D], Kind::Q4_0),
            Spec::new(p("ffn_down.weight"), &[D, FF], Kind::Q4_0),
        ]);
    }
    v.push(Spec::new("output_norm.weight", &[D], Kind::Ones));
    v.push(Spec::new("output.weight", &[VOCAB, D], Kind::Q4_0));
    v
}

// ---- GGUF v3 encoding (candle's `gguf_file` reads it; its writer wants every tensor at once)

fn put_u32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put_str(w: &mut Vec<u8>, s: &str) {
    put_u64(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

/// GGUF's value type codes.
fn type_code(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(w: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => w.push(*x),
        Value::I8(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => put_u32(w, *x),
        Value::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => put_u64(w, *x),
        Value::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => w.push(u8::from(*x)),
        Value::String(s) => put_str(w, s),
        Value::Array(a) => {
            // an empty array's element type does not matter
            put_u32(w, a.first().map(type_code).unwrap_or(4));
            put_u64(w, a.len() as u64);
            for e in a {
                put_value(w, e);
            }
        }
    }
}

/// The metadata: Llama-3-8B's shape keys, and the default model's tokenizer and chat template
/// (`tokenizer.*`; 49152 tokens, fewer than the 128256 rows of the embedding, which the loader
/// accepts: `llama.vocab_size` sizes the model).
fn metadata(layers: usize) -> anyhow::Result<Vec<(String, Value)>> {
    let src = lqa::sources::resolve(lqa::sources::DEFAULT_MODEL)?;
    let path = src.path();
    let mut f = std::io::BufReader::new(
        std::fs::File::open(path).with_context(|| path.display().to_string())?,
    );
    let template =
        gguf_file::Content::read(&mut f).with_context(|| format!("reading {}", path.display()))?;
    let u = |x: usize| Value::U32(x as u32);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String("Llama-3-8B shape, random Q4_0 weights (lqa scale bench)".into()),
        ),
        ("general.alignment".into(), Value::U32(ALIGN as u32)),
        ("general.file_type".into(), Value::U32(2)), // MOSTLY_Q4_0
        ("llama.block_count".into(), u(layers)),
        ("llama.context_length".into(), Value::U32(CONTEXT)),
        ("llama.embedding_length".into(), u(D)),
        ("llama.feed_forward_length".into(), u(FF)),
        ("llama.attention.head_count".into(), u(HEADS)),
        ("llama.attention.head_count_kv".into(), u(KV_HEADS)),
        ("llama.rope.freq_base".into(), Value::F32(500000.0)),
        ("llama.rope.dimension_count".into(), u(HEAD_DIM)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u(VOCAB)),
    ];
    let mut tok: Vec<(String, Value)> = template
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    tok.sort_by(|a, b| a.0.cmp(&b.0));
    md.extend(tok);
    Ok(md)
}

/// The header (up to the first tensor's data, padded) and each tensor's offset from there.
fn header(md: &[(String, Value)], specs: &[Spec]) -> (Vec<u8>, Vec<u64>) {
    let mut h = Vec::new();
    put_u32(&mut h, 0x4655_4747); // "GGUF"
    put_u32(&mut h, 3);
    put_u64(&mut h, specs.len() as u64);
    put_u64(&mut h, md.len() as u64);
    for (k, v) in md {
        put_str(&mut h, k);
        put_u32(&mut h, type_code(v));
        put_value(&mut h, v);
    }
    let mut offsets = Vec::with_capacity(specs.len());
    let mut off = 0u64;
    for s in specs {
        put_str(&mut h, &s.name);
        put_u32(&mut h, s.dims.len() as u32);
        for &d in s.dims.iter().rev() {
            put_u64(&mut h, d as u64);
        }
        put_u32(
            &mut h,
            match s.kind {
                Kind::Q4_0 => GGML_Q4_0,
                Kind::Ones => GGML_F32,
            },
        );
        put_u64(&mut h, off);
        offsets.push(off);
        off = aligned(off + s.bytes());
    }
    h.resize(aligned(h.len() as u64) as usize, 0);
    (h, offsets)
}

/// 16 random nibbles with every 0 made an 8 (a zero weight), so that `q - 8` has mean 0.
fn zero_mean_nibbles(x: u64) -> u64 {
    let nonzero = (x | x >> 1 | x >> 2 | x >> 3) & NIBBLE_LOW;
    x | (!nonzero & NIBBLE_LOW) << 3
}

/// Fill `out` (whole Q4_0 blocks) with random blocks: block `first + j` is drawn from its own
/// stream of `seed`, so the bytes do not depend on how the work is split.
fn fill_q4_0(out: &mut [u8], seed: u64, first: u64) {
    const PER_TASK: usize = 4096;
    out.par_chunks_mut(PER_TASK * Q4_0_BYTES)
        .enumerate()
        .for_each(|(t, chunk)| {
            let mut g = SplitMix64::derive(seed, first + (t * PER_TASK) as u64);
            for b in chunk.chunks_exact_mut(Q4_0_BYTES) {
                let r = g.next_u64();
                let u = (r >> 40) as f32 / (1u64 << 24) as f32;
                let d = half::f16::from_f32(D0 * (0.8 + 0.4 * u));
                b[..2].copy_from_slice(&d.to_le_bytes());
                b[2..10].copy_from_slice(&zero_mean_nibbles(g.next_u64()).to_le_bytes());
                b[10..18].copy_from_slice(&zero_mean_nibbles(g.next_u64()).to_le_bytes());
            }
        });
}

/// Remove the temporary files (`NAME.tmpPID`) that writers of `path` killed before their
/// rename left behind (several GB each); a live writer's is left alone.
fn remove_dead_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let prefix = format!("{name}.tmp");
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let f = e.file_name();
        let pid = f.to_str().and_then(|f| f.strip_prefix(&prefix));
        if let Some(pid) = pid.filter(|p| p.parse::<u32>().is_ok()) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Write the file streaming (one chunk of blocks at a time) to a temporary file, then rename
/// it into place.
fn write_gguf(path: &Path, head: &[u8], specs: &[Spec], offsets: &[u64]) -> anyhow::Result<()> {
    remove_dead_temps(path);
    let tmp = path.with_extension(format!("gguf.tmp{}", std::process::id()));
    let file = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(head)?;
    let data_start = head.len() as u64;
    let mut pos = data_start;
    const CHUNK_BLOCKS: usize = 1 << 18; // 4.5 MiB
    let mut buf = vec![0u8; CHUNK_BLOCKS * Q4_0_BYTES];
    for (i, (s, &off)) in specs.iter().zip(offsets).enumerate() {
        let pad = data_start + off - pos;
        w.write_all(&vec![0u8; pad as usize])?;
        pos += pad;
        match s.kind {
            Kind::Ones => {
                let ones: Vec<u8> = std::iter::repeat_n(1f32.to_le_bytes(), s.elems())
                    .flatten()
                    .collect();
                w.write_all(&ones)?;
            }
            Kind::Q4_0 => {
                let seed = SplitMix64::derive(SEED, i as u64).next_u64();
                let blocks = s.elems() / QK;
                let mut done = 0;
                while done < blocks {
                    let n = CHUNK_BLOCKS.min(blocks - done);
                    let out = &mut buf[..n * Q4_0_BYTES];
                    fill_q4_0(out, seed, done as u64);
                    w.write_all(out)?;
                    done += n;
                }
            }
        }
        pos += s.bytes();
    }
    let end = aligned(pos - data_start) + data_start;
    w.write_all(&vec![0u8; (end - pos) as usize])?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The bench file: written when it is missing or has another size. Returns its path, its size
/// and the seconds it took to write (`None`: reused).
fn scale_file(layers: usize) -> anyhow::Result<(PathBuf, u64, Option<f64>)> {
    let dir = std::env::var_os("LQA_SCALE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| lqa::sources::lqa_home().join("bench"));
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let name = if layers == LAYERS {
        "llama3-8b-shape-q4_0.gguf".to_string()
    } else {
        format!("llama3-8b-shape-{layers}l-q4_0.gguf")
    };
    let path = dir.join(name);
    let specs = tensors(layers);
    let md = metadata(layers)?;
    let (head, offsets) = header(&md, &specs);
    let last = specs.last().expect("tensors");
    let size = head.len() as u64 + aligned(offsets.last().expect("tensors") + last.bytes());
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok((path, size, None));
    }
    let t = Instant::now();
    write_gguf(&path, &head, &specs, &offsets)?;
    Ok((path, size, Some(t.elapsed().as_secs_f64())))
}

// ---- the measurements

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

fn last_logits(out: lqa::model::Output) -> anyhow::Result<Vec<f32>> {
    let l = out.logits.context("no logits")?;
    Ok(l.to_vec2::<f32>()?.swap_remove(0))
}

/// One prefill of `ids` into a fresh KV cache, then `decode` greedy single-token steps with
/// it: (prefill seconds, decode seconds, the tokens generated).
fn prefill_decode(m: &Model, ids: &[u32], decode: usize) -> anyhow::Result<(f64, f64, Vec<u32>)> {
    let mut cache = KvCache::new(m.n_layers());
    let input = Input::left_padded(&[ids.to_vec()], 0, &Device::Cpu)?.with_logits(Logits::Last);
    let t = Instant::now();
    let logits = last_logits(m.forward(&input, Some(&mut cache), None)?)?;
    let pre = t.elapsed().as_secs_f64();
    let mut tok = argmax(&logits);
    let mut toks = vec![tok];
    let t = Instant::now();
    for step in 0..decode {
        let input = Input {
            ids: Tensor::from_vec(vec![tok], (1, 1), &Device::Cpu)?,
            pads: vec![0],
            offset: ids.len() + step,
            logits: Logits::Last,
            differentiable: false,
            stop_after_layer: None,
            dropout: None,
            recompute: false,
        };
        tok = argmax(&last_logits(m.forward(&input, Some(&mut cache), None)?)?);
        toks.push(tok);
    }
    Ok((pre, t.elapsed().as_secs_f64(), toks))
}

/// A decoder on the target's own weights (shared, not copied) with a random LoRA of the
/// paper's shape (r 16, alpha 32, every projection and the lm_head): `A` as PEFT initialises
/// it, `B` uniform in +-0.05 instead of zeros, so that the decoder differs from its target.
fn random_decoder(lm: Arc<LanguageModel>, read: usize) -> anyhow::Result<Decoder> {
    let mut d = Decoder::untrained(lm, read, 0);
    let adapter = Adapter::new(&d.model, LoraConfig::paper_decoder(), 7)?;
    for (i, w) in adapter.layers.values().enumerate() {
        let mut g = SplitMix64::derive(SEED ^ 0x10AA, i as u64);
        let v: Vec<f32> = (0..w.b.elem_count())
            .map(|_| ((g.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1)
            .collect();
        w.b.set(&Tensor::from_vec(v, w.b.dims(), &Device::Cpu)?)?;
    }
    adapter.attach(&mut d.model)?;
    Ok(d)
}

fn main() -> anyhow::Result<()> {
    common::main(bench)
}

fn bench() -> anyhow::Result<()> {
    let layers: usize = match std::env::var("LQA_SCALE_LAYERS") {
        Ok(s) => s.parse().context("LQA_SCALE_LAYERS")?,
        Err(_) => LAYERS,
    };
    anyhow::ensure!(layers >= 1, "LQA_SCALE_LAYERS must be at least 1");
    let runs = common::runs(3).max(1);
    println!(
        "lqa scale benchmark: Llama-3-8B shape ({layers} layers, d_model {D}, {HEADS} heads / \
         {KV_HEADS} KV heads, FFN {FFN}, vocabulary {VOCAB}), random Q4_0 weights, weights \
         \"native\", {} threads",
        candle_core::utils::get_num_threads(),
        FFN = FF
    );

    let (path, size, wrote) = scale_file(layers)?;
    let gib = size as f64 / (1u64 << 30) as f64;
    match wrote {
        Some(s) => {
            println!(
                "file {} ({gib:.2} GiB): written in {s:.1} s ({:.0} MB/s)",
                path.display(),
                size as f64 / s / 1e6
            );
            report("scale_write", s, "s", rss_mib("VmHWM:"));
        }
        None => println!(
            "file {} ({gib:.2} GiB): reused (exists with the expected size)",
            path.display()
        ),
    }

    // Measured before the model is loaded (1 GiB, which never adds to the model's RSS) and
    // again right after decoding (256 MiB); the bound takes the higher, so that a measurement
    // disturbed by other jobs cannot flatter the decode.
    let bw_before = common::bandwidth_gbs(1 << 30);
    println!("memory bandwidth before the load: {bw_before:.1} GB/s (best of 5 streaming reads of 1 GiB)");

    reset_peak();
    let t = Instant::now();
    let lm = Arc::new(LanguageModel::load(
        path.to_str().context("non-UTF-8 path")?,
        &LoadOptions::default().with_weights("native", false)?,
    )?);
    let load_s = t.elapsed().as_secs_f64();
    let (rss_load, peak_load) = (rss_mib("VmRSS:"), rss_mib("VmHWM:"));
    let m = &lm.model;
    let all_bytes: usize = m.weight_bytes().values().sum();
    // what one decoded token reads: every linear weight, the lm_head included (the embedding
    // gives one row; the KV cache is left out)
    let linear_bytes: usize = m
        .linear_ids()
        .into_iter()
        .filter_map(|id| m.linear_at(id).map(|l| l.storage_kind().1))
        .sum();
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    println!(
        "load {load_s:.2} s: RSS after load {rss_load:.0} MiB, peak during load {peak_load:.0} MiB; \
         weights {:.0} MiB ({:?}), of which linear (read per decoded token) {:.0} MiB",
        mib(all_bytes),
        m.weight_bytes()
            .iter()
            .map(|(k, &b)| format!("{k} {:.0} MiB", mib(b)))
            .collect::<Vec<_>>(),
        mib(linear_bytes)
    );
    report("scale_load", load_s, "s", peak_load);

    let mut ids = lm.tokenizer.encode(PROMPT)?;
    while ids.len() < PREFILL {
        ids.extend(ids.clone());
    }
    ids.truncate(PREFILL);

    // warm-up: one prefill
    let (warm, _, _) = prefill_decode(m, &ids, 0)?;
    println!("warm-up prefill {warm:.2} s");
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    let mut tokens: Option<Vec<u32>> = None;
    let mut same_tokens = true;
    for _ in 0..runs {
        let (p, d, toks) = prefill_decode(m, &ids, DECODE)?;
        pre.push(p);
        dec.push(d);
        if let Some(t0) = &tokens {
            same_tokens &= *t0 == toks;
        }
        tokens = Some(toks);
    }
    let peak_gen = rss_mib("VmHWM:");
    let rss_gen = rss_mib("VmRSS:");
    let bw_after = common::bandwidth_gbs(256 << 20);
    let bw = bw_before.max(bw_after);
    let pre_tps = PREFILL as f64 / median(pre.clone());
    let dec_tps = DECODE as f64 / median(dec.clone());
    let bound = bw * 1e9 / linear_bytes as f64;
    println!(
        "prefill {PREFILL} tokens: {pre_tps:.2} tok/s (median of {runs}; runs {:?} s)",
        common::rounded(&pre)
    );
    println!(
        "greedy decode {DECODE} tokens (KV cache, single-token steps): {dec_tps:.3} tok/s \
         (median of {runs}; runs {:?} s); same tokens every run: {same_tokens}",
        common::rounded(&dec)
    );
    println!(
        "RSS after prefill and decode {rss_gen:.0} MiB (peak so far {peak_gen:.0} MiB); memory \
         bandwidth after decoding {bw_after:.1} GB/s (256 MiB)"
    );
    println!(
        "bandwidth bound: {bw:.1} GB/s (the higher of {bw_before:.1} and {bw_after:.1}) / \
         {:.0} MiB of linear weights = {bound:.3} tok/s; decode at {:.2} of it (target 0.8)",
        mib(linear_bytes),
        dec_tps / bound
    );
    report("scale_bandwidth", bw, "GB/s", peak_gen);
    report("scale_prefill", pre_tps, "tok/s", peak_gen);
    report("scale_decode", dec_tps, "tok/s", peak_gen);
    report("scale_decode_bound", bound, "tok/s", peak_gen);
    report(
        "scale_decode_fraction_of_bound",
        dec_tps / bound,
        "ratio",
        peak_gen,
    );

    // one hook capture: the residual stream after the middle block (15 of 32)
    let mid = layers / 2;
    let point = HookPoint::resid_post(mid);
    let dialog = vec![Message::new(
        "user",
        "Pretend you are a pirate. Now tell me how to bake a loaf of sourdough bread at home.",
    )];
    let prompt = lm.chat_prompt(&dialog, true)?;
    let t = Instant::now();
    let (captured, _) = lm.run_with_cache(std::slice::from_ref(&prompt), &[point])?;
    let hook_s = t.elapsed().as_secs_f64();
    let act = captured.get(&point).context("nothing captured")?;
    let norm = act.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    println!(
        "hook capture {}: {hook_s:.2} s ({:?}, norm {norm:.1})",
        point,
        act.dims()
    );
    report("scale_hook_capture", hook_s, "s", rss_mib("VmHWM:"));

    // one LatentQA read: a random-LoRA decoder on the same weights
    let t = Instant::now();
    let d = random_decoder(lm.clone(), mid)?;
    let build_s = t.elapsed().as_secs_f64();
    let mut o = d.ask_options();
    o.gen.max_new_tokens = READ_TOKENS;
    o.gen.stop_ids.clear();
    let question = "What type of persona will the assistant adopt?".to_string();
    let (rss_dec, peak_dec) = (rss_mib("VmRSS:"), rss_mib("VmHWM:"));
    let questions = std::slice::from_ref(&question);
    let t = Instant::now();
    let reading = d.read(&dialog, o.patch_all, o.read_layer)?;
    let target_s = t.elapsed().as_secs_f64();
    let answer = d.answer_tokens(&reading, questions, &o.gen, Activations::Read)?;
    let read_s = t.elapsed().as_secs_f64();
    let peak = rss_mib("VmHWM:");
    println!(
        "LatentQA read: {read_s:.2} s (the target to block {mid} on {} read-prompt tokens: \
         {target_s:.2} s; the decoder, a random r-16 LoRA on every projection and the lm_head, \
         on a {}-token prompt with {} activations patched, one question, {} new tokens: {:.2} \
         s); building the decoder {build_s:.2} s; RSS after building it {rss_dec:.0} MiB, peak \
         RSS before the read {peak_dec:.0} MiB, after it {peak:.0} MiB; answer ids {:?}",
        reading.read.ids.len(),
        d.question_prompt(reading.read.n_patch(), &question, reading.layer)?
            .ids
            .len(),
        reading.read.n_patch(),
        answer[0].len(),
        read_s - target_s,
        answer[0]
    );
    report("scale_read", read_s, "s", peak);
    // the decoder's share split once more (not part of the read's figure): its prompt with one
    // new token, the rest being the adapted single-token steps
    let mut one = o.gen.clone();
    one.max_new_tokens = 1;
    let t = Instant::now();
    d.answer_tokens(&reading, questions, &one, Activations::Read)?;
    let first_s = t.elapsed().as_secs_f64();
    let step_s = (read_s - target_s - first_s) / (READ_TOKENS - 1) as f64;
    println!(
        "  of the decoder's {:.2} s: its prompt and first token {first_s:.2} s, then {step_s:.3} \
         s per token = {:.2} tok/s with the LoRA unmerged (plain decode above: {dec_tps:.2} tok/s)",
        read_s - target_s,
        1.0 / step_s
    );
    println!(
        "peak RSS since before the load (VmHWM): {peak:.0} MiB = {:.2} GiB (target <= 5.5 GiB); \
         RSS now {:.0} MiB",
        peak / 1024.0,
        rss_mib("VmRSS:")
    );
    report("scale_peak_rss", peak, "MiB", peak);
    Ok(())
}
