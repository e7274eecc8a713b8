// What every attention glue file (CPU: attention_cpu.cpp; CUDA: attention_cuda.cpp,
// attention_varlen_cuda.cpp) fills the same way: the pointers and (batch, head, row) strides of
// the tensors in AttentionParams / AttentionBwdParams. Knows no device and no attention math;
// the checks, sizes and options stay with each device's glue.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "fastattn/attention_params.h"

namespace fastattn {
namespace glue {

// The (batch, head, row) strides of a [B, H, rows, D] tensor, or of a packed varlen
// [rows, H, D] one (batch stride 0: its sequences start at row offsets).
inline void row_strides(int64_t (&dst)[3], const at::Tensor& t) {
  if (t.dim() == 4) {
    dst[0] = t.stride(0), dst[1] = t.stride(1), dst[2] = t.stride(2);
  } else {
    dst[0] = 0, dst[1] = t.stride(1), dst[2] = t.stride(0);
  }
}

// The q / k / v pointers and row strides (dense [B, H, rows, E], packed [rows, H, E], or a KV
// cache's k / v). The tensors the kernels read, kept alive by the caller.
inline void fill_qkv_tensors(AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  row_strides(p.q_stride, q);
  row_strides(p.k_stride, k);
  row_strides(p.v_stride, v);
}

// The forward's outputs: out (laid out like q) and the float32 lse.
inline void fill_outputs(AttentionParams& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = out.data_ptr();
  row_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();
}

// The backward's tensors besides the inputs': the forward's out / lse, grad_out and the
// gradients dq, dk, dv. Inputs kept alive by the caller.
inline void fill_bwd_tensors(AttentionBwdParams& p, const at::Tensor& grad_out,
                             const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq,
                             const at::Tensor& dk, const at::Tensor& dv) {
  fill_outputs(p, out, lse);
  p.grad_out = grad_out.data_ptr();
  row_strides(p.grad_out_stride, grad_out);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  row_strides(p.dq_stride, dq);
  row_strides(p.dk_stride, dk);
  row_strides(p.dv_stride, dv);
}

}  // namespace glue
}  // namespace fastattn
