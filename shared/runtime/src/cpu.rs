//! The CPU the binary was built for. The workspace compiles for x86-64-v3 (AVX2, FMA;
//! `.cargo/config.toml`), because the CPU engine's quantized matmuls get their SIMD from the
//! compiler; on a CPU without those instructions such a binary would die of an illegal
//! instruction somewhere inside. This check runs first and says so instead.

/// Exits with a message naming the missing CPU features and how to build for this CPU, if the
/// binary was compiled for instructions this CPU lacks. A baseline build checks nothing.
pub fn require_cpu_features() {
    // Asked of the CPU itself: `is_x86_feature_detected!` answers from the build's own target
    // features, which are exactly what is in question here.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
    {
        use std::arch::x86_64::__cpuid_count;
        let basic = __cpuid_count(1, 0);
        let extended = __cpuid_count(7, 0);
        let (fma, avx) = (basic.ecx & (1 << 12) != 0, basic.ecx & (1 << 28) != 0);
        let avx2 = extended.ebx & (1 << 5) != 0;
        if !(fma && avx && avx2) {
            missing();
        }
    }
}

/// Kept out of line and free of formatting, so that nothing before the check needs the
/// instructions it checks for.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
#[cold]
#[inline(never)]
fn missing() -> ! {
    use std::io::Write;
    let _ = std::io::stderr().write_all(
        b"tandem: this build uses AVX2 and FMA (x86-64-v3), which this CPU does not have.\n\
          Build for this CPU instead: RUSTFLAGS=\"-C target-cpu=native\" cargo build --release -p tandem\n",
    );
    std::process::exit(1)
}
