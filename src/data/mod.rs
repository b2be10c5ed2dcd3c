//! Data: ImageFolder trees (and the ILSVRC-2012 validation folder) -> WebDataset tar shards ->
//! decoded, augmented batches.
//!
//! In the order data flows:
//!
//! | module | what lives there |
//! |---|---|
//! | [`synthetic`] | the embedded demo dataset (coloured shapes, with a compositional zero-shot split) |
//! | [`ilsvrc`] | the ILSVRC-2012 validation set as distributed: flat image folder + Kaggle's `LOC_val_solution.csv` -> labelled images |
//! | [`shards`] | `build_shards_from`: ImageFolder and/or ILSVRC val -> `<split>-NNNNNN.tar` + `manifest.json`, planned then built in parallel; `read_manifest` |
//! | [`index`] | a `manifest.json` for WebDataset shards written by other tools (Python `webdataset`) |
//! | [`verify`] | every shard against the manifest: bytes, sha256, samples, `.cls`, class counts, every image decodes |
//! | [`webdataset`] | tar bytes -> samples (`<key>.jpg` + `<key>.cls` + ...), with the failure policy for bad shards |
//! | [`feed`] | one shard streamed from its object (sha256 on the fly) by a thread into a bounded channel |
//! | [`image`] | bytes -> RGB (format sniffing, decompression-bomb guard), train/eval transforms -> CHW `f32` |
//! | [`partition`] | how many partitions a run has, which shards each owns, each partition's endless stream and a rank's interleave of its partitions |
//! | [`reader`] | the deterministic, resumable [`reader::TrainStream`] (cursor!) and [`reader::eval_batches`] |
//! | [`cli`] | `devise data`: the flags and runs of build-shards, verify and index |
//!
//! Nothing here depends on `tch`: a [`reader::Batch`] is a plain `Vec<f32>` `[n, 3, s, s]`.

pub mod cache;
pub mod cli;
pub mod feed;
pub mod ilsvrc;
pub mod image;
pub mod index;
pub mod partition;
pub mod reader;
pub mod shards;
pub mod split;
pub mod synthetic;
pub mod verify;
pub mod webdataset;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use reader::{eval_batches, Batch, Cursor, DataStats, EvalBatches, TrainStream};
pub use shards::{
    build_shards, build_shards_from, read_manifest, BuildOptions, Manifest, ShardInfo, Sources,
    SplitInfo,
};

