//! Data parallelism on top of [`Collective`]: what the training loop calls.
//!
//! - [`broadcast_variables`]: at start (fresh or resumed), every rank takes rank 0's parameters
//!   and buffers, so the replicas start identical whatever each process initialised or loaded.
//! - gradients: averaged in buckets overlapped with backward, by [`super::reducer::Reducer`].
//! - [`check_identical`]: a checksum of every variable compared across ranks; a difference is
//!   an error on every rank (so they stop together), naming the ranks and the step.
//!
//! Each must be called by every rank at the same point with the same variable list.
use anyhow::{bail, Context, Result};
use std::hash::Hasher;
use tch::{Device, Kind, Tensor};

use super::{Collective, ReduceOp};

/// Groups `tensors` (in order) into buckets of one dtype of about `bucket_bytes` each
/// ([`super::reducer::bucket_layout`]: closed once they hold that much); returns index lists.
pub fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<Vec<usize>> {
    let order: Vec<usize> = (0..tensors.len()).collect();
    super::reducer::bucket_layout(tensors, &order, bucket_bytes, bucket_bytes)
}

/// Applies `op` to each bucket of `tensors` flattened into one buffer, then copies the result
/// back into the tensors (in place, without autograd).
fn per_bucket(
    tensors: &mut [Tensor],
    bucket_bytes: usize,
    mut op: impl FnMut(&mut Tensor) -> Result<()>,
) -> Result<()> {
    for bucket in buckets(tensors, bucket_bytes) {
        let views: Vec<Tensor> = bucket.iter().map(|&i| tensors[i].reshape([-1])).collect();
        let mut flat = Tensor::cat(&views, 0); // [sum of numels], a copy
        op(&mut flat)?;
        let mut offset = 0;
        for &i in &bucket {
            let n = tensors[i].numel() as i64;
            let part = flat.narrow(0, offset, n).view_as(&tensors[i]);
            tch::no_grad(|| tensors[i].copy_(&part));
            offset += n;
        }
    }
    Ok(())
}

/// Rank 0's values of `variables` (parameters and buffers, same order on every rank) copied to
/// every rank.
pub fn broadcast_variables(
    collective: &dyn Collective,
    variables: &mut [Tensor],
    bucket_bytes: usize,
) -> Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    per_bucket(variables, bucket_bytes, |flat| collective.broadcast(flat))
}

/// A 64-bit hash of the exact bytes of `tensors` (SipHash, deterministic across processes).
pub fn checksum(tensors: &[Tensor]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for t in tensors {
        let t = t.to_device(Device::Cpu).contiguous();
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if bytes == 0 {
            continue; // an empty tensor's data pointer may be null
        }
        // SAFETY: a contiguous CPU tensor owns `bytes` bytes at data_ptr; read only while `t`
        // lives.
        let data = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, bytes) };
        h.write(data);
    }
    h.finish()
}

/// Compares a 64-bit `value` across ranks; when some rank's differs from rank 0's, every rank
/// returns the same error: `what` and the ranks that differ.
pub fn check_agree(collective: &dyn Collective, value: u64, what: &str) -> Result<()> {
    let (w, r) = (collective.world_size(), collective.rank());
    if w == 1 {
        return Ok(());
    }
    let rank0 = collective.broadcast_bytes(value.to_le_bytes().to_vec())?;
    let flags = Tensor::zeros([w as i64], (Kind::Float, Device::Cpu));
    if rank0 != value.to_le_bytes() {
        let _ = flags.get(r as i64).fill_(1.0);
    }
    let mut flags = flags.to_device(collective.device());
    collective.all_reduce(&mut flags, ReduceOp::Sum)?;
    let flags = Vec::<f32>::try_from(flags.to_device(Device::Cpu))?;
    let differ: Vec<usize> = (0..w).filter(|&i| flags[i] > 0.0).collect();
    if !differ.is_empty() {
        bail!("{what}: rank(s) {differ:?} differ from rank 0");
    }
    Ok(())
}

