//! The `nccl` backend's twin for builds without the `nccl` cargo feature: the same
//! interface, so every build compiles and runs the same code, and connecting is a clear error
//! saying how to get the real one.
use anyhow::{bail, Result};
use tch::Tensor;

use super::store::Rendezvous;
use super::{Collective, ReduceOp};

/// Never constructed: [`Nccl::connect`] always fails in this build.
pub struct Nccl {
    _never: std::convert::Infallible,
}

impl Nccl {
    /// Always an error: this binary was built without NCCL support.
    pub fn connect(_store: Rendezvous, _ordinal: usize) -> Result<Nccl> {
        bail!(
            "dist.backend = nccl, but this binary was built without the `nccl` cargo feature; \
             rebuild with `cargo build --release --features nccl`, or set dist.backend = \"cpu\""
        )
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        match self._never {}
    }
    fn world_size(&self) -> usize {
        match self._never {}
    }
    fn device(&self) -> tch::Device {
        match self._never {}
    }
    fn all_reduce(&self, _buffer: &mut Tensor, _op: ReduceOp) -> Result<()> {
        match self._never {}
    }
    fn broadcast(&self, _buffer: &mut Tensor) -> Result<()> {
        match self._never {}
    }
    fn broadcast_bytes(&self, _bytes: Vec<u8>) -> Result<Vec<u8>> {
        match self._never {}
    }
    fn barrier(&self) -> Result<()> {
        match self._never {}
    }
}