/// ImageNet channel means (RGB, 0..1 scale), as torchvision's `Normalize` uses.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (RGB, 0..1 scale).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Default decompression-bomb guard, pixels (width x height): PIL's `Image.MAX_IMAGE_PIXELS`.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// The data section of a run config (`[data]` in TOML). Unknown keys are rejected.
///
/// Call [`Config::validate`] once after parsing; every error names its key (`data.<key>`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// URL (plain path, `file://`, later `s3://`...) of the shard directory holding
    /// `manifest.json` and the `<split>-NNNNNN.tar` shards written by [`build_shards`].
    pub shards: String,
    /// Manifest split used for training. Default `"train"`.
    #[serde(default = "default_train_split")]
    pub train_split: String,
    /// Manifest split used for evaluation. Default `"val"`.
    #[serde(default = "default_val_split")]
    pub val_split: String,
    /// Side of the square crop fed to the CNN, pixels (224 for ImageNet ResNets, 56/64 for
    /// Tiny ImageNet, 32 for the synthetic shapes).
    pub image_size: u32,
    /// Shorter side (pixels) the eval transform resizes to before its centre crop.
    /// `None` = `round(image_size / 0.875)` (256 for 224, the standard ImageNet eval ratio).
    #[serde(default)]
    pub eval_resize: Option<u32>,
    /// `true`: training uses RandomResizedCrop + horizontal flip; `false`: the eval transform.
    /// Default `true`.
    #[serde(default = "default_true")]
    pub augment: bool,
    /// Lower bound of the RandomResizedCrop area fraction (upper bound 1). Default 0.25
    /// (torchvision's 0.08 is tuned for 90-epoch ImageNet; short runs prefer milder crops).
    #[serde(default = "default_min_crop_scale")]
    pub min_crop_scale: f32,
    /// Threads of the decode/augment pool of each stream. Default 2.
    #[serde(default = "default_decode_threads")]
    pub decode_threads: usize,
    /// Batches decoded ahead of the training loop: `prefetch_batches - 1` wait in a bounded
    /// channel while one is being decoded (whose loader also holds the image buffer of the batch
    /// after it, `3 * image_size^2 * 4` bytes per image). Default 4.
    #[serde(default = "default_prefetch_batches")]
    pub prefetch_batches: usize,
    /// Per-channel mean (RGB, 0..1 scale) subtracted after scaling pixels to 0..1.
    /// Default [`IMAGENET_MEAN`].
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB, 0..1 scale) divided by. Default [`IMAGENET_STD`].
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Decompression-bomb guard: images whose header claims more than this many pixels
    /// (width x height) are rejected before any pixel buffer is allocated. Default 89,478,485
    /// (PIL's `Image.MAX_IMAGE_PIXELS`).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Virtual partitions of the training split (see [`reader`], "Partitions"): each owns whole
    /// shards, and rank `r` of `world_size` streams only the partitions `p` with
    /// `p % world_size == r`, so each shard is downloaded once per epoch by the whole job. Fixed
    /// when a run starts and stored in its checkpoints: the run can later continue on any world
    /// size that divides it. Choose a multiple of every world size the run will use, at most
    /// the number of shards: e.g. 64 for 1 to 8 nodes of 8 GPUs. Default: chosen at the start of
    /// the run as `world_size * 2^k`, the largest such value that is at most 64 (or
    /// `world_size`, when that is more) and at most the number of shards.
    #[serde(default)]
    pub partitions: Option<usize>,
    /// Samples held in the shuffle buffer of each partition's open shard (see [`reader`]): a
    /// rank holds `partitions / world_size` of them, so memory is about that many times this
    /// many encoded images (~110 KB each for ImageNet). A buffer at least as large as a shard
    /// shuffles it (nearly) uniformly. Default 1000 (WebDataset's usual `shuffle(1000)`).
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Shards streamed ahead of the one being read, per partition. Default 1.
    #[serde(default = "default_prefetch_shards")]
    pub prefetch_shards: usize,
    /// Samples each streaming shard may read ahead of its consumer (channel capacity).
    /// Default 64.
    #[serde(default = "default_shard_readahead")]
    pub shard_readahead: usize,
    /// `true`: any skipped sample (undecodable image, missing `.cls` or image, invalid label) or
    /// shard problem (truncated, malformed, checksum mismatch) fails the run instead of being
    /// skipped and counted. Default `false`.
    #[serde(default)]
    pub strict: bool,
    /// EXIF orientation policy: `"apply"` (default; sideways-stored photos come out upright, as
    /// `PIL.ImageOps.exif_transpose` gives) or `"ignore"` (pixels as stored). Applies to
    /// training, evaluation and prediction alike ([`image::decode_rgb`]).
    #[serde(default)]
    pub exif_orientation: image::ExifOrientation,
    /// Decode JPEGs at 1/2, 1/4 or 1/8 scale (DCT scaling) when the crop still spans at least
    /// `image_size` pixels per side at that scale ([`image::decode_train`]). Default `true`;
    /// `false` decodes every image at full size (pixel-identical to decode + transform).
    #[serde(default = "default_true")]
    pub jpeg_dct_scaling: bool,
    /// Node-local shard cache ([`cache`]): a directory on local disk (fast NVMe) where shards
    /// downloaded from the store are kept, verified, so that later epochs read them from disk;
    /// every rank of a node using the same directory shares it. Sizing: a full cache holds the
    /// shards of the node's partitions, `bytes of the split * ranks per node / world_size`
    /// (and the validation split's, which evaluation reads too). Default: no cache.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of cached shards under `cache_dir` (all shard builds together); least
    /// recently used shards are deleted to make room, never one a rank is reading or has
    /// opened ahead. Must be at least the largest shard's size (an error at start otherwise).
    /// Default: no limit.
    #[serde(default)]
    pub cache_limit_bytes: Option<u64>,
}

fn default_train_split() -> String {
    "train".into()
}
fn default_val_split() -> String {
    "val".into()
}
fn default_true() -> bool {
    true
}
fn default_min_crop_scale() -> f32 {
    0.25
}
fn default_decode_threads() -> usize {
    2
}
fn default_prefetch_batches() -> usize {
    4
}
fn default_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn default_std() -> [f32; 3] {
    IMAGENET_STD
}
fn default_max_pixels() -> u64 {
    DEFAULT_MAX_PIXELS
}
fn default_shuffle_buffer() -> usize {
    1000
}
fn default_prefetch_shards() -> usize {
    1
}
fn default_shard_readahead() -> usize {
    64
}

impl Config {
    /// A config with every optional key at its default.
    pub fn new(shards: impl Into<String>, image_size: u32) -> Config {
        Config {
            shards: shards.into(),
            train_split: default_train_split(),
            val_split: default_val_split(),
            image_size,
            eval_resize: None,
            augment: true,
            min_crop_scale: default_min_crop_scale(),
            decode_threads: default_decode_threads(),
            prefetch_batches: default_prefetch_batches(),
            mean: default_mean(),
            std: default_std(),
            max_pixels: default_max_pixels(),
            partitions: None,
            shuffle_buffer: default_shuffle_buffer(),
            prefetch_shards: default_prefetch_shards(),
            shard_readahead: default_shard_readahead(),
            strict: false,
            exif_orientation: image::ExifOrientation::default(),
            jpeg_dct_scaling: true,
            cache_dir: None,
            cache_limit_bytes: None,
        }
    }

    /// Shorter side (pixels) of the eval resize: `eval_resize`, else `round(image_size/0.875)`.
    pub fn eval_resize_px(&self) -> u32 {
        self.eval_resize
            .unwrap_or_else(|| (self.image_size as f64 / 0.875).round() as u32)
    }

