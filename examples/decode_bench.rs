//! Decode + augment benchmark of the training data path, one thread.
//!
//! Purpose: images/s per core of exactly what the reader does per training sample,
//! [`devise::data::image::decode_train`] (JPEG decode, reduced-scale when the crop allows,
//! RandomResizedCrop to `s x s`, horizontal flip, normalise to CHW `f32`), side by side with
//! torchvision (`bench/decode_torchvision.py`, same files, same JSON line);
//! `bench/decode.sh` runs both interleaved and prints the comparison table.
//!
//! Every file of the directory is read into memory first (no I/O in the timed part), then
//! decoded once as a warm-up, then the whole set is processed in passes until at least
//! `DECODE_BENCH_SECS` (default 3) seconds have passed. Crops come from a seeded
//! ChaCha8 stream per pass (`seed = pass`), RandomResizedCrop area scale `(DECODE_MIN_SCALE, 1)`
//! (default 0.08, torchvision's default), ratio 3/4..4/3, output side `DECODE_SIZE` (default 224);
//! `DECODE_MIN_SHORT_SIDE=448` keeps only images whose shorter side is at least 448 px.
//! Prints one JSON line: `{"impl":"devise","dct_scaling":..,"size":..,"min_scale":..,"images":..,"passes":..,"seconds":..,
//! "cpu_seconds":..,"images_per_sec":..,"images_per_cpu_sec":..}`: wall-clock and CPU-time rates
//! (on a shared machine the CPU-time rate is the steadier "per core" figure).
//!
//! Run (normally through `bash bench/decode.sh`):
//! ```text
//! export LIBTORCH=$PWD/.deps/libtorch && cargo build --release --example decode_bench
//! target/release/examples/decode_bench ../shared/data/imagenet-sample-100          # DCT scaling on
//! DECODE_DCT_SCALING=0 target/release/examples/decode_bench ../shared/data/imagenet-sample-100
//! ```
use std::time::Instant;

use anyhow::{bail, Context, Result};
use devise::data::image::decode_train;
use devise::data::Config;
use rand::SeedableRng;

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T> {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .ok()
            .with_context(|| format!("{key}={v} does not parse")),
        Err(_) => Ok(default),
    }
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: decode_bench <image directory>")?;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    let images: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|p| Ok((p.display().to_string(), std::fs::read(p)?)))
        .collect::<Result<_>>()?;
    // DECODE_MIN_SHORT_SIDE=448: only images whose shorter side is at least that (pixels).
    let min_side: u32 = env_or("DECODE_MIN_SHORT_SIDE", 0)?;
    let mut images = images;
    images.retain(|(_, bytes)| {
        image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok())
            .is_some_and(|(w, h)| w.min(h) >= min_side)
    });
    if images.is_empty() {
        bail!("no images in {dir} (with a shorter side >= {min_side})");
    }
    let mut cfg = Config::new("unused", env_or("DECODE_SIZE", 224)?);
    cfg.min_crop_scale = env_or("DECODE_MIN_SCALE", 0.08)?;
    cfg.jpeg_dct_scaling = env_or::<u8>("DECODE_DCT_SCALING", 1)? != 0;
    cfg.validate()?;
    let min_secs: f64 = env_or("DECODE_BENCH_SECS", 3.0)?;
    let s = cfg.image_size as usize;
    let mut out = vec![0f32; 3 * s * s];
    let mut checksum = 0f64;
    let mut pass = |seed: u64, out: &mut [f32]| -> Result<()> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for (name, bytes) in &images {
            decode_train(bytes, &cfg, &mut rng, out).with_context(|| name.clone())?;
            checksum += out[0] as f64; // keeps the work observable
        }
        Ok(())
    };
    pass(u64::MAX, &mut out)?; // warm-up
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let mut passes = 0u64;
    while passes == 0 || start.elapsed().as_secs_f64() < min_secs {
        pass(passes, &mut out)?;
        passes += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    let n = passes * images.len() as u64;
    println!(
        "{{\"impl\":\"devise\",\"dct_scaling\":{},\"size\":{s},\"min_scale\":{},\"images\":{},\"passes\":{passes},\"seconds\":{seconds:.3},\"cpu_seconds\":{cpu:.3},\"images_per_sec\":{:.1},\"images_per_cpu_sec\":{:.1},\"checksum\":{checksum:.3}}}",
        cfg.jpeg_dct_scaling,
        cfg.min_crop_scale,
        images.len(),
        n as f64 / seconds,
        n as f64 / cpu,
    );
    Ok(())
}

/// CPU time of this process (all threads; here one), seconds: `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`.
fn cpu_seconds() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID)");
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}
