// Optimizer steps fused with the teacher EMA (sslfast.optim): the student parameter is read once, updated,
// written once, and the teacher is moved towards the value just written, in the same pass.
//
// AdamW + EMA (one launch after a one-block step increment). Per row: param p, grad g, exp_avg m,
// exp_avg_sq v (all the param dtype), teacher (its own dtype, optional), step (fp32 device scalar).
// Math: torch.optim.AdamW(fused=True), i.e. ATen's fused_adam_utils.cuh, in fp32:
//     p -= lr wd p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//     p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//     teacher = lerp(teacher, p, 1 - momentum)   (with p as stored, i.e. rounded to the param dtype)
// Bytes per element, fp32: read p g m v teacher (20) + write p m v teacher (16) = 36 B.
// lr (both steps) and the EMA momentum are each a float argument or, when its pointer is not null, an fp32
// device scalar read by every block at kernel time (CUDA-graph capturable with a changing schedule).
//
// LARS + EMA (two launches). BYOL (Grill et al. 2020, appendix C) / Barlow Twins (Zbontar et al. 2021,
// official code) semantics of LARS (You et al. 2017): for every parameter tensor
//     d = g + wd p                        (no decay for bias / norm parameters)
//     q = eta ||p|| / ||d||  if ||p|| > 0 and ||d|| > 0, else 1   (q = 1 for bias / norm parameters)
//     mu = momentum mu + q d;  p -= lr mu;  teacher = lerp(teacher, p, 1 - ema_momentum)
// Pass 1 writes per-chunk sums (sum p^2, sum d^2) to a device buffer; pass 2 sums a tensor's chunk partials
// in every block of that tensor (same order in every block, so one tensor gets one q) and applies the
// update. No host sync anywhere. Bytes per element, fp32: pass 1 reads p g (8), pass 2 reads p g mu teacher
// (16) and writes p mu teacher (12) = 36 B.
#include "multi_tensor_apply.cuh"
#include "sslfast_ops.h"

namespace sslfast {
namespace {

// ------------------------------------------------------------------------------------------ AdamW
constexpr int kP = 0, kG = 1, kM = 2, kV = 3, kTeacher = 4, kStep = 5;

// A hyper-parameter given either as a float or (ptr != nullptr) as an fp32 device scalar read at kernel time:
// a CUDA graph replays with whatever value the scalar holds then.
__device__ __forceinline__ float device_scalar(float value, const float* ptr) {
  return ptr != nullptr ? __ldg(ptr) : value;
}

// step += 1 for every row (atomic: rows sharing one step tensor count once each, as torch._foreach_add_ does).
__global__ void increment_steps_kernel(const __grid_constant__ TensorTable<kAdamWDepth> tbl) {
  for (int i = threadIdx.x; i < tbl.n_tensors; i += blockDim.x) {
    atomicAdd(reinterpret_cast<float*>(tbl.ptr[kStep][i]), 1.0f);
  }
}

struct AdamW {
  float lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt;

