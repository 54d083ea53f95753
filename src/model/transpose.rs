//! Strided f32 transposes in 8×8 tiles (AVX where the CPU has it), for the packed backward's
//! panel layouts (`super::packed`): a scalar transpose stores one value per cycle at best, to a
//! new cache line each time; a tile moves 64 values with 8 loads, 24 shuffles and 8 stores.

/// `dst[c * ds + r] = src[r * ss + c]` for `r < rows`, `c < cols`.
///
/// # Safety
/// `src` must be readable at `r * ss + c` and `dst` writable at `c * ds + r` for every such
/// `(r, c)`; the two must not overlap.
pub unsafe fn transpose(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
    rows: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        let (r8, c8) = (rows - rows % 8, cols - cols % 8);
        for c0 in (0..c8).step_by(8) {
            for r0 in (0..r8).step_by(8) {
                tile8(src.add(r0 * ss + c0), ss, dst.add(c0 * ds + r0), ds);
            }
        }
        // the edges: rows past r8 of every column, and columns past c8 of the tiled rows
        scalar(src.add(r8 * ss), ss, dst.add(r8), ds, rows - r8, cols);
        scalar(src.add(c8), ss, dst.add(c8 * ds), ds, r8, cols - c8);
        return;
    }
    scalar(src, ss, dst, ds, rows, cols);
}

unsafe fn scalar(src: *const f32, ss: usize, dst: *mut f32, ds: usize, rows: usize, cols: usize) {
    for c in 0..cols {
        for r in 0..rows {
            *dst.add(c * ds + r) = *src.add(r * ss + c);
        }
    }
}

/// One 8×8 tile: rows of `src` (stride `ss`) to columns of `dst` (stride `ds`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn tile8(src: *const f32, ss: usize, dst: *mut f32, ds: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ss)));
    // pairs of rows interleaved, then pairs of pairs, then the 128-bit halves
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    let out = [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ];
    for (i, o) in out.iter().enumerate() {
        _mm256_storeu_ps(dst.add(i * ds), *o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape up to 19×19 (whole tiles, edges of both kinds, empty), with padded strides,
    /// against the naive loop; nothing outside the destination's window is written.
    #[test]
    fn transpose_matches_the_naive_loop_at_every_edge() {
        for rows in 0..20 {
            for cols in 0..20 {
                let (ss, ds) = (cols + 3, rows + 5);
                let src: Vec<f32> = (0..rows * ss).map(|i| i as f32 * 0.5 + 1.0).collect();
                let mut dst = vec![-7f32; cols * ds + 4];
                // SAFETY: the buffers have the strides' sizes
                unsafe { transpose(src.as_ptr(), ss, dst.as_mut_ptr(), ds, rows, cols) };
                for c in 0..cols {
                    for r in 0..ds {
                        let want = if r < rows { src[r * ss + c] } else { -7.0 };
                        assert_eq!(dst[c * ds + r], want, "{rows}x{cols} at ({r}, {c})");
                    }
                }
                assert!(dst[cols * ds..].iter().all(|&v| v == -7.0));
            }
        }
    }
}
