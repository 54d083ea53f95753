//! `Tensor`: candle tensors in scripts.
//!
//! Construction: `tensor(nested_array)` (f32), `zeros(shape)`, `ones(shape)`, `randn(shape, seed)`,
//! `load_tensor(path)`, `load_tensors(path)` (a map). Properties: `shape`, `dtype`, `rank`.
//! Indexing `t[i]` selects along dim 0 and drops it (negative `i` counts from the end);
//! `slice(start, end)` (dim 0), `narrow(dim, start, len)`, `select(dim, i)`, `reshape(shape)`
//! (one `-1` is inferred), `transpose(d1, d2)`. Arithmetic `+ - * /` between tensors
//! (broadcasting) and with numbers on either side, unary `-`. Reductions to numbers: `sum()`,
//! `mean()`, `std()` (population), `max()`, `min()`, `argmax()` (flat index), `norm()`,
//! `dot(t)`, `cosine(t)`, `item()`; to tensors: `sum(dim)`, `mean(dim)`, `norm(dim)`.
//! `topk(k)` gives `[index, value]` pairs of a 1-D tensor. `to_array()`, `to_f32()`,
//! `to_dtype(name)`, `save(path)`, `save_tensors(map, path)`.
//!
//! Other bindings return tensors with [`to_dynamic`] and take them with [`from_dynamic`].
//!
//! One file per concern, each registering the functions it defines: `value` (the type and its
//! properties), `construct`, `views`, `ops` (arithmetic), `reduce`, `convert`, `format`
//! (printing), `io` (files); `args` holds the argument checks they share.

mod args;
mod construct;
mod convert;
mod format;
mod io;
mod ops;
mod reduce;
mod value;
mod views;

use rhai::Engine;

pub use io::SINGLE_KEY;
pub use value::{from_dynamic, to_dynamic, ScriptTensor};

/// Register the type `Tensor` and every function on it.
pub fn register(engine: &mut Engine) {
    value::register(engine);
    format::register(engine);
    construct::register(engine);
    views::register(engine);
    ops::register(engine);
    reduce::register(engine);
    convert::register(engine);
    io::register(engine);
}
