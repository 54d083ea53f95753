//! How a tensor prints: `Tensor[2, 3] f32 [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]`, at most
//! [`PREVIEW`] elements per dimension (`to_string`, `to_debug`, `print`).

use std::fmt;

use rhai::Engine;

use super::value::ScriptTensor;

/// Elements shown per dimension when a tensor is printed.
const PREVIEW: usize = 6;

impl ScriptTensor {
    fn preview(&self) -> crate::Result<String> {
        let mut t = self.0.clone();
        for (d, &n) in self.dims().iter().enumerate() {
            if n > PREVIEW {
                t = t.narrow(d, 0, PREVIEW)?;
            }
        }
        let values = ScriptTensor(t).values_f64()?;
        let is_int = self.0.dtype().is_int();
        let mut out = String::new();
        write_preview(&mut out, self.dims(), &values, is_int);
        Ok(out)
    }
}

impl fmt::Display for ScriptTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.preview() {
            Ok(p) => write!(f, "{} {p}", self.describe()),
            Err(e) => write!(f, "{} <{e}>", self.describe()),
        }
    }
}

impl fmt::Debug for ScriptTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `values` (the first `min(n, PREVIEW)` of every dim, row-major) printed with `...` where
/// `dims` has more.
fn write_preview(out: &mut String, dims: &[usize], values: &[f64], is_int: bool) {
    let Some((&n, rest)) = dims.split_first() else {
        out.push_str(&fmt_num(
            values.first().copied().unwrap_or(f64::NAN),
            is_int,
        ));
        return;
    };
    let shown = n.min(PREVIEW);
    let stride: usize = rest.iter().map(|&d| d.min(PREVIEW)).product();
    out.push('[');
    for i in 0..shown {
        if i > 0 {
            out.push_str(", ");
        }
        write_preview(out, rest, &values[i * stride..(i + 1) * stride], is_int);
    }
    if n > shown {
        out.push_str(", ...");
    }
    out.push(']');
}

fn fmt_num(x: f64, is_int: bool) -> String {
    if is_int {
        return format!("{}", x as i64);
    }
    if !x.is_finite() {
        return format!("{x}").to_lowercase();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e5).contains(&a) {
        return format!("{x:.3e}");
    }
    let s = format!("{x:.4}");
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_string()
    }
}

pub(super) fn register(engine: &mut Engine) {
    engine.register_fn("to_string", |t: &mut ScriptTensor| t.to_string());
    engine.register_fn("to_debug", |t: &mut ScriptTensor| t.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn number_format() {
        assert_eq!(fmt_num(0.1, false), "0.1");
        assert_eq!(fmt_num(2.0, false), "2.0");
        assert_eq!(fmt_num(0.123456, false), "0.1235");
        assert_eq!(fmt_num(1e-7, false), "1.000e-7");
        assert_eq!(fmt_num(3.0, true), "3");
    }

    #[test]
    fn preview_truncates() {
        let t = ScriptTensor(Tensor::arange(0f32, 20., &Device::Cpu).unwrap());
        assert_eq!(
            t.to_string(),
            "Tensor[20] f32 [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, ...]"
        );
        let t =
            ScriptTensor(Tensor::new(&[[0.1f32, 0.2, 0.3], [1., 2., 3.]], &Device::Cpu).unwrap());
        assert_eq!(
            t.to_string(),
            "Tensor[2, 3] f32 [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]"
        );
        let t = ScriptTensor(Tensor::new(0.5f32, &Device::Cpu).unwrap());
        assert_eq!(t.to_string(), "Tensor[] f32 0.5");
    }
}
