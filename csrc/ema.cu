// Multi-tensor EMA: teacher <- momentum * teacher + (1 - momentum) * student, as torch.lerp(teacher,
// student, 1 - momentum) in fp32 and rounded once to the teacher's dtype.
//
// Launch: one 256-thread block per chunk of the table (multi_tensor_apply.cuh). Per element it moves
// sizeof(teacher) * 2 + sizeof(student) bytes (fp32: 12 B), the floor for an in-place EMA.
#include "multi_tensor_apply.cuh"
#include "sslfast_ops.h"

namespace sslfast {
namespace {

template <int TD, int SD>
__global__ void __launch_bounds__(kThreads, 8)  // <= 32 registers: 2048 threads per SM
ema_kernel(const __grid_constant__ TensorTable<kEmaDepth> tbl, float weight, const float* momentum) {
  constexpr int V = vec_width<TD, SD>();
  const float w = ema_weight(weight, momentum);
  for (int c = blockIdx.x; c < tbl.n_chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tbl, c);
    auto* t = list_ptr<TD>(tbl, 0, ch);
    const auto* s = list_ptr<SD>(tbl, 1, ch);
    for_each_element<V>(
        ch,
        [&](int64_t i) {
          float a[V], b[V];
          load_vec<TD, V>(t + i, a);
          load_vec<SD, V>(s + i, b);
#pragma unroll
          for (int j = 0; j < V; ++j) a[j] = lerp(a[j], b[j], w);
          store_vec<TD, V>(t + i, a);
        },
        [&](int64_t i) {
          t[i] = Elem<TD>::store(lerp(Elem<TD>::load(t[i]), Elem<SD>::load(s[i]), w));
        });
  }
}

}  // namespace

void ema_apply(const void* table, int teacher_dtype, int student_dtype, float weight, uintptr_t momentum,
               uintptr_t stream, int device) {
  const auto& tbl = *static_cast<const TensorTable<kEmaDepth>*>(table);
  check_table(tbl);
  if (tbl.n_chunks == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(teacher_dtype, "teacher", [&](auto td) {
    dispatch_dtype(student_dtype, "student", [&](auto sd) {
      ema_kernel<decltype(td)::value, decltype(sd)::value>
          <<<tbl.n_chunks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              tbl, weight, reinterpret_cast<const float*>(momentum));
      check_launch("ema_kernel launch");
    });
  });
}

}  // namespace sslfast
