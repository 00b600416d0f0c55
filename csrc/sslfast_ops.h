// Host entry points of sslfast._C (defined in ema.cu and optim.cu, bound in bindings.cu).
// `table` points at a TensorTable<depth> built by sslfast/ops/ema.py; pointers and streams are integers.
#pragma once

#include <cstdint>

namespace sslfast {

// teacher <- lerp(teacher, student, w), w = 1 - *momentum if momentum != 0 else weight.
void ema_apply(const void* table, int teacher_dtype, int student_dtype, float weight, uintptr_t momentum,
               uintptr_t stream, int device);

// One AdamW step (torch.optim.AdamW(fused=True) math) per row, then the row's teacher (if flagged) <-
// lerp(teacher, new param, w). Increments each row's fp32 step scalar first. The learning rate is *lr_ptr
// (an fp32 device scalar read by the kernel) if lr_ptr != 0, else lr; likewise the EMA momentum.
void adamw_ema_apply(const void* table, int param_dtype, int teacher_dtype, float lr, uintptr_t lr_ptr,
                     float beta1, float beta2, float eps, float weight_decay, float ema_weight,
                     uintptr_t ema_momentum, uintptr_t stream, int device);

// LARS (BYOL / Barlow Twins) + EMA in two launches: per-chunk squared norms of p and of the decayed update
// into `partials` (2 floats per chunk), then the update pass that reduces them per tensor on the device.
// lr = *lr_ptr if lr_ptr != 0 (read on the device), else lr.
void lars_ema_apply(const void* table, int param_dtype, int teacher_dtype, uintptr_t partials, float lr,
                    uintptr_t lr_ptr, float momentum, float weight_decay, float eta, float ema_weight,
                    uintptr_t ema_momentum, uintptr_t stream, int device);

}  // namespace sslfast
