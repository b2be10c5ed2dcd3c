// What libtorch offers and tch 0.24 does not expose, for devise's GPU path (src/gpu.rs):
// autocast with a chosen dtype on a chosen device type (tch's `autocast` only toggles CUDA
// autocast at its default float16), and the channels-last memory format. Every function catches
// C++ exceptions: a failure returns -1 / null and devise reports it, never an abort.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>

extern "C" {

// Enables or disables autocast on `device_type` (c10::DeviceType: 0 CPU, 1 CUDA) with bfloat16
// (`bf16` != 0) or float16. Returns the previous enabled state (0/1), -1 on error.
int devise_autocast_set(int device_type, int enabled, int bf16) {
  try {
    auto device = static_cast<c10::DeviceType>(device_type);
    bool previous = at::autocast::is_autocast_enabled(device);
    if (enabled) {
      at::autocast::set_autocast_dtype(device, bf16 ? at::kBFloat16 : at::kHalf);
    }
    at::autocast::set_autocast_enabled(device, enabled != 0);
    return previous ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

int devise_autocast_increment_nesting() { return at::autocast::increment_nesting(); }

// Clears the autocast weight cache when the outermost region ends (as torch.autocast does).
void devise_autocast_decrement_nesting() {
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
}

// `t.contiguous(at::MemoryFormat::ChannelsLast)` for a 4-d tensor (a new handle; null on error,
// e.g. a tensor that is not 4-d).
at::Tensor *devise_channels_last(const at::Tensor *t) {
  try {
    return new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
  } catch (...) {
    return nullptr;
  }
}

// Whether `t` is laid out channels-last (1/0).
int devise_is_channels_last(const at::Tensor *t) {
  return t->is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
}
}
