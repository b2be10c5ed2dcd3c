//! Writes the libtorch rpath into every binary, test and example of this crate, so `cargo test`
//! and `target/*/devise` run without LD_LIBRARY_PATH.
//!
//! libtorch is found where torch-sys found it: `$LIBTORCH` (set by `.cargo/config.toml` to the
//! project's `.deps/libtorch`, which `scripts/setup.sh` creates). `libtorch.so` stays linked with
//! `--no-as-needed`: on a GPU node the same binary, pointed at the PyTorch wheel's `torch/lib`
//! through LD_LIBRARY_PATH, loads the real `libtorch.so`, which pulls in `libtorch_cuda.so`.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup.sh (binaries will need LD_LIBRARY_PATH)");
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-Wl,-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
