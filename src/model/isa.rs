//! Which x86 vector width lqa's own kernels may use: AVX-512 where the CPU has it, unless
//! `LQA_ISA=avx2` asks for the AVX2 kernels (to measure the AVX2 path on an AVX-512 machine,
//! as users with AVX2-only CPUs run it). It governs the packed f32 projections
//! (`super::packed`) and the quantized matrix-vector kernels (`super::qgemv`); candle's and
//! gemm's other products keep their own detection.

use std::sync::OnceLock;

/// May lqa's kernels use AVX-512 (the CPU has AVX-512F and `LQA_ISA` is not `avx2`)?
pub fn avx512() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::env::var("LQA_ISA").map_or(true, |v| v != "avx2")
                && is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}
