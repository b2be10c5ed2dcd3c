//! `devise-launch`'s library half, shared with the `devise` crate:
//! - [`hostlist`]: strict expansion of SLURM node lists (`gpu[01-04,07]`).
//! - [`world`]: the one place a worker's rank environment is read (`RANK`/`WORLD_SIZE`/... or
//!   `SLURM_PROCID`/`SLURM_STEP_NUM_TASKS`/...), in one documented precedence, and the GPU a
//!   worker takes.
//! - [`signal`]: the preemption signal (`SIGUSR1`, `SIGUSR2` or `SIGTERM` only) and how repeats
//!   of a stop signal count, shared by the worker and the launcher.
//! - [`heartbeat`]: worker heartbeats, how the launcher notices a hung worker.
pub mod heartbeat;
pub mod hostlist;
pub mod signal;
pub mod world;