  __device__ __forceinline__ void operator()(float& p, float g, float& m, float& v) const {
    if (weight_decay != 0.f) p -= lr * weight_decay * p;
    m = fmaf(beta1, m, fmaf(-beta1, g, g));
    v = fmaf(beta2, v, fmaf(-beta2, g * g, g * g));
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    p -= step_size * m / denom;
  }
};

template <int PD, int TD>
__global__ void __launch_bounds__(kThreads)
adamw_ema_kernel(const __grid_constant__ TensorTable<kAdamWDepth> tbl, float lr_arg, const float* lr_ptr,
                 float beta1, float beta2, float eps, float weight_decay, float weight, const float* momentum) {
  constexpr int V = vec_width<PD, TD>();
  const float w = ema_weight(weight, momentum);
  const float lr = device_scalar(lr_arg, lr_ptr);
  for (int c = blockIdx.x; c < tbl.n_chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tbl, c);
    const float step = __ldg(reinterpret_cast<const float*>(tbl.ptr[kStep][ch.tensor]));
    const float bc1 = 1.0f - powf(beta1, step);
    const AdamW adamw{lr, beta1, beta2, eps, weight_decay, lr / bc1, sqrtf(1.0f - powf(beta2, step))};
    const bool has_teacher = ch.flags & kFlagTeacher;
    auto* p = list_ptr<PD>(tbl, kP, ch);
    const auto* g = list_ptr<PD>(tbl, kG, ch);
    auto* m = list_ptr<PD>(tbl, kM, ch);
    auto* v = list_ptr<PD>(tbl, kV, ch);
    auto* t = list_ptr<TD>(tbl, kTeacher, ch);
    for_each_element<V>(
        ch,
        [&](int64_t i) {
          float pv[V], gv[V], mv[V], vv[V], tv[V];
          load_vec<PD, V>(p + i, pv);
          load_vec<PD, V>(g + i, gv);
          load_vec<PD, V>(m + i, mv);
          load_vec<PD, V>(v + i, vv);
          if (has_teacher) load_vec<TD, V>(t + i, tv);
#pragma unroll
          for (int j = 0; j < V; ++j) adamw(pv[j], gv[j], mv[j], vv[j]);
          store_vec<PD, V>(p + i, pv);
          store_vec<PD, V>(m + i, mv);
          store_vec<PD, V>(v + i, vv);
          if (has_teacher) {
#pragma unroll
            for (int j = 0; j < V; ++j) tv[j] = lerp(tv[j], round_to<PD>(pv[j]), w);
            store_vec<TD, V>(t + i, tv);
          }
        },
        [&](int64_t i) {
          float pp = Elem<PD>::load(p[i]), mm = Elem<PD>::load(m[i]), vv = Elem<PD>::load(v[i]);
          adamw(pp, Elem<PD>::load(g[i]), mm, vv);
          p[i] = Elem<PD>::store(pp);
          m[i] = Elem<PD>::store(mm);
          v[i] = Elem<PD>::store(vv);
          if (has_teacher) t[i] = Elem<TD>::store(lerp(Elem<TD>::load(t[i]), round_to<PD>(pp), w));
        });
  }
}

// ------------------------------------------------------------------------------------------ LARS
constexpr int kLarsP = 0, kLarsG = 1, kLarsMu = 2, kLarsTeacher = 3;

// The decayed update direction d = g + wd p (torch: g.add(p, alpha=wd)), or g where decay is excluded.
__device__ __forceinline__ float lars_direction(float p, float g, bool decay, float weight_decay) {
  return decay ? g + weight_decay * p : g;
}

template <int PD>
__global__ void __launch_bounds__(kThreads)
lars_norms_kernel(const __grid_constant__ TensorTable<kLarsDepth> tbl, float* partials, float weight_decay) {
  constexpr int V = vec_width<PD, PD>();
  for (int c = blockIdx.x; c < tbl.n_chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tbl, c);
    if (!(ch.flags & kFlagAdapt)) continue;  // uniform over the block
    const bool decay = ch.flags & kFlagDecay;
    const auto* p = list_ptr<PD>(tbl, kLarsP, ch);
    const auto* g = list_ptr<PD>(tbl, kLarsG, ch);
    float pp = 0.f, dd = 0.f;
    for_each_element<V>(
        ch,
        [&](int64_t i) {
          float pv[V], gv[V];
          load_vec<PD, V>(p + i, pv);
          load_vec<PD, V>(g + i, gv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float d = lars_direction(pv[j], gv[j], decay, weight_decay);
            pp = fmaf(pv[j], pv[j], pp);
            dd = fmaf(d, d, dd);
          }
        },
        [&](int64_t i) {
          const float pv = Elem<PD>::load(p[i]);
          const float d = lars_direction(pv, Elem<PD>::load(g[i]), decay, weight_decay);
          pp = fmaf(pv, pv, pp);
          dd = fmaf(d, d, dd);
        });
    const float2 s = block_sum2(pp, dd);
    if (threadIdx.x == 0) {
      partials[2 * static_cast<int64_t>(c)] = s.x;
      partials[2 * static_cast<int64_t>(c) + 1] = s.y;
    }
  }
}

struct Lars {
  float lr, momentum, weight_decay, q;
  bool decay;

  __device__ __forceinline__ void operator()(float& p, float g, float& mu) const {
    const float d = lars_direction(p, g, decay, weight_decay) * q;
    mu = __fmul_rn(mu, momentum) + d;  // torch: mu.mul_(momentum).add_(d), two roundings
    p = fmaf(-lr, mu, p);               // torch: p.add_(mu, alpha=-lr)
  }
};

