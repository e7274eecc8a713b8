// The pybind11 module fastattn._C. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations of every linked kernel file; the functions below report build facts, and the
// eager attention and LSTM cell entries are bound from attention_eager_entry.cpp and
// lstm_eager_entry.cpp.
#include <torch/extension.h>

#include <vector>

#include "fastattn/attention_head_dims.h"
#include "fastattn/cpu_gemm.h"
#include "fastattn/cpu_isa.h"
#include "fastattn/dtype.h"
#include "fastattn/lstm_cpu.h"

#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif

namespace fastattn {

FASTATTN_ISA_DECLARE(const char* attention_fwd_tile_engine(Dtype dtype))
FASTATTN_ISA_DECLARE(int64_t lstm_unit_lanes_below())
FASTATTN_ISA_DECLARE(bool lstm_bf16_rows_on_brgemm())
FASTATTN_ISA_DECLARE(int64_t lstm_step_gates_below())

const char* attention_cpu_tile_engine(Dtype dtype) {
  return FASTATTN_ISA_CALL(attention_fwd_tile_engine, dtype);
}

void bind_attention_eager_entry(pybind11::module_& m);
void bind_lstm_eager_entry(pybind11::module_& m);

int64_t cpu_lstm_unit_lanes_below() { return FASTATTN_ISA_CALL(lstm_unit_lanes_below); }
bool cpu_lstm_bf16_rows_on_brgemm() { return FASTATTN_ISA_CALL(lstm_bf16_rows_on_brgemm); }

// Batches B < this run fastattn::lstm_step_gates on its GEMV-style kernel (0: none do).
int64_t cpu_lstm_step_gates_below() { return FASTATTN_ISA_CALL(lstm_step_gates_below); }

}  // namespace fastattn

namespace {

bool built_with_cuda() {
#ifdef FASTATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattn C++/CUDA kernels; ops are registered under torch.ops.fastattn";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
  m.def("cuda_archs", [] { return std::string(FASTATTN_CUDA_ARCHS); },
        "The CUDA architectures the kernels were compiled for ('' without CUDA)");
  m.def("attention_cuda_head_dims",
        [] {
          return std::vector<int>(std::begin(fastattn::kAttentionCudaHeadDims),
                                  std::end(fastattn::kAttentionCudaHeadDims));
        },
        "The head dims (E == Ev) the CUDA attention kernels are compiled for");
  m.def("cpu_isa", [] { return std::string(fastattn::cpu_isa_name(fastattn::cpu_isa())); },
        "The x86 ISA the CPU kernels use on this machine");
  m.def("cpu_isa_variants",
        [] {
          std::vector<std::tuple<std::string, std::string, int64_t>> out;
          for (const auto& v : fastattn::runnable_isa_variants()) {
            out.emplace_back(fastattn::cpu_isa_name(v.isa), v.build.vec_float_type,
                             v.build.vec_float_width);
          }
          return out;
        },
        "(isa, mangled at::vec float type, float lanes) of every compiled variant this CPU "
        "can run, each reported by the variant's own code");
  m.def("cpu_attention_tile_engine",
        [](const std::string& dtype) -> std::string {
          using fastattn::Dtype;
          const std::pair<const char*, Dtype> names[] = {{"float32", Dtype::Float32},
                                                         {"float64", Dtype::Float64},
                                                         {"bfloat16", Dtype::BFloat16},
                                                         {"float16", Dtype::Float16}};
          for (const auto& [name, value] : names) {
            if (dtype == name) {
              return fastattn::attention_cpu_tile_engine(value);
            }
          }
          throw pybind11::value_error("cpu_attention_tile_engine: dtype must be float32, "
                                      "float64, bfloat16 or float16, got " + dtype);
        },
        "The engine of the CPU attention's tile products (forward and backward) for a dtype "
        "name on this machine (at the ISA cpu_isa() reports)");
  m.def("cpu_lstm_unit_lanes_below", &fastattn::cpu_lstm_unit_lanes_below,
        "The CPU LSTM kernels put their vector lanes along the units for a batch B < this (at "
        "the ISA cpu_isa() reports), and keep their gates and gate gradients row-major then");
  m.def("cpu_lstm_bf16_rows_on_brgemm", &fastattn::cpu_lstm_bf16_rows_on_brgemm,
        "Whether the CPU LSTM kernels run bfloat16 layers without a projection on oneDNN's "
        "brgemm (AMX-BF16, or FASTATTN_CPU_TILE_ENGINE=brgemm; at the ISA cpu_isa() reports), "
        "with their lanes along the units at every batch");
  m.def("cpu_lstm_step_gates_below", &fastattn::cpu_lstm_step_gates_below,
        "fastattn::lstm_step_gates computes the gates of a batch B < this on its GEMV-style "
        "kernel (at the ISA cpu_isa() reports; 0: on none), else on two GEMMs");
  m.def("cpu_gemm_beats_torch_mm", &fastattn::cpu_gemm::beats_torch_mm,
        "Whether fastattn's float32 CPU GEMM (oneDNN brgemm) runs here and beats torch.mm's "
        "(fastattn.ops.linear then takes it)");
  m.def("cpu_gemm_wins_on_this_cpu", &fastattn::cpu_gemm::wins_on_this_cpu,
        "Whether this CPU is one where fastattn's float32 CPU GEMM beats torch.mm's, whatever "
        "FASTATTN_LSTM_GEMM says (the CPU LSTM's grad_x_proj layout follows it)");
  m.attr("cpu_gemm_linear_min_rows") = fastattn::cpu_gemm::kLinearMinRows;
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version this extension was compiled against");
  fastattn::bind_attention_eager_entry(m);
  fastattn::bind_lstm_eager_entry(m);
}
