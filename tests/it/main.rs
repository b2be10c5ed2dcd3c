//! One integration-test crate (ripgrep style). Each module states its scope. Tests that read
//! `../shared` skip with a printed reason only when it is absent (never in CI, where it exists).
mod cli;
mod cluster;
mod common;
mod data;
mod dist;
mod hierarchy;
mod image;
mod label_vectors;
mod layers;
mod predict;
mod report;
mod resume;
mod s3;
mod shards;
mod slurm;
mod text;
mod train;
mod unicode;
