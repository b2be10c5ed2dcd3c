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
//! | [`data`] | ImageFolder / ILSVRC-2012 val folder -> WebDataset tar shards + manifest (build in parallel, verify, index foreign shards); shard reader, decode, augmentation, batches, the data cursor; the synthetic shapes dataset |
//! | [`split`] | which classes are seen (trained on) and unseen (zero-shot) |
//! | [`text`] | word-vector files (word2vec bin/text, GloVe, fastText) -> `label_embedding` per wnid (paper A.2); the label-embedding file a checkpoint keeps |
//! | [`model`] | image encoder (`tch::vision` ResNets, a small ConvNet) + softmax head + linear projection `M` (§3) |
//! | [`loss`] | softmax cross-entropy and the hinge rank loss (§3.3, eq. 1) |
//! | [`optim`] | SGD with momentum and Adagrad with state of our own (checkpointable), LR schedule |
//! | [`train`] | the training loop, stage by stage (softmax -> devise -> finetune) |
//! | [`collective`] | rendezvous store, CPU ring and NCCL all-reduce, the data-parallel step (bucketed gradient mean, broadcast, checksum) |
//! | [`checkpoint`] | crash-safe checkpoints: temporary name, atomic publish, `LATEST` last |
//! | [`eval`] | flat hit@k on seen classes and zero-shot label sets; softmax baseline; chance |
//! | [`report`] | JSON + Markdown report in the run directory, terminal summary |
//! | [`demo`] | the embedded default run: synthetic shapes with real GloVe names, end to end |
//!
//! Configuration: [`config::RunConfig`] nests each component's own `Config`; it is validated once
//! into a [`plan::Plan`] holding every derived number.

pub mod bench;
pub mod checkpoint;
pub mod checkpoint_eval;
pub mod collective;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod fault;
pub mod gpu;
pub mod hierarchy;
pub mod loss;
pub mod model;
pub mod optim;
pub mod plan;
pub mod predict;
pub mod report;
pub mod report_html;
pub mod split;
pub mod storage;
pub mod text;
pub mod train;
