// Multi-tensor apply for sslfast._C: one launch walks a whole list of tensors.
//
// Torch-free: only CUDA headers. Python (sslfast/ops/ema.py) builds the pointer table below byte for byte
// (numpy), hands it over as a buffer, and passes data pointers and the stream as integers.
//
// Table. Every tensor of a launch is cut into chunks of `chunk_elems` elements (a multiple of kVec);
// chunk_start[i] is the first global chunk of tensor i (a prefix sum, chunk_start[n_tensors] = n_chunks).
// The grid is one block per chunk (grid-stride loop, so any grid works); a block finds its tensor by a
// binary search over chunk_start, which lives in the kernel-parameter (constant) bank with the rest of
// the table: nothing is copied to the device, so launches need no allocation, no host sync, and are
// captured by value into CUDA graphs. The table fits the 32 KB kernel-parameter limit of CUDA >= 12.1
// on sm_70+ (kMaxTensors tensors per launch at depth 6); longer lists take a few launches.
//
// Vectors. A tensor whose pointers are all 16-byte aligned (flag kFlagVector, decided in Python) is read
// and written V elements per thread-step, V = 16 bytes / the widest element size of the kernel's lists
// (fp32 anywhere: 4; all 16-bit: 8), consecutive threads taking consecutive groups; the last numel % V
// elements, and every element of an unaligned tensor, take the scalar path. All arithmetic is fp32; each list has its own dtype (fp32 / bf16 / fp16), a template
// parameter, rounded to nearest-even on store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sslfast {

// dtype codes shared with Python (sslfast/ops/ema.py DTYPE_CODES)
constexpr int kFloat32 = 0;
constexpr int kBFloat16 = 1;
constexpr int kFloat16 = 2;

// per-tensor flags shared with Python
constexpr int kFlagVector = 1;   // every pointer of the row is 16-byte aligned: 16-byte vector accesses
constexpr int kFlagTeacher = 2;  // fused optimizer steps: the row has a teacher tensor to EMA-update
constexpr int kFlagAdapt = 4;    // LARS: the trust ratio applies (not a bias / norm parameter)
constexpr int kFlagDecay = 8;    // LARS: weight decay applies

constexpr int kMaxTensors = 448;  // per launch; depth 6 -> 28.7 KB of kernel parameters
constexpr int kThreads = 256;     // threads per block
constexpr int kVec = 8;           // chunk sizes are multiples of this (the widest vector, 8 half elements)

// table depths (tensor lists per row)
constexpr int kEmaDepth = 2;    // teacher, student
constexpr int kAdamWDepth = 6;  // param, grad, exp_avg, exp_avg_sq, teacher, step (fp32 scalar)
constexpr int kLarsDepth = 4;   // param, grad, momentum buffer, teacher

template <int DEPTH>
struct TensorTable {
  int32_t n_tensors;
  int32_t n_chunks;
  int32_t chunk_elems;
  int32_t reserved;
  uint64_t ptr[DEPTH][kMaxTensors];  // ptr[list][tensor]; 0 where a list has no tensor for that row
  int64_t numel[kMaxTensors];
  int32_t chunk_start[kMaxTensors + 1];
  int32_t flags[kMaxTensors];
};

// ------------------------------------------------------------------------------------------ elements
template <int DT>
struct Elem;

template <>
struct Elem<kFloat32> {
  using T = float;
  static __device__ __forceinline__ float load(T x) { return x; }
  static __device__ __forceinline__ T store(float x) { return x; }
};

