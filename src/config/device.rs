//! `run.device` resolved on this machine: which libtorch device a worker process uses.
use crate::config::DeviceKind;
use anyhow::{Context, Result};
use tch::Device;

/// `run.device` as a libtorch device for local worker `local_rank` of `local_world_size`
/// (see [`choose_device`]), on this machine: CUDA as libtorch sees it, and this process's
/// `CUDA_VISIBLE_DEVICES`.
pub fn select_device(
    device: DeviceKind,
    local_rank: usize,
    local_world_size: usize,
) -> Result<Device> {
    let cuda_devices = match device {
        DeviceKind::Cpu => 0,
        DeviceKind::Cuda | DeviceKind::Auto if tch::Cuda::is_available() => {
            tch::Cuda::device_count().max(0) as usize
        }
        DeviceKind::Cuda | DeviceKind::Auto => 0,
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    choose_device(
        device,
        local_rank,
        local_world_size,
        visible.as_deref(),
        cuda_devices,
    )
}

/// The device of local worker `local_rank` of `local_world_size` for `run.device` = `device`,
/// given `cuda_visible_devices` (the process's `CUDA_VISIBLE_DEVICES`, `None` when unset) and
/// `cuda_devices` (the GPUs libtorch sees): the CPU for `cpu`, and for `auto` without a GPU;
/// else `cuda:N`, N the worker's position in its visible list
/// ([`devise_launch::world::cuda_ordinal`]: 0 when it sees exactly one GPU).
///
/// Errors, before any work: `cuda` with no GPU visible; more workers on the node than GPUs
/// visible to this one (unless exactly one is visible).
pub fn choose_device(
    device: DeviceKind,
    local_rank: usize,
    local_world_size: usize,
    cuda_visible_devices: Option<&str>,
    cuda_devices: usize,
) -> Result<Device> {
    match device {
        DeviceKind::Cpu => return Ok(Device::Cpu),
        DeviceKind::Auto if cuda_devices == 0 => return Ok(Device::Cpu),
        DeviceKind::Cuda | DeviceKind::Auto => {}
    }
    let ordinal = devise_launch::world::cuda_ordinal(
        local_rank,
        local_world_size,
        cuda_visible_devices,
        cuda_devices,
    )
    .with_context(|| format!("run.device = {device}"))?;
    Ok(Device::Cuda(ordinal))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run.device` with the GPUs a SLURM task sees: a task with one GPU of its own takes
    /// cuda:0 whatever its local rank; a task seeing the node's GPUs takes its local rank's;
    /// more workers than visible GPUs is an error naming `run.device` and the variable.
    #[test]
    fn the_device_follows_the_visible_gpus_not_the_local_rank() {
        let pick = |device, local_rank, local_world_size, visible: Option<&str>, count| {
            choose_device(device, local_rank, local_world_size, visible, count)
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(pick(DeviceKind::Cpu, 3, 4, Some("3"), 1), Ok(Device::Cpu));
        assert_eq!(pick(DeviceKind::Auto, 3, 4, None, 0), Ok(Device::Cpu));
        // srun --gpus-per-task=1: task 3 sees only its GPU (physical 3) as cuda:0.
        assert_eq!(
            pick(DeviceKind::Auto, 3, 4, Some("3"), 1),
            Ok(Device::Cuda(0))
        );
        assert_eq!(
            pick(DeviceKind::Cuda, 3, 4, Some("3"), 1),
            Ok(Device::Cuda(0))
        );
        // srun --gres=gpu:4: every task sees the node's four.
        assert_eq!(
            pick(DeviceKind::Cuda, 2, 4, Some("0,1,2,3"), 4),
            Ok(Device::Cuda(2))
        );
        let e = pick(DeviceKind::Cuda, 3, 4, Some("0,1"), 2).unwrap_err();
        assert!(
            e.contains("run.device = cuda") && e.contains("CUDA_VISIBLE_DEVICES=\"0,1\""),
            "{e}"
        );
        let e = pick(DeviceKind::Cuda, 0, 1, None, 0).unwrap_err();
        assert!(
            e.contains("run.device = cuda") && e.contains("no CUDA device"),
            "{e}"
        );
    }
}