    /// Checks every key; the error names the first offending one (`data.<key> ...`).
    pub fn validate(&self) -> Result<()> {
        if self.shards.trim().is_empty() {
            bail!("data.shards must not be empty (a URL or path of a shard directory)");
        }
        if self.train_split.is_empty() {
            bail!("data.train_split must not be empty");
        }
        if self.val_split.is_empty() {
            bail!("data.val_split must not be empty");
        }
        if self.partitions == Some(0) {
            bail!(
                "data.partitions must be at least 1 (or left out: chosen at the start of the run)"
            );
        }
        if self.image_size == 0 {
            bail!("data.image_size must be > 0");
        }
        if self.image_size > 4096 {
            bail!("data.image_size must be <= 4096, got {}", self.image_size);
        }
        if let Some(r) = self.eval_resize {
            if r < self.image_size {
                bail!(
                    "data.eval_resize ({r}) must be >= data.image_size ({})",
                    self.image_size
                );
            }
        }
        if !(self.min_crop_scale > 0.0 && self.min_crop_scale <= 1.0) {
            bail!(
                "data.min_crop_scale must be in (0, 1], got {}",
                self.min_crop_scale
            );
        }
        if self.decode_threads == 0 {
            bail!("data.decode_threads must be > 0");
        }
        if self.prefetch_batches == 0 {
            bail!("data.prefetch_batches must be > 0");
        }
        for (c, m) in self.mean.iter().enumerate() {
            if !m.is_finite() {
                bail!("data.mean[{c}] must be finite, got {m}");
            }
        }
        for (c, s) in self.std.iter().enumerate() {
            if !(s.is_finite() && *s > 0.0) {
                bail!("data.std[{c}] must be > 0, got {s}");
            }
        }
        if self.max_pixels == 0 {
            bail!("data.max_pixels must be > 0");
        }
        if self.shuffle_buffer == 0 {
            bail!("data.shuffle_buffer must be > 0 (1 = tar order)");
        }
        if self.shard_readahead == 0 {
            bail!("data.shard_readahead must be > 0");
        }
        match (&self.cache_dir, self.cache_limit_bytes) {
            (_, Some(0)) => bail!("data.cache_limit_bytes must be > 0"),
            (None, Some(_)) => bail!("data.cache_limit_bytes is set but data.cache_dir is not"),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_from_minimal_toml_like_json() {
        let cfg: Config = serde_json::from_str(r#"{"shards":"s","image_size":224}"#).unwrap();
        assert_eq!(cfg, Config::new("s", 224));
        assert_eq!(cfg.eval_resize_px(), 256);
        assert_eq!(Config::new("s", 64).eval_resize_px(), 73);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_keys_rejected() {
        let err = serde_json::from_str::<Config>(r#"{"shards":"s","image_size":2,"imgsize":3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("imgsize"), "{err}");
    }

    #[test]
    fn exif_orientation_values() {
        let parse = |v: &str| {
            serde_json::from_str::<Config>(&format!(
                r#"{{"shards":"s","image_size":2,"exif_orientation":"{v}"}}"#
            ))
        };
        assert_eq!(
            parse("apply").unwrap().exif_orientation,
            image::ExifOrientation::Apply
        );
        assert_eq!(
            parse("ignore").unwrap().exif_orientation,
            image::ExifOrientation::Ignore
        );
        let err = parse("rotate").unwrap_err().to_string();
        assert!(
            err.contains("unknown variant `rotate`, expected `apply` or `ignore`"),
            "{err}"
        );
    }

    #[test]
    fn validate_names_the_key() {
        let check = |f: &dyn Fn(&mut Config), key: &str| {
            let mut cfg = Config::new("s", 32);
            f(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
        };
        check(&|c| c.image_size = 0, "data.image_size must be > 0");
        check(&|c| c.eval_resize = Some(16), "data.eval_resize");
        check(&|c| c.min_crop_scale = 0.0, "data.min_crop_scale");
        check(&|c| c.min_crop_scale = f32::NAN, "data.min_crop_scale");
        check(&|c| c.decode_threads = 0, "data.decode_threads");
        check(&|c| c.prefetch_batches = 0, "data.prefetch_batches");
        check(&|c| c.std = [1.0, 0.0, 1.0], "data.std[1]");
        check(&|c| c.max_pixels = 0, "data.max_pixels");
        check(&|c| c.shuffle_buffer = 0, "data.shuffle_buffer");
        check(
            &|c| c.cache_limit_bytes = Some(1),
            "data.cache_limit_bytes is set but data.cache_dir",
        );
        check(
            &|c| (c.cache_dir, c.cache_limit_bytes) = (Some("/tmp".into()), Some(0)),
            "data.cache_limit_bytes must be > 0",
        );
        check(&|c| c.shard_readahead = 0, "data.shard_readahead");
        check(&|c| c.shards = " ".into(), "data.shards");
    }
}
