// bigkern._C: the Python module that carries the compiled kernels. Loading it runs the
// TORCH_LIBRARY registrations of every *_op.cpp (the ops live in torch.ops.bigkern); the pybind11
// functions here are helpers only.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "common/activation.cuh"

namespace py = pybind11;

namespace {

std::map<std::string, int> activation_codes() {
  return {{"none", bigkern::kNone},       {"relu", bigkern::kRelu},       {"gelu", bigkern::kGelu},
          {"gelu_tanh", bigkern::kGeluTanh}, {"silu", bigkern::kSilu},    {"sigmoid", bigkern::kSigmoid},
          {"tanh", bigkern::kTanh},       {"leaky_relu", bigkern::kLeakyRelu}};
}

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bigkern's compiled CUDA kernels (ops registered under torch.ops.bigkern)";
  m.def("activation_codes", &activation_codes, "activation name -> code, as compiled into the CUDA kernels");
  m.def("cuda_runtime_version", &cuda_runtime_version, "the CUDA runtime version bigkern._C was linked against");
}
