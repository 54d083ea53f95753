//! Large `f32` buffers on 2 MiB pages where the kernel gives them (Linux transparent huge
//! pages in `always` or `madvise` mode): the packed weights, and large tensors moved there.
//!
//! A forward streams every weight once from memory. On 4 KiB pages each page of a weight
//! panel costs a TLB miss and the hardware prefetchers stop at every page boundary, so the
//! start of every panel waits on memory. On the default model 2 MiB pages gave +5 % prefill and
//! +15-20 % decode. Elsewhere (another OS, THP off) the buffers are ordinary memory.
//!
//! Packed weights are carved from chunks of [`CHUNK`] bytes mapped for the purpose (a layer's
//! k/v projections are 0.4 MiB: each on its own huge page would waste most of it); a chunk is
//! unmapped when the last buffer carved from it is dropped.

use std::sync::{Arc, Mutex, Weak};

/// A huge page.
const HUGE: usize = 2 << 20;
/// Bytes mapped at a time for the buffers carved from chunks.
const CHUNK: usize = 64 << 20;
/// Buffers below this size are ordinary allocations.
const SMALL: usize = 256 << 10;

/// An anonymous mapping, aligned to and advised onto huge pages before any of it is touched.
struct Mapping {
    base: *mut u8,
    size: usize,
}

// SAFETY: a Mapping is plain memory owned by whoever holds it; disjoint buffers are written
// through disjoint HugeBufs.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `size` bytes (a multiple of [`HUGE`]) of zeros, or `None` where mapping fails.
    #[cfg(target_os = "linux")]
    fn new(size: usize) -> Option<Self> {
        // SAFETY: a fresh private anonymous mapping; the unaligned head and tail are unmapped,
        // which leaves exactly [start, start + size) mapped, owned by the returned value.
        unsafe {
            let raw = libc::mmap(
                std::ptr::null_mut(),
                size + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if raw == libc::MAP_FAILED {
                return None;
            }
            let base = raw as usize;
            let start = base.next_multiple_of(HUGE);
            if start > base {
                libc::munmap(raw, start - base);
            }
            let end = base + size + HUGE;
            if end > start + size {
                libc::munmap((start + size) as *mut libc::c_void, end - start - size);
            }
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
            Some(Mapping {
                base: start as *mut u8,
                size,
            })
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_size: usize) -> Option<Self> {
        None
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        // SAFETY: mapped in `new` with this size; no buffer carved from it is alive.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size);
        }
    }
}

/// The chunk being carved and the bytes of it already given out.
static CURRENT: Mutex<(Weak<Mapping>, usize)> = Mutex::new((Weak::new(), 0));

enum Owner {
    /// Carved from a mapping (held alive by this buffer).
    Mapped(#[allow(dead_code)] Arc<Mapping>),
    /// A `Vec<f32>` of capacity `len`, left undropped.
    Vec,
}

/// `len` f32 values owned like a `Vec<f32>`'s, on huge pages when large.
pub struct HugeBuf {
    ptr: *mut f32,
    len: usize,
    owner: Owner,
}

// SAFETY: HugeBuf owns its values exclusively, like a Vec<f32>.
unsafe impl Send for HugeBuf {}
unsafe impl Sync for HugeBuf {}

/// Whether large buffers go on huge pages (`LQA_HUGE=0` turns it off, for A/B measurements).
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !std::env::var("LQA_HUGE").is_ok_and(|v| v == "0"))
}

