//! Writes the libtorch rpath into every binary, test and example of this crate, so `cargo test`
//! and `target/*/devise` run without LD_LIBRARY_PATH.
//!
//! libtorch is found where torch-sys found it: `$LIBTORCH` (set by `.cargo/config.toml` to the
//! project's `.deps/libtorch`, which `scripts/setup.sh` creates). `libtorch.so` stays linked with
//! `--no-as-needed`: on a GPU node the same binary, pointed at the PyTorch wheel's `torch/lib`
//! through LD_LIBRARY_PATH, loads the real `libtorch.so`, which pulls in `libtorch_cuda.so`.
//!
//! It also compiles `csrc/gpu_shim.cpp` (autocast dtype, channels-last: libtorch calls tch does
//! not expose; `src/model/gpu.rs`) and `csrc/grad_hooks.cpp` (autograd's post-accumulate-grad
//! hooks and gradient views: `src/collective/reducer.rs`) against libtorch's headers, with
//! torch-sys's flags.
//!
//! And it sets the cfg `devise_no_shared` when the project's real-data folder `../shared/data`
//! is missing: the integration tests that read it are then ignored, with that reason
//! (tests/it/common/mod.rs).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rustc-check-cfg=cfg(devise_no_shared)");
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let shared = Path::new(&root).join("../shared/data");
    if shared.is_dir() {
        // Removing it reruns this script. Cargo treats a missing path as always changed, so it
        // is watched only while it exists (a test reports a folder that appeared after a build).
        println!("cargo:rerun-if-changed={}", shared.display());
    } else {
        println!("cargo:rustc-cfg=devise_no_shared");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/gpu_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/grad_hooks.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup.sh (binaries will need LD_LIBRARY_PATH)");
        return;
    };
    let root = PathBuf::from(libtorch);
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!(
            "-D_GLIBCXX_USE_CXX11_ABI={}",
            std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
        ))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/gpu_shim.cpp")
        .file("csrc/grad_hooks.cpp")
        .compile("devise_gpu_shim");
    let lib = root.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-Wl,-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
