//! The GPU training path's numerics and layout: bfloat16 autocast (mixed precision) and the
//! channels-last memory format, through a small C++ shim (`csrc/gpu_shim.cpp`, built by
//! `build.rs`) because tch 0.24 exposes neither the autocast dtype nor memory formats.
//!
//! - [`Precision::Bf16`]: the encoder's forward runs under autocast with bfloat16 on the model's
//!   device type (CUDA; on the CPU too, where oneDNN has bf16 kernels, which is what CI tests).
//!   Weights, gradients and optimizer state stay float32 (PyTorch AMP); bfloat16 has float32's
//!   exponent range, so no loss scaling is needed (unlike float16). The features are cast back
//!   to float32 before the classifier / projection and the loss.
//! - [`to_channels_last`]: 4-d weights (convolutions) laid out NHWC, and each input batch too, so
//!   cuDNN picks its NHWC tensor-core kernels (PyTorch's `model.to(memory_format=
//!   torch.channels_last)`). Values are unchanged; only strides differ.
use anyhow::{bail, Result};
use serde::Serialize;
use std::ffi::c_void;
use tch::{Device, Tensor};

extern "C" {
    fn devise_autocast_set(device_type: i32, enabled: i32, bf16: i32) -> i32;
    fn devise_autocast_increment_nesting() -> i32;
    fn devise_autocast_decrement_nesting();
    fn devise_channels_last(t: *const c_void) -> *mut c_void;
    fn devise_is_channels_last(t: *const c_void) -> i32;
}

/// Arithmetic of the encoder's forward pass (`train.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    /// float32 throughout (default).
    #[default]
    Fp32,
    /// bfloat16 autocast for the encoder's forward (and so its backward); float32 weights,
    /// gradients, optimizer state, head and loss.
    Bf16,
}

deserialize_by_name!(Precision);

/// c10::DeviceType of `device`.
fn device_type(device: Device) -> i32 {
    match device {
        Device::Cpu => 0,
        _ => 1,
    }
}

/// Runs `f` with autocast on `device`'s type when `precision` is [`Precision::Bf16`] (nested
/// regions are fine; the previous state is restored after). Errors: libtorch refused to set
/// autocast (the message of the shim's failure).
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> Result<T> {
    if precision == Precision::Fp32 {
        return Ok(f());
    }
    let kind = device_type(device);
    // SAFETY: plain calls into libtorch's thread-local autocast state; no pointers.
    let previous = unsafe { devise_autocast_set(kind, 1, 1) };
    if previous < 0 {
        bail!("libtorch could not enable bfloat16 autocast on {device:?}");
    }
    unsafe { devise_autocast_increment_nesting() };
    let out = f();
    unsafe {
        devise_autocast_decrement_nesting();
        devise_autocast_set(kind, previous, 1);
    }
    Ok(out)
}

/// `t` laid out channels-last (NHWC strides, same values); `t` must be 4-d. Errors: anything
/// else (libtorch's refusal).
pub fn channels_last(t: &Tensor) -> Result<Tensor> {
    // SAFETY: `as_ptr` is a live at::Tensor*; the shim returns a new heap at::Tensor* (owned by
    // the returned Tensor, which frees it) or null.
    let ptr = unsafe { devise_channels_last(t.as_ptr() as *const c_void) };
    if ptr.is_null() {
        bail!(
            "cannot lay out a tensor of shape {:?} channels-last",
            t.size()
        );
    }
    Ok(unsafe { Tensor::from_ptr(ptr.cast()) })
}

/// Whether `t` is laid out channels-last.
pub fn is_channels_last(t: &Tensor) -> bool {
    // SAFETY: a live at::Tensor*, read only.
    unsafe { devise_is_channels_last(t.as_ptr() as *const c_void) != 0 }
}

/// Lays out every 4-d variable of `vs` (the convolution weights) channels-last, in place
/// (`set_data`, so optimizers built afterwards see the same tensors). Returns how many.
pub fn to_channels_last(vs: &tch::nn::VarStore) -> Result<usize> {
    let mut n = 0;
    for (_, mut v) in vs.variables() {
        if v.dim() == 4 && !is_channels_last(&v) {
            let nhwc = channels_last(&v.detach())?;
            tch::no_grad(|| v.set_data(&nhwc));
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn bf16_autocast_runs_convolutions_in_bfloat16_and_restores_the_state() {
        let conv = Tensor::randn([8, 3, 3, 3], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
        let run = || x.conv2d(&conv, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1);
        let fp32 = autocast(Precision::Fp32, Device::Cpu, run).unwrap();
        assert_eq!(fp32.kind(), Kind::Float);
        let bf16 = autocast(Precision::Bf16, Device::Cpu, run).unwrap();
        assert_eq!(bf16.kind(), Kind::BFloat16);
        // Close to float32 (bfloat16 keeps 8 bits of mantissa).
        let err = f64::try_from((bf16.to_kind(Kind::Float) - &fp32).abs().max()).unwrap();
        let scale = f64::try_from(fp32.abs().max()).unwrap();
        assert!(err < 0.02 * scale, "{err} vs {scale}");
        // Off again afterwards, also after a nested region.
        let nested = autocast(Precision::Bf16, Device::Cpu, || {
            autocast(Precision::Bf16, Device::Cpu, run).unwrap()
        })
        .unwrap();
        assert_eq!(nested.kind(), Kind::BFloat16);
        assert_eq!(run().kind(), Kind::Float);
    }

    #[test]
    fn channels_last_keeps_values_and_changes_strides() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert!(!is_channels_last(&x));
        let y = channels_last(&x).unwrap();
        assert!(is_channels_last(&y));
        assert_eq!(y.stride(), [60, 1, 15, 3]);
        assert!(y.equal(&x));
        let err = channels_last(&Tensor::zeros([3, 4], (Kind::Float, Device::Cpu))).unwrap_err();
        assert!(format!("{err}").contains("[3, 4]"), "{err}");

        let vs = tch::nn::VarStore::new(Device::Cpu);
        let conv = tch::nn::conv2d(vs.root(), 3, 8, 3, Default::default());
        let before = x.apply(&conv);
        assert_eq!(to_channels_last(&vs).unwrap(), 1); // the weight; the bias is 1-d
        assert!(is_channels_last(&conv.ws));
        let after = y.apply(&conv);
        assert!(is_channels_last(&after));
        let diff = f64::try_from((after - before).abs().max()).unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
