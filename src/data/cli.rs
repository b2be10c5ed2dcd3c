//! `devise data`: the dataset tools' command line (build shards, verify them, index shards made
//! by other tools), over [`shards`], [`verify`], [`index`] and [`ilsvrc`].
use crate::data::{ilsvrc, index, shards, verify};
use anyhow::{Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

/// `devise data`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Images -> WebDataset tar shards + manifest.json (written last). Sources: an ImageFolder
    /// tree (--src: <split>/<wnid>/*.JPEG) and/or the ILSVRC-2012 validation folder with Kaggle's
    /// LOC_val_solution.csv (split val).
    BuildShards {
        /// ImageFolder root holding <split>/<wnid>/ folders.
        #[arg(long, required_unless_present = "ilsvrc_val_dir")]
        src: Option<PathBuf>,
        /// Destination URL (path, file://, s3://, gs://, az://, http(s)://).
        #[arg(long)]
        dst: String,
        /// Splits of --src to convert (comma-separated). Default train,val; train when
        /// --ilsvrc-val-dir provides val.
        #[arg(long, value_delimiter = ',', requires = "src")]
        splits: Option<Vec<String>>,
        /// Flat folder of ILSVRC-2012 validation images (ILSVRC2012_val_00000001.JPEG, ...):
        /// becomes the split val.
        #[arg(long, requires = "ilsvrc_val_solution")]
        ilsvrc_val_dir: Option<PathBuf>,
        /// Kaggle's LOC_val_solution.csv (ImageId,PredictionString; the label is the first
        /// token) for --ilsvrc-val-dir.
        #[arg(long, requires = "ilsvrc_val_dir")]
        ilsvrc_val_solution: Option<PathBuf>,
        /// Only these classes: a file whose first column is the wnid (e.g. a split .tsv). An
        /// ILSVRC validation row naming a wnid not in the file is an error.
        #[arg(long)]
        classes: Option<PathBuf>,
        /// Only the first N classes of --classes.
        #[arg(long, requires = "classes")]
        limit_classes: Option<usize>,
        /// Target shard size in bytes.
        #[arg(long, default_value_t = 64 << 20)]
        shard_size_bytes: u64,
        /// Seed of the sample shuffle before sharding.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Threads building shards (default: one per core). The output is the same for any.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check every shard against the manifest (bytes, sha256, samples, .cls, class counts, every
    /// image decodes); print a summary and the problems; exit 1 if there is any.
    Verify {
        /// Shard directory URL (holding manifest.json).
        url: String,
        /// Only this split.
        #[arg(long)]
        split: Option<String>,
        /// Decompression-bomb guard for decoding, pixels.
        #[arg(long, default_value_t = crate::data::DEFAULT_MAX_PIXELS)]
        max_pixels: u64,
        /// Threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Write manifest.json for WebDataset shards made by other tools (<split>-*.tar with
    /// .jpg/.cls, e.g. Python webdataset's TarWriter), so `train` and `verify` can use them.
    Index {
        /// Shard directory URL.
        url: String,
        /// Class file whose first column lists the wnids that .cls values index, sorted (e.g.
        /// imagenet-meta/ilsvrc2012_wnids_names.tsv, the standard ILSVRC-2012 order).
        #[arg(long)]
        classes: PathBuf,
        /// A split and its shards as a brace pattern, e.g. train=train-{000000..000146}.tar
        /// (repeatable). Default: every <split>-*.tar object of URL.
        #[arg(long = "shards", value_name = "SPLIT=PATTERN", value_parser = crate::data::index::parse_split_pattern)]
        shards: Vec<(String, String)>,
        /// Replace an existing manifest.json.
        #[arg(long)]
        overwrite: bool,
        /// Threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
    },
}

/// One line per split of a freshly written manifest: samples and shards.
fn print_splits(manifest: &crate::data::shards::Manifest) {
    for (name, split) in &manifest.splits {
        println!(
            "{name}: {} samples in {} shards",
            split.samples,
            split.shards.len()
        );
    }
}

/// Runs a `devise data` subcommand; progress and the summary go to the terminal.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::BuildShards {
            src,
            dst,
            splits,
            ilsvrc_val_dir,
            ilsvrc_val_solution,
            classes,
            limit_classes,
            shard_size_bytes,
            seed,
            threads,
        } => {
            let class_file = match &classes {
                Some(path) => Some(read_class_list(path)?),
                None => None,
            };
            let selected = class_file.as_ref().map(|all| match limit_classes {
                Some(n) => all[..n.min(all.len())].to_vec(),
                None => all.clone(),
            });
            let ilsvrc_val = match (ilsvrc_val_dir, ilsvrc_val_solution) {
                (Some(images_dir), Some(solution_csv)) => Some(ilsvrc::IlsvrcVal {
                    images_dir,
                    solution_csv,
                    known_wnids: class_file,
                }),
                _ => None, // clap requires both or neither
            };
            let splits = match (&src, splits) {
                (None, _) => Vec::new(),
                (Some(_), Some(splits)) => splits,
                (Some(_), None) if ilsvrc_val.is_some() => vec!["train".to_string()],
                (Some(_), None) => vec!["train".to_string(), "val".to_string()],
            };
            let sources = shards::Sources {
                image_folder: src,
                ilsvrc_val,
            };
            let opts = shards::BuildOptions {
                splits,
                classes: selected,
                shard_size_bytes,
                seed,
                progress: true,
            };
            let start = std::time::Instant::now();
            let manifest = on_pool(threads, || shards::build_shards_from(&sources, &dst, &opts))?;
            print_splits(&manifest);
            println!(
                "manifest: {}/manifest.json ({} classes), {:.1} s",
                dst.trim_end_matches('/'),
                manifest.classes.len(),
                start.elapsed().as_secs_f64()
            );
        }
        Command::Verify {
            url,
            split,
            max_pixels,
            threads,
        } => {
            let opts = verify::VerifyOptions { split, max_pixels };
            let report = on_pool(threads, || verify::verify_shards(&url, &opts))?;
            println!("{report}");
            if !report.is_ok() {
                anyhow::bail!("{url}: {} problems", report.problems.len());
            }
        }
        Command::Index {
            url,
            classes,
            shards,
            overwrite,
            threads,
        } => {
            let opts = index::IndexOptions {
                classes: index::read_sorted_classes(&classes)?,
                classes_source: classes.display().to_string(),
                shards,
                overwrite,
            };
            let manifest = on_pool(threads, || index::index_shards(&url, &opts))?;
            print_splits(&manifest);
            println!(
                "manifest: {}/manifest.json ({} classes)",
                url.trim_end_matches('/'),
                manifest.classes.len()
            );
        }
    }
    Ok(())
}

/// Runs `f` on a rayon pool of `threads` threads (`None`: rayon's global pool, one per core).
fn on_pool<T: Send>(threads: Option<usize>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    match threads {
        None => f(),
        Some(0) => anyhow::bail!("--threads must be > 0"),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .context("starting the thread pool")?
            .install(f),
    }
}

/// The wnids of a class file (first column of each non-blank, non-`#` line), in file order.
fn read_class_list(path: &std::path::Path) -> Result<Vec<String>> {
    let column = crate::data::shards::read_class_column(path)
        .with_context(|| format!("--classes {}", path.display()))?;
    Ok(column.into_iter().map(|(_, wnid)| wnid).collect())
}