template <>
struct Elem<kBFloat16> {
  using T = uint16_t;  // raw bits: keeps the storage type trivially copyable
  static __device__ __forceinline__ float load(T x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
  static __device__ __forceinline__ T store(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

template <>
struct Elem<kFloat16> {
  using T = uint16_t;
  static __device__ __forceinline__ float load(T x) { return __half2float(__ushort_as_half(x)); }
  static __device__ __forceinline__ T store(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

// The value a float becomes once stored in dtype DT (what a reader of that tensor sees).
template <int DT>
__device__ __forceinline__ float round_to(float x) {
  return Elem<DT>::load(Elem<DT>::store(x));
}

// Elements per thread-step on the vector path of a kernel over lists of dtypes A and B: one 16-byte access for
// the wider dtype (fp32: 4 elements; all 16-bit: 8), an 8- or 16-byte access for the narrower one. A warp's
// accesses are contiguous, so every load and store is fully coalesced.
template <int A, int B>
constexpr int vec_width() {
  return 16 / (sizeof(typename Elem<A>::T) > sizeof(typename Elem<B>::T) ? sizeof(typename Elem<A>::T)
                                                                          : sizeof(typename Elem<B>::T));
}

template <int Bytes>
struct RawVec;
template <>
struct RawVec<8> { using T = uint2; };
template <>
struct RawVec<16> { using T = uint4; };

// V consecutive elements in one 8- or 16-byte access; p must be aligned to that size (guaranteed when the
// tensor's pointer is 16-byte aligned: chunk and group offsets are multiples of V elements).
template <int DT, int V>
__device__ __forceinline__ void load_vec(const typename Elem<DT>::T* p, float (&out)[V]) {
  using T = typename Elem<DT>::T;
  using Raw = typename RawVec<V * sizeof(T)>::T;
  const Raw raw = *reinterpret_cast<const Raw*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = Elem<DT>::load(e[j]);
}

template <int DT, int V>
__device__ __forceinline__ void store_vec(typename Elem<DT>::T* p, const float (&in)[V]) {
  using T = typename Elem<DT>::T;
  using Raw = typename RawVec<V * sizeof(T)>::T;
  Raw raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int j = 0; j < V; ++j) e[j] = Elem<DT>::store(in[j]);
  *reinterpret_cast<Raw*>(p) = raw;
}

// ------------------------------------------------------------------------------------------ table walk
// The tensor that owns global chunk c: the last i with chunk_start[i] <= c (zero-size tensors are never
// in a table, so chunk_start is strictly increasing).
template <int DEPTH>
__device__ __forceinline__ int find_tensor(const TensorTable<DEPTH>& tbl, int c) {
  int lo = 0, hi = tbl.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tbl.chunk_start[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct Chunk {
  int tensor;
  int flags;
  int64_t start;  // first element of the chunk inside its tensor
  int64_t n;      // elements in the chunk
};

template <int DEPTH>
__device__ __forceinline__ Chunk chunk_of(const TensorTable<DEPTH>& tbl, int c) {
  Chunk ch;
  ch.tensor = find_tensor(tbl, c);
  ch.flags = tbl.flags[ch.tensor];
  ch.start = static_cast<int64_t>(c - tbl.chunk_start[ch.tensor]) * tbl.chunk_elems;
  const int64_t left = tbl.numel[ch.tensor] - ch.start;
  ch.n = left < tbl.chunk_elems ? left : tbl.chunk_elems;
  return ch;
}

template <int DT, int DEPTH>
__device__ __forceinline__ typename Elem<DT>::T* list_ptr(const TensorTable<DEPTH>& tbl, int list, const Chunk& ch) {
  return reinterpret_cast<typename Elem<DT>::T*>(tbl.ptr[list][ch.tensor]) + ch.start;
}

// Visits a chunk: f(i) for the V-element groups i = 0, V, 2V, ... (element offsets in the chunk) on the vector
// path, then g(i) for each remaining element. Threads of the block take consecutive groups.
template <int V, typename VecFn, typename ScalarFn>
__device__ __forceinline__ void for_each_element(const Chunk& ch, VecFn&& f, ScalarFn&& g) {
  int64_t done = 0;
  if (ch.flags & kFlagVector) {
    const int64_t groups = ch.n / V;
    for (int64_t v = threadIdx.x; v < groups; v += blockDim.x) f(v * V);
    done = groups * V;
  }
  for (int64_t i = done + threadIdx.x; i < ch.n; i += blockDim.x) g(i);
}

// ------------------------------------------------------------------------------------------ math
// torch.lerp's formula (ATen Lerp.h), so the fp32 EMA equals torch's lerp bit for bit:
// weight < 0.5 -> self + w (end - self), else end - (end - self)(1 - w).
__device__ __forceinline__ float lerp(float self, float end, float w) {
  return fabsf(w) < 0.5f ? self + w * (end - self) : end - (end - self) * (1.0f - w);
}

// EMA weight 1 - momentum: from the device scalar when given (read on the device: no host sync, and a
// captured graph reads the current value at replay), else the host float.
__device__ __forceinline__ float ema_weight(float weight, const float* momentum) {
  return momentum != nullptr ? 1.0f - __ldg(momentum) : weight;
}

// Sum of (a, b) over the block, returned to every thread. Every thread of the block must call it.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 partial[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if (lane == 0) partial[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    const int n_warps = (blockDim.x + 31) >> 5;
    float2 v = lane < n_warps ? partial[lane] : make_float2(0.f, 0.f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
      v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    }
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  const float2 total = partial[0];
  __syncthreads();  // partial[] is reused by the next call
  return total;
}

// ------------------------------------------------------------------------------------------ host side
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("sslfast._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    switched_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// After every launch: the launch's own error (bad configuration, too many parameters for the driver...).
inline void check_launch(const char* kernel) {
  check_cuda(cudaGetLastError(), kernel);
}

template <typename Fn>
inline void dispatch_dtype(int code, const char* what, Fn&& fn) {
  switch (code) {
    case kFloat32: fn(std::integral_constant<int, kFloat32>{}); break;
    case kBFloat16: fn(std::integral_constant<int, kBFloat16>{}); break;
    case kFloat16: fn(std::integral_constant<int, kFloat16>{}); break;
    default: throw std::invalid_argument(std::string("sslfast._C: unknown dtype code for ") + what + ": " +
                                         std::to_string(code));
  }
}

template <int DEPTH>
inline void check_table(const TensorTable<DEPTH>& tbl) {
  if (tbl.n_tensors < 0 || tbl.n_tensors > kMaxTensors || tbl.n_chunks < 0 || tbl.chunk_elems <= 0 ||
      tbl.chunk_elems % kVec != 0 || (tbl.n_tensors == 0) != (tbl.n_chunks == 0) ||
      (tbl.n_tensors > 0 && tbl.chunk_start[tbl.n_tensors] != tbl.n_chunks)) {
    throw std::invalid_argument("sslfast._C: malformed tensor table");
  }
}

}  // namespace sslfast