template <int PD, int TD>
__global__ void __launch_bounds__(kThreads)
lars_ema_kernel(const __grid_constant__ TensorTable<kLarsDepth> tbl, const float* partials, float lr_arg,
                const float* lr_ptr, float momentum, float weight_decay, float eta, float weight,
                const float* ema_momentum) {
  constexpr int V = vec_width<PD, TD>();
  const float w = ema_weight(weight, ema_momentum);
  const float lr = device_scalar(lr_arg, lr_ptr);
  for (int c = blockIdx.x; c < tbl.n_chunks; c += gridDim.x) {
    const Chunk ch = chunk_of(tbl, c);
    float q = 1.0f;
    if (ch.flags & kFlagAdapt) {  // uniform over the block: every thread takes part in the reduction
      float pp = 0.f, dd = 0.f;
      for (int k = tbl.chunk_start[ch.tensor] + threadIdx.x; k < tbl.chunk_start[ch.tensor + 1]; k += blockDim.x) {
        pp += partials[2 * static_cast<int64_t>(k)];
        dd += partials[2 * static_cast<int64_t>(k) + 1];
      }
      const float2 s = block_sum2(pp, dd);
      const float p_norm = sqrtf(s.x), d_norm = sqrtf(s.y);
      q = (p_norm > 0.f && d_norm > 0.f) ? eta * p_norm / d_norm : 1.0f;
    }
    const Lars lars{lr, momentum, weight_decay, q, static_cast<bool>(ch.flags & kFlagDecay)};
    const bool has_teacher = ch.flags & kFlagTeacher;
    auto* p = list_ptr<PD>(tbl, kLarsP, ch);
    const auto* g = list_ptr<PD>(tbl, kLarsG, ch);
    auto* mu = list_ptr<PD>(tbl, kLarsMu, ch);
    auto* t = list_ptr<TD>(tbl, kLarsTeacher, ch);
    for_each_element<V>(
        ch,
        [&](int64_t i) {
          float pv[V], gv[V], mv[V], tv[V];
          load_vec<PD, V>(p + i, pv);
          load_vec<PD, V>(g + i, gv);
          load_vec<PD, V>(mu + i, mv);
          if (has_teacher) load_vec<TD, V>(t + i, tv);
#pragma unroll
          for (int j = 0; j < V; ++j) lars(pv[j], gv[j], mv[j]);
          store_vec<PD, V>(p + i, pv);
          store_vec<PD, V>(mu + i, mv);
          if (has_teacher) {
#pragma unroll
            for (int j = 0; j < V; ++j) tv[j] = lerp(tv[j], round_to<PD>(pv[j]), w);
            store_vec<TD, V>(t + i, tv);
          }
        },
        [&](int64_t i) {
          float pp = Elem<PD>::load(p[i]), mm = Elem<PD>::load(mu[i]);
          lars(pp, Elem<PD>::load(g[i]), mm);
          p[i] = Elem<PD>::store(pp);
          mu[i] = Elem<PD>::store(mm);
          if (has_teacher) t[i] = Elem<TD>::store(lerp(Elem<TD>::load(t[i]), round_to<PD>(pp), w));
        });
  }
}

}  // namespace

void adamw_ema_apply(const void* table, int param_dtype, int teacher_dtype, float lr, uintptr_t lr_ptr,
                     float beta1, float beta2, float eps, float weight_decay, float ema_weight,
                     uintptr_t ema_momentum, uintptr_t stream, int device) {
  const auto& tbl = *static_cast<const TensorTable<kAdamWDepth>*>(table);
  check_table(tbl);
  if (tbl.n_chunks == 0) return;
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(param_dtype, "param", [&](auto pd) {
    dispatch_dtype(teacher_dtype, "teacher", [&](auto td) {
      increment_steps_kernel<<<1, kThreads, 0, s>>>(tbl);
      check_launch("increment_steps_kernel launch");
      adamw_ema_kernel<decltype(pd)::value, decltype(td)::value><<<tbl.n_chunks, kThreads, 0, s>>>(
          tbl, lr, reinterpret_cast<const float*>(lr_ptr), beta1, beta2, eps, weight_decay, ema_weight,
          reinterpret_cast<const float*>(ema_momentum));
      check_launch("adamw_ema_kernel launch");
    });
  });
}

void lars_ema_apply(const void* table, int param_dtype, int teacher_dtype, uintptr_t partials, float lr,
                    uintptr_t lr_ptr, float momentum, float weight_decay, float eta, float ema_weight,
                    uintptr_t ema_momentum, uintptr_t stream, int device) {
  const auto& tbl = *static_cast<const TensorTable<kLarsDepth>*>(table);
  check_table(tbl);
  if (tbl.n_chunks == 0) return;
  if (partials == 0) throw std::invalid_argument("sslfast._C: lars_ema_apply needs a partials buffer");
  DeviceGuard guard(device);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  auto* part = reinterpret_cast<float*>(partials);
  dispatch_dtype(param_dtype, "param", [&](auto pd) {
    dispatch_dtype(teacher_dtype, "teacher", [&](auto td) {
      lars_norms_kernel<decltype(pd)::value><<<tbl.n_chunks, kThreads, 0, s>>>(tbl, part, weight_decay);
      check_launch("lars_norms_kernel launch");
      lars_ema_kernel<decltype(pd)::value, decltype(td)::value><<<tbl.n_chunks, kThreads, 0, s>>>(
          tbl, part, lr, reinterpret_cast<const float*>(lr_ptr), momentum, weight_decay, eta, ema_weight,
          reinterpret_cast<const float*>(ema_momentum));
      check_launch("lars_ema_kernel launch");
    });
  });
}

}  // namespace sslfast