impl HugeBuf {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        let bytes = (len * 4).next_multiple_of(64);
        if bytes >= SMALL && enabled() {
            if let Some((ptr, m)) = Self::carve(bytes) {
                return HugeBuf {
                    ptr,
                    len,
                    owner: Owner::Mapped(m),
                };
            }
        }
        let mut v = std::mem::ManuallyDrop::new(vec![0f32; len]);
        HugeBuf {
            ptr: v.as_mut_ptr(),
            len,
            owner: Owner::Vec,
        }
    }

    /// `bytes` (a multiple of 64) of never-used zeros: the rest of the current chunk, a new
    /// chunk, or a mapping of their own when they are a large part of a chunk.
    fn carve(bytes: usize) -> Option<(*mut f32, Arc<Mapping>)> {
        if bytes > CHUNK / 4 {
            let m = Arc::new(Mapping::new(bytes.next_multiple_of(HUGE))?);
            return Some((m.base as *mut f32, m));
        }
        let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let m = match cur.0.upgrade() {
            Some(m) if cur.1 + bytes <= m.size => m,
            _ => {
                let m = Arc::new(Mapping::new(CHUNK)?);
                *cur = (Arc::downgrade(&m), 0);
                m
            }
        };
        // SAFETY: [used, used + bytes) lies inside the mapping and was given to no one.
        let ptr = unsafe { m.base.add(cur.1) } as *mut f32;
        cur.1 += bytes;
        Some((ptr, m))
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        if let Owner::Vec = self.owner {
            // SAFETY: the Vec<f32> of capacity `len` left undropped in `zeros`.
            unsafe { drop(Vec::from_raw_parts(self.ptr, self.len, self.len)) }
        }
    }
}

impl std::ops::Deref for HugeBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `len` initialised values (zeros, or written since), owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in deref, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Move the 2 MiB-aligned interior of a large CPU f32 tensor's storage (written already, as a
/// loaded embedding table) onto huge pages, on a thread of its own (the kernel copies it:
/// about 0.15-0.3 s for the default model's 113 MiB table); a no-op where unsupported.
pub fn collapse_in_background(t: &candle_core::Tensor) {
    #[cfg(target_os = "linux")]
    {
        if !enabled() || !t.device().is_cpu() || t.elem_count() * 4 < 2 * HUGE {
            return;
        }
        let t = t.clone();
        let _ = std::thread::Builder::new()
            .name("lqa-huge".into())
            .spawn(move || {
                let (st, _) = t.storage_and_layout();
                let (ptr, bytes) = match &*st {
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                        (v.as_ptr() as usize, v.len() * 4)
                    }
                    candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                        (v.as_ptr() as usize, v.len() * 2)
                    }
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => {
                        (v.as_ptr() as usize, v.len() * 2)
                    }
                    _ => return,
                };
                let start = ptr.next_multiple_of(HUGE);
                let end = (ptr + bytes) / HUGE * HUGE;
                if end > start {
                    // SAFETY: advice on pages of storage this thread keeps alive (the tensor
                    // clone); contents are unchanged.
                    unsafe {
                        let p = start as *mut libc::c_void;
                        libc::madvise(p, end - start, libc::MADV_HUGEPAGE);
                        libc::madvise(p, end - start, 25 /* MADV_COLLAPSE */);
                    }
                }
            });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = t;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers of every size class (ordinary, carved from a chunk, over several chunks, mapped
    /// alone) start as zeros, hold what is written, and never overlap; a chunk outlives the
    /// buffers dropped before it.
    #[test]
    fn buffers_are_zeroed_and_disjoint() {
        let sizes = [
            10usize,
            SMALL / 4 - 3,
            SMALL / 4,
            (1 << 20) + 5,
            CHUNK / 4 / 4 - 1,
            CHUNK / 4 / 4 + 1,
            3 << 20,
        ];
        let mut bufs: Vec<HugeBuf> = Vec::new();
        for round in 0..6 {
            for (i, &n) in sizes.iter().enumerate() {
                let mut b = HugeBuf::zeros(n);
                assert_eq!(b.len(), n);
                assert!(b.iter().all(|&v| v == 0.0), "buffer of {n} not zeroed");
                let tag = (round * sizes.len() + i) as f32;
                b.fill(tag);
                bufs.push(b);
            }
            // drop every other buffer: the rest keep their values
            if round % 2 == 1 {
                let keep: Vec<HugeBuf> = bufs
                    .drain(..)
                    .enumerate()
                    .filter(|(j, _)| j % 2 == 0)
                    .map(|(_, b)| b)
                    .collect();
                bufs = keep;
            }
        }
        let mut seen = std::collections::HashSet::new();
        for b in &bufs {
            let tag = b[0];
            assert!(seen.insert(tag.to_bits()), "two buffers with tag {tag}");
            assert!(b.iter().all(|&v| v == tag), "buffer {tag} overwritten");
        }
    }
}
