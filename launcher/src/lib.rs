//! `devise-launch`'s library half, shared with the `devise` crate:
//! - [`hostlist`]: strict expansion of SLURM node lists (`gpu[01-04,07]`).
//! - [`world`]: the one place a worker's rank environment is read (`RANK`/`WORLD_SIZE`/... or
//!   `SLURM_PROCID`/`SLURM_NTASKS`/...), in one documented precedence.
//! - [`heartbeat`]: worker heartbeats, how the launcher notices a hung worker.
pub mod heartbeat;
pub mod hostlist;
pub mod world;
