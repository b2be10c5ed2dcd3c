//! # devise — a DeViSE trainer (Frome et al., "DeViSE: A Deep Visual-Semantic Embedding Model",
//! NeurIPS 2013)
//!
//! A CNN encodes an image, a linear projection maps its features into a word-embedding space,
//! and a hinge rank loss (margin 0.1) pulls the image toward its label's vector and away from the
//! other labels'. At test time the nearest label vectors are the prediction, so labels never seen
//! in training can be recognised (zero-shot).
//!
//! Modules, in the order data flows through them:
//!
//! | module | what lives there |
//! |---|---|
//! | [`storage`] | `object_store` URLs (plain paths, `file://`) behind one small blocking API |
//! | [`data`] | ImageFolder / ILSVRC-2012 val folder -> WebDataset tar shards + manifest (build in parallel, verify, index foreign shards); shard reader, decode, augmentation, batches, the data cursor; the synthetic shapes dataset; which classes are seen and unseen ([`data::split`]) |
//! | [`text`] | word-vector files (word2vec bin/text, GloVe, fastText) -> `label_embedding` per wnid (paper A.2); the label-embedding file a checkpoint keeps |
//! | [`model`] | image encoder (`tch::vision` ResNets, a small ConvNet) + softmax head + linear projection `M` (§3); bfloat16 autocast and channels-last ([`model::gpu`]) |
//! | [`loss`] | softmax cross-entropy and the hinge rank loss (§3.3, eq. 1) |
//! | [`optim`] | SGD with momentum and Adagrad with state of our own (checkpointable), LR schedule |
//! | [`collective`] | rendezvous store, CPU ring and NCCL all-reduce, the data-parallel step (bucketed gradient mean, broadcast, checksum) |
//! | [`checkpoint`] | crash-safe checkpoints: temporary name, atomic publish, `LATEST` last |
//! | [`report`] | JSON + Markdown + HTML report in the run directory, terminal summary |
//! | [`config`] | the run configuration (each component's own `Config`, nested) and the validated [`config::plan::Plan`] |
//! | [`eval`] | flat hit@k and hp@k on seen classes and zero-shot label sets; softmax baseline; chance; `devise eval` of a checkpoint; `devise predict` |
//! | [`train`] | the training loop, stage by stage (softmax -> devise -> finetune); `devise bench-step` |
//! | [`demo`] | the embedded default run: synthetic shapes with real GloVe names, end to end |
//!
//! Configuration: [`config::RunConfig`] nests each component's own `Config`; it is validated once
//! into a [`config::plan::Plan`] holding every derived number.
//!
//! Layers, top to bottom; a module imports from the layers below it, and from its own layer only
//! another module's `Config` section type or along an edge named here (`tests/it/layers.rs`
//! checks every `crate::` path against this table):
//!
//! | layer | modules |
//! |---|---|
//! | entry points | `src/main.rs` (the `devise` command), [`demo`], the `devise-launch` crate |
//! | the run | [`train`], [`eval`] (with `devise eval` and `devise predict`), [`config`] (the configuration and its plan) |
//! | what a run leaves | [`checkpoint`], [`report`] |
//! | the model and what trains it | [`model`], [`loss`], [`optim`], [`collective`] |
//! | bytes, samples, words | [`data`], [`text`], [`storage`] |
//!
//! Inside the run layer, `train` calls `eval` (it evaluates after each stage) and both read
//! `config`; `eval` never imports `train`, so what both need (the heads a stage trained,
//! [`eval::Heads::after`]; the device, [`config::device`]) lives in `eval` or `config`. In the
//! bottom layer `data` reads and writes through `storage`.

/// `impl Deserialize for $t`, a choice ([`clap::ValueEnum`]): it is read by its name as the
/// command line spells it, which is also how TOML and the JSON files spell it, and another value
/// is an error listing the values (the configuration loader adds the key). Defined before the
/// modules so that every layer uses it without a path.
macro_rules! deserialize_by_name {
    ($t:ty) => {
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = <String as serde::Deserialize>::deserialize(d)?;
                <$t as clap::ValueEnum>::from_str(&name, false).map_err(|_| {
                    let values: Vec<String> = <$t as clap::ValueEnum>::value_variants()
                        .iter()
                        .filter_map(|v| clap::ValueEnum::to_possible_value(v))
                        .map(|p| p.get_name().to_string())
                        .collect();
                    serde::de::Error::custom(format!(
                        "{name:?} is not one of {}",
                        values.join(", ")
                    ))
                })
            }
        }
    };
}

pub mod storage;

pub mod data;

pub mod text;

pub mod model;

pub mod loss;

pub mod optim;

pub mod collective;

pub mod checkpoint;

pub mod report;

pub mod config;

pub mod eval;

pub mod train;

pub mod demo;
