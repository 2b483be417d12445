// torch bindings of the persistent LSTM kernels:
//   bigkern::lstm_persistent_plan_cuda      why the kernels cannot hold this W_hh on chip ("" when they can)
//   bigkern::lstm_persistent_forward_cuda   the whole forward sequence in one cooperative launch
//   bigkern::lstm_persistent_backward_cuda  the reverse sweep (gate gradients and grad c0)
// The Python op bigkern::lstm_layer (bigkern/ops/lstm.py) allocates outputs and calls these.
#include <map>
#include <mutex>
#include <sstream>
#include <string>

#include "common/torch_binding.h"
#include "lstm/lstm.h"

namespace bigkern {
namespace {

// SM count, opt-in shared memory per block and cooperative-launch support, asked once per device.
DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(device);
  if (found != cache.end()) return found->second;
  DeviceLimits limits;
  int value = 0;
  check_launch(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute(SMs)");
  limits.sms = value;
  check_launch(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               "cudaDeviceGetAttribute(shared memory per block, opt-in)");
  limits.shared_memory_per_block = value;
  check_launch(cudaDeviceGetAttribute(&value, cudaDevAttrCooperativeLaunch, device),
               "cudaDeviceGetAttribute(cooperative launch)");
  limits.cooperative_launch = value != 0;
  cache[device] = limits;
  return limits;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    default: return "bfloat16";
  }
}

PersistentPlan plan_for(const at::Tensor& w_hh, int64_t batch, bool backward) {
  const c10::cuda::CUDAGuard guard(w_hh.device());
  return lstm_persistent_plan(dtype_of(w_hh, "w_hh"), batch, w_hh.size(1), backward,
                              device_limits(w_hh.device().index()));
}

// Why a plan fails, in words ("" when it works).
std::string describe(const PersistentPlan& plan, const at::Tensor& w_hh, int64_t batch, bool backward) {
  const DeviceLimits limits = device_limits(w_hh.device().index());
  const int64_t hidden = w_hh.size(1);
  const char* kernel = backward ? "backward" : "forward";
  std::ostringstream why;
  switch (plan.status) {
    case PlanStatus::kOk: return "";
    case PlanStatus::kNoCooperativeLaunch:
      why << "the device cannot launch cooperatively (the grid barrier between timesteps needs it)";
      break;
    case PlanStatus::kBatchTooLarge:
      why << "batch " << batch << " is more than the " << plan.max_batch
          << " sequences the persistent kernel keeps per block (larger batches run the per-step kernels)";
      break;
    case PlanStatus::kSharedMemory:
      why << "W_hh does not fit on chip: the persistent " << kernel << " kernel's blocks (" << plan.units_per_block
          << " hidden units each, " << plan.blocks << " blocks on " << limits.sms << " SMs, hidden_size " << hidden
          << ", " << dtype_name(dtype_of(w_hh, "w_hh")) << ") need " << plan.shared_memory
          << " bytes of shared memory each, more than the " << plan.shared_memory_limit << " a block may use";
      break;
    case PlanStatus::kTooManyUnits:
      why << "hidden_size " << hidden << " needs " << plan.units_per_block << " hidden units per block on "
          << limits.sms << " SMs, more than the " << plan.max_units_per_block << " the persistent " << kernel
          << " kernel holds";
      break;
    case PlanStatus::kNotResident:
      why << "only " << plan.resident_blocks << " blocks of the persistent " << kernel << " kernel (with "
          << plan.shared_memory << " bytes of shared memory) can be resident at once, but it needs " << plan.blocks;
      break;
    case PlanStatus::kBadDtype:
      why << "the persistent kernel takes float32, float16 or bfloat16";
      break;
  }
  return why.str();
}

std::string lstm_persistent_plan_cuda(const at::Tensor& w_hh, int64_t batch, bool training) {
  check_cuda(w_hh, "w_hh");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * w_hh.size(1),
              "bigkern: 'w_hh' must be (4*hidden_size, hidden_size), got ", w_hh.sizes());
  std::string reason = describe(plan_for(w_hh, batch, false), w_hh, batch, false);
  if (reason.empty() && training) reason = describe(plan_for(w_hh, batch, true), w_hh, batch, true);
  return reason;
}

void check_dense(const at::Tensor& t, const at::Tensor& like, const char* name, at::IntArrayRef shape) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "bigkern: '", name, "' must have dtype ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.sizes() == shape, "bigkern: '", name, "' must be contiguous of shape ", shape,
              ", got ", t.sizes());
}

void check_fp32(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape) {
  if (!t.has_value()) return;
  check_cuda(*t, name);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == shape, "bigkern: '", name,
              "' must be contiguous float32 of shape ", shape);
}

