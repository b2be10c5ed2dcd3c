//! Cross-process communication: the gradient all-reduce the training step calls, the broadcast
//! rank 0 uses to tell the others what it observed (STYLE.md point 6), and a barrier.
//!
//! Today only the single-process backend exists: with `world_size == 1` every operation is the
//! identity. The data-parallel backends (NCCL, CPU ring over TCP) implement the same trait, so the
//! training loop does not change when they arrive. Every rank must call the same operations in
//! the same order with tensors of the same shapes; a rank that skips one makes the others wait.
use anyhow::Result;
use tch::Tensor;

/// The operations the training loop needs from a process group.
pub trait Collective {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of processes in the group.
    fn world_size(&self) -> usize;
    /// In place: every tensor becomes the mean over ranks of that tensor. All ranks pass tensors
    /// of the same shapes and dtypes in the same order.
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()>;
    /// Rank 0's `bytes` are returned on every rank (others pass anything; it is ignored).
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// `world_size == 1`: no communication at all.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, _tensors: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
