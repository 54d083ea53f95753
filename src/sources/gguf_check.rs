//! A GGUF header check run before candle's reader: the header is walked with every length and
//! count bounded by the bytes left in the file, nothing is allocated from a declared size, and
//! every tensor must lie inside the file. What candle would trip on (an alignment of 0, a shape
//! whose product overflows, an empty tensor, a row that is not a whole number of quantized
//! blocks, a tensor past the end of the file) is an error naming the file and the tensor.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::{Error, Result};

/// One tensor as the header declares it, in candle's dimension order (outermost first).
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    /// Bytes of the tensor's data in the file.
    pub bytes: u64,
}

const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 64;
/// Keys are names: a longer one is a corrupt file.
const MAX_KEY: u64 = 1 << 16;

/// The GGML types candle reads, by their GGUF code.
pub fn ggml_dtype(code: u32) -> Option<GgmlDType> {
    Some(match code {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

struct Walker<R> {
    r: R,
    pos: u64,
    size: u64,
    /// GGUF v1 has u32 lengths, later versions u64.
    wide: bool,
}

impl<R: Read + Seek> Walker<R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }
    fn need(&self, n: u64, what: &str) -> std::result::Result<(), String> {
        if n > self.left() {
            Err(format!(
                "{what} needs {n} bytes at offset {}, only {} left in the file",
                self.pos,
                self.left()
            ))
        } else {
            Ok(())
        }
    }
    fn bytes<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|e| format!("{what}: {e}"))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }
    fn len(&mut self, what: &str) -> std::result::Result<u64, String> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }
    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        self.need(n, what)?;
        self.r
            .seek(SeekFrom::Current(n as i64))
            .map_err(|e| format!("{what}: {e}"))?;
        self.pos += n;
        Ok(())
    }
    /// A string of at most `max` bytes (longer ones are skipped and reported as `None`).
    fn string(&mut self, what: &str, max: u64) -> std::result::Result<Option<String>, String> {
        let n = self.len(what)?;
        self.need(n, what)?;
        if n > max {
            self.skip(n, what)?;
            return Ok(None);
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|e| format!("{what}: {e}"))?;
        self.pos += n;
        Ok(Some(String::from_utf8_lossy(&v).into_owned()))
    }
    /// Skip a metadata value of type `ty`; returns it as an integer when it is one (for the
    /// alignment).
    fn value(
        &mut self,
        ty: u32,
        what: &str,
        depth: usize,
    ) -> std::result::Result<Option<i128>, String> {
        if depth > MAX_DEPTH {
            return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
        }
        Ok(match ty {
            0 => Some(self.bytes::<1>(what)?[0] as i128),
            1 => Some(self.bytes::<1>(what)?[0] as i8 as i128),
            2 => Some(u16::from_le_bytes(self.bytes::<2>(what)?) as i128),
            3 => Some(i16::from_le_bytes(self.bytes::<2>(what)?) as i128),
            4 => Some(self.u32(what)? as i128),
            5 => Some(self.u32(what)? as i32 as i128),
            6 => {
                self.skip(4, what)?;
                None
            }
            7 => {
                let b = self.bytes::<1>(what)?[0];
                if b > 1 {
                    return Err(format!("{what}: bool value {b}"));
                }
                None
            }
            8 => {
                let n = self.len(what)?;
                self.skip(n, what)?;
                None
            }
            9 => {
                let elem = self.u32(what)?;
                let n = self.len(what)?;
                // every element takes at least one byte
                self.need(n, what)?;
                if matches!(elem, 0..=7 | 10..=12) {
                    let size: u64 = match elem {
                        0 | 1 | 7 => 1,
                        2 | 3 => 2,
                        4..=6 => 4,
                        _ => 8,
                    };
                    if elem == 7 {
                        for _ in 0..n {
                            self.value(7, what, depth + 1)?;
                        }
                    } else {
                        self.skip(n.saturating_mul(size), what)?;
                    }
                } else {
                    for _ in 0..n {
                        self.value(elem, what, depth + 1)?;
                    }
                }
                None
            }
            10 | 11 => {
                let v = self.u64(what)?;
                Some(if ty == 10 {
                    v as i128
                } else {
                    v as i64 as i128
                })
            }
            12 => {
                self.skip(8, what)?;
                None
            }
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

/// Walk a GGUF file's header and check every tensor lies inside the file; return the tensors.
pub fn validate(path: &Path) -> Result<Vec<GgufTensor>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    validate_reader(BufReader::new(file), size)
        .map_err(|m| Error::bad_file(path, format!("not a readable GGUF file: {m}")))
}

/// [`validate`] on any reader of `size` bytes.
pub fn validate_reader<R: Read + Seek>(
    r: R,
    size: u64,
) -> std::result::Result<Vec<GgufTensor>, String> {
    let mut w = Walker {
        r,
        pos: 0,
        size,
        wide: true,
    };
    let magic = w.u32("magic")?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(format!("bad magic 0x{magic:08x} (expected GGUF)"));
    }
    let version = w.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(format!("unsupported GGUF version {version}"));
    }
    w.wide = version > 1;
    let n_tensors = w.len("tensor count")?;
    let n_kv = w.len("metadata count")?;
    // each entry takes at least a few bytes: counts the file cannot hold are corrupt
    w.need(n_kv.saturating_mul(9), "the metadata entries")?;
    w.need(n_tensors.saturating_mul(20), "the tensor entries")?;
    // candle's default, and the types it reads the alignment from
    let mut alignment: i128 = 32;
    for i in 0..n_kv {
        let key = w
            .string(&format!("metadata key {i}"), MAX_KEY)?
            .ok_or_else(|| format!("metadata key {i} is longer than {MAX_KEY} bytes"))?;
        let ty = w.u32(&format!("metadata `{key}` type"))?;
        let v = w.value(ty, &format!("metadata `{key}`"), 0)?;
        if key == "general.alignment" {
            alignment = match (ty, v) {
                (0..=5, Some(v)) if v >= 0 => v,
                _ => 32,
            };
        }
    }
    if alignment == 0 {
        return Err("metadata `general.alignment` is 0".to_string());
    }
    let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
    let mut ends = Vec::with_capacity(tensors.capacity());
    for i in 0..n_tensors {
        let name = w
            .string(&format!("tensor {i} name"), MAX_KEY)?
            .ok_or_else(|| format!("tensor {i}: name longer than {MAX_KEY} bytes"))?;
        let what = format!("tensor `{name}`");
        let n_dims = w.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(format!(
                "{what} has {n_dims} dimensions (at most {MAX_DIMS})"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = w.len(&what)?;
            dims.push(usize::try_from(d).map_err(|_| format!("{what}: dimension {d} too large"))?);
        }
        let code = w.u32(&what)?;
        let dtype = ggml_dtype(code).ok_or_else(|| format!("{what}: unknown type {code}"))?;
        let offset = w.u64(&what)?;
        // GGUF stores dims innermost first; rows must be whole blocks
        let block = dtype.block_size();
        if let Some(&row) = dims.first() {
            if row % block != 0 {
                return Err(format!(
                    "{what}: rows of {row} elements are not whole {dtype:?} blocks of {block}"
                ));
            }
        }
        let elems = crate::budget::elem_count(&dims)
            .ok_or_else(|| format!("{what}: the shape {dims:?} overflows"))?;
        // candle views the bytes of an empty tensor through a dangling, misaligned pointer
        if elems == 0 {
            return Err(format!("{what} has no elements (shape {dims:?})"));
        }
        if elems % block != 0 {
            return Err(format!(
                "{what}: {elems} elements are not whole {dtype:?} blocks of {block}"
            ));
        }
        let bytes = ((elems / block) as u64)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| format!("{what}: size overflows"))?;
        // dequantized to f32 the tensor must be addressable too
        (elems as u64)
            .checked_mul(4)
            .filter(|&b| b <= isize::MAX as u64)
            .ok_or_else(|| format!("{what}: {elems} elements are more than memory can address"))?;
        dims.reverse();
        ends.push((what, offset, bytes));
        tensors.push(GgufTensor {
            name,
            dims,
            dtype,
            bytes,
        });
    }
    let align = alignment as u64;
    let data = w.pos.div_ceil(align).saturating_mul(align);
    for (what, offset, bytes) in ends {
        let end = data
            .checked_add(offset)
            .and_then(|s| s.checked_add(bytes))
            .ok_or_else(|| format!("{what}: offset {offset} overflows"))?;
        if end > size {
            return Err(format!(
                "{what} declares {bytes} bytes at offset {}, past the end of the file ({size} bytes)",
                data.saturating_add(offset)
            ));
        }
    }
    Ok(tensors)
}
