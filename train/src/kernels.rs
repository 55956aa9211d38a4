//! burn's CUDA kernels are compiled (NVRTC) and autotuned on first use, which made the first
//! training step of a 170M model take 87-90 s on an H100. cubecl can keep both between runs but
//! does not unless told: with the `cuda` feature, kiln turns its compiled-kernel cache on and
//! keeps it, with the autotune results, in `$KILN_KERNEL_CACHE` (default
//! `~/.cache/kiln/kernels`), unless a `cubecl.toml` or `burn.toml` in the working directory
//! configures cubecl itself.

use std::path::PathBuf;

/// Where compiled kernels and autotune results are kept.
pub fn kernel_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    kiln_sandbox::python_env::kiln_cache_dir().join("kernels")
}

/// What to say while the first step runs on `device`: on a GPU it compiles the kernels (once
/// per machine and shape, then read from [`kernel_cache_dir`]); `None` on the CPU.
pub fn first_step_note(device: &burn::prelude::Device) -> Option<String> {
    let on_cpu = device.clone().inner() == burn::prelude::Device::flex();
    (!on_cpu).then(|| format!("step 1 compiles GPU kernels (kept in {})", kernel_cache_dir().display()))
}

/// Turns cubecl's persistent kernel and autotune caches on, in [`kernel_cache_dir`], before the
/// first device is made (cubecl reads its configuration once).
#[cfg(feature = "cuda")]
pub fn keep_compiled_kernels() {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let own = ["cubecl.toml", "CubeCL.toml", "burn.toml", "Burn.toml"];
        if own.iter().any(|f| std::path::Path::new(f).exists()) {
            return;
        }
        let mut config = CubeClRuntimeConfig::default();
        config.compilation.cache = true;
        config.environment.path = CacheConfig::Directory(kernel_cache_dir());
        // Refused (false) when cubecl was configured already: then that configuration holds.
        let _ = CubeClRuntimeConfig::try_set(config);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_compiles_nothing_at_the_first_step() {
        let cpu = burn::prelude::Device::flex();
        assert_eq!(first_step_note(&cpu), None);
        assert_eq!(first_step_note(&cpu.autodiff()), None);
        assert!(kernel_cache_dir().ends_with("kiln/kernels") || std::env::var_os("KILN_KERNEL_CACHE").is_some());
    }
}
