//! One integration-test crate (ripgrep style). Each module states its scope; shared setup lives
//! in `common`. The machinery runs on data the tests generate; tests about the real ImageNet data
//! read `../shared` and are reported as ignored, with the reason, when it is absent (under
//! `CI=true` a missing `../shared` fails).
mod cache;
mod cli;
mod cluster;
mod common;
mod data;
mod dist;
mod hierarchy;
mod image;
mod label_vectors;
mod layers;
mod partitions;
mod predict;
mod report;
mod resume;
mod s3;
mod shards;
mod slurm;
mod text;
mod train;
mod unicode;