/// Compares [`checksum`] of `variables` across ranks; on a difference every rank returns the
/// same error, naming `step` and the ranks whose parameters differ from rank 0's.
pub fn check_identical(collective: &dyn Collective, variables: &[Tensor], step: u64) -> Result<()> {
    check_agree(collective, checksum(variables), &format!("after step {step}: parameters"))
        .context(
            "the replicas diverged (non-deterministic kernel, a rank that skipped a step, or memory corruption)",
        )
}

/// At start: every rank must run the same configuration and model. Compares a hash of
/// `config_text` (the resolved configuration, `--set` and environment overrides included) and
/// of the variables' names, shapes and dtypes; a difference is an error on every rank before
/// any gradient is exchanged (buckets of different lengths would otherwise mix bytes).
pub fn check_same_setup(
    collective: &dyn Collective,
    config_text: &str,
    variables: &[(String, Tensor)],
) -> Result<()> {
    use std::hash::Hasher;
    let mut h = std::hash::DefaultHasher::new();
    h.write(config_text.as_bytes());
    check_agree(collective, h.finish(), "the resolved configuration").context(
        "start every rank with the same config file, --set flags and DEVISE__* variables",
    )?;
    let mut h = std::hash::DefaultHasher::new();
    for (name, t) in variables {
        h.write(name.as_bytes());
        h.write(format!("{:?}{:?}", t.size(), t.kind()).as_bytes());
    }
    check_agree(
        collective,
        h.finish(),
        "the model's variables (names, shapes, dtypes)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::ring::tests::with_ring;

    #[test]
    fn buckets_respect_size_and_dtype() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let h = |n: i64| Tensor::zeros([n], (Kind::BFloat16, Device::Cpu));
        let ts = vec![f(10), f(10), f(30), h(4), h(4), f(1)];
        // 80 bytes per bucket: [10, 10] = 80 B; [30] = 120 B alone; bf16 [4, 4] = 16 B; [1].
        assert_eq!(
            buckets(&ts, 80),
            vec![vec![0, 1], vec![2], vec![3, 4], vec![5]]
        );
    }

    #[test]
    fn variables_are_broadcast_in_buckets_and_checked() {
        let out = with_ring(2, |ring| {
            let r = ring.rank() as f64;
            let mut vars = vec![
                Tensor::full([7], r + 1.0, (Kind::Float, Device::Cpu)),
                Tensor::full([2], r as i64 + 1, (Kind::Int64, Device::Cpu)),
            ];
            broadcast_variables(&ring, &mut vars, 16).unwrap();
            check_identical(&ring, &vars, 1).unwrap();
            // Now make rank 1 differ: every rank gets the same error.
            if ring.rank() == 1 {
                let _ = vars[0].get(0).fill_(5.0);
            }
            let e = format!("{:#}", check_identical(&ring, &vars, 7).unwrap_err());
            // Different configurations or models are refused before any gradient moves.
            let named = vec![("w".to_string(), vars[0].shallow_clone())];
            check_same_setup(&ring, "a = 1", &named).unwrap();
            let text = if ring.rank() == 1 { "a = 2" } else { "a = 1" };
            let cfg_err = format!("{:#}", check_same_setup(&ring, text, &named).unwrap_err());
            assert!(
                cfg_err.contains("configuration") && cfg_err.contains("[1]"),
                "{cfg_err}"
            );
            let other = vec![(
                "w".to_string(),
                Tensor::zeros([ring.rank() as i64 + 1], (Kind::Float, Device::Cpu)),
            )];
            let shape_err = format!(
                "{:#}",
                check_same_setup(&ring, "a = 1", &other).unwrap_err()
            );
            assert!(shape_err.contains("shapes"), "{shape_err}");
            (Vec::<i64>::try_from(&vars[1]).unwrap(), e)
        });
        for (var, e) in out {
            assert_eq!(var, vec![1, 1], "Int64 buffers broadcast too");
            assert!(e.contains("step 7") && e.contains("[1]"), "{e}");
        }
    }
}
