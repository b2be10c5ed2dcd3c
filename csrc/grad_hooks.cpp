// What data-parallel training needs from libtorch's autograd and tch 0.24 does not expose
// (src/collective/reducer.rs): a hook that runs when a parameter's gradient has been accumulated
// into its `.grad` during backward (libtorch's post-accumulate-grad hook, what PyTorch's
// `Tensor.register_post_accumulate_grad_hook` sets), and setting a parameter's `.grad` to a
// tensor of our choosing (a view into a flat gradient bucket, PyTorch DDP's
// `gradient_as_bucket_view`). Every function catches C++ exceptions: a failure returns -1 and
// devise reports it, never an abort.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>

extern "C" {
// Called on the thread that runs the parameter's AccumulateGrad node (the thread that called
// backward for CPU tensors, autograd's device thread for CUDA tensors). Must not unwind.
typedef void (*devise_grad_ready_fn)(void *context, int64_t index);
}

namespace {
struct GradReady : torch::autograd::PostAccumulateGradHook {
  GradReady(devise_grad_ready_fn fn, void *context, int64_t index)
      : fn_(fn), context_(context), index_(index) {}
  void operator()(const torch::autograd::Variable & /*tensor*/) override {
    fn_(context_, index_);
  }
  devise_grad_ready_fn fn_;
  void *context_;
  int64_t index_;
};
} // namespace

extern "C" {

// Sets (replacing any) the post-accumulate-grad hook of the leaf tensor `param`: after each
// backward pass accumulated its gradient, `fn(context, index)` is called (never, for a tensor
// that does not require grad: libtorch does not check). Returns 0, -1 on error.
int devise_set_grad_ready_hook(const at::Tensor *param, devise_grad_ready_fn fn, void *context,
                               int64_t index) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(
        *param, std::make_unique<GradReady>(fn, context, index));
    return 0;
  } catch (...) {
    return -1;
  }
}

// Removes the post-accumulate-grad hook of `param` (if any). Returns 0, -1 on error.
int devise_clear_grad_ready_hook(const at::Tensor *param) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(*param, nullptr);
    return 0;
  } catch (...) {
    return -1;
  }
}

// `param.grad = grad` (same shape, dtype and device as `param`; libtorch checks none of it
// here, the caller does); a null `grad` resets `.grad` to undefined. Returns 0, -1 on error.
int devise_set_grad(const at::Tensor *param, const at::Tensor *grad) {
  try {
    if (grad == nullptr) {
      param->mutable_grad().reset();
    } else {
      param->mutable_grad() = *grad;
    }
    return 0;
  } catch (...) {
    return -1;
  }
}
}