void lstm_persistent_forward_cuda(const at::Tensor& gx, const at::Tensor& w_hh, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& h0, const at::Tensor& c0, at::Tensor& out,
                                  const std::optional<at::Tensor>& cells, const std::optional<at::Tensor>& gates,
                                  at::Tensor& h_n, at::Tensor& c_n, bool reverse) {
  const int64_t H = w_hh.size(1), B = h0.size(0), N = gx.size(0);
  TORCH_CHECK(B > 0 && N % B == 0, "bigkern: 'gx' must have steps * batch rows");
  const int64_t T = N / B;
  check_cuda(gx, "gx");
  TORCH_CHECK(gx.dim() == 2 && gx.size(1) == 4 * H && gx.stride(1) == 1,
              "bigkern: 'gx' must be (steps*batch, 4*hidden_size) with unit column stride");
  check_dense(w_hh, gx, "w_hh", {4 * H, H});
  check_dense(h0, gx, "h0", {B, H});
  check_dense(c0, gx, "c0", {B, H});
  check_dense(out, gx, "out", {N, H});
  check_dense(h_n, gx, "h_n", {B, H});
  check_dense(c_n, gx, "c_n", {B, H});
  check_fp32(bias, "bias", {4 * H});
  check_fp32(cells, "cells", {N, H});
  check_fp32(gates, "gates", {N, 4 * H});
  const PersistentPlan plan = plan_for(w_hh, B, false);
  TORCH_CHECK(plan.status == PlanStatus::kOk, "bigkern: the persistent LSTM kernel cannot run: ",
              describe(plan, w_hh, B, false));
  const c10::cuda::CUDAGuard guard(gx.device());
  check_launch(lstm_persistent_forward(dtype_of(gx, "gx"), plan, gx.data_ptr(), gx.stride(0), w_hh.data_ptr(),
                                       bias.has_value() ? bias->data_ptr<float>() : nullptr, h0.data_ptr(),
                                       c0.data_ptr(), out.data_ptr(),
                                       cells.has_value() ? cells->data_ptr<float>() : nullptr,
                                       gates.has_value() ? gates->data_ptr<float>() : nullptr, h_n.data_ptr(),
                                       c_n.data_ptr(), T, B, H, reverse, current_stream(gx)),
               "persistent LSTM forward");
}

void lstm_persistent_backward_cuda(const at::Tensor& grad_out, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                   const at::Tensor& w_hh, const at::Tensor& gates, const at::Tensor& cells,
                                   const at::Tensor& c0, at::Tensor& dz, at::Tensor& dc, bool reverse) {
  const int64_t H = w_hh.size(1), B = c0.size(0), N = grad_out.size(0);
  TORCH_CHECK(B > 0 && N % B == 0, "bigkern: 'grad_out' must have steps * batch rows");
  const int64_t T = N / B;
  check_cuda(grad_out, "grad_out");
  check_dense(grad_out, grad_out, "grad_out", {N, H});
  check_dense(grad_h_n, grad_out, "grad_h_n", {B, H});
  check_dense(grad_c_n, grad_out, "grad_c_n", {B, H});
  check_dense(w_hh, grad_out, "w_hh", {4 * H, H});
  check_dense(c0, grad_out, "c0", {B, H});
  check_dense(dz, grad_out, "dz", {N, 4 * H});
  check_fp32(gates, "gates", {N, 4 * H});
  check_fp32(cells, "cells", {N, H});
  check_fp32(dc, "dc", {B, H});
  const PersistentPlan plan = plan_for(w_hh, B, true);
  TORCH_CHECK(plan.status == PlanStatus::kOk, "bigkern: the persistent LSTM backward kernel cannot run: ",
              describe(plan, w_hh, B, true));
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_launch(lstm_persistent_backward(dtype_of(grad_out, "grad_out"), plan, grad_out.data_ptr(),
                                        grad_h_n.data_ptr(), grad_c_n.data_ptr(), w_hh.data_ptr(),
                                        gates.data_ptr<float>(), cells.data_ptr<float>(), c0.data_ptr(),
                                        dz.data_ptr(), dc.data_ptr<float>(), T, B, H, reverse,
                                        current_stream(grad_out)),
               "persistent LSTM backward");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bigkern, m) {
  m.def("lstm_persistent_plan_cuda(Tensor w_hh, int batch, bool training) -> str");
  m.def("lstm_persistent_forward_cuda(Tensor gx, Tensor w_hh, Tensor? bias, Tensor h0, Tensor c0, Tensor(a!) out, "
        "Tensor(b!)? cells, Tensor(c!)? gates, Tensor(d!) h_n, Tensor(e!) c_n, bool reverse) -> ()");
  m.def("lstm_persistent_backward_cuda(Tensor grad_out, Tensor grad_h_n, Tensor grad_c_n, Tensor w_hh, "
        "Tensor gates, Tensor cells, Tensor c0, Tensor(a!) dz, Tensor(b!) dc, bool reverse) -> ()");
}

TORCH_LIBRARY_IMPL(bigkern, CUDA, m) {
  m.impl("lstm_persistent_plan_cuda", &lstm_persistent_plan_cuda);
  m.impl("lstm_persistent_forward_cuda", &lstm_persistent_forward_cuda);
  m.impl("lstm_persistent_backward_cuda", &lstm_persistent_backward_cuda);
}

}  // namespace bigkern
