// sslfast._C: the pybind11 module over the torch-free CUDA kernels of csrc/.
//
// Python (sslfast/ops/ema.py) packs each launch's TensorTable into a numpy uint8 buffer; `table_layout`
// exposes the C++ layout so the Python packer is checked against it in CI (no GPU needed). Pointers and
// the stream are plain integers (tensor.data_ptr(), torch.cuda.current_stream().cuda_stream); every CUDA
// call is checked and failures surface as RuntimeError with the CUDA error string.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstring>
#include <vector>

#include "multi_tensor_apply.cuh"
#include "sslfast_ops.h"

namespace py = pybind11;

namespace {

template <int DEPTH>
py::dict layout() {
  using Table = sslfast::TensorTable<DEPTH>;
  py::dict d;
  d["n_tensors"] = offsetof(Table, n_tensors);
  d["n_chunks"] = offsetof(Table, n_chunks);
  d["chunk_elems"] = offsetof(Table, chunk_elems);
  d["ptr"] = offsetof(Table, ptr);
  d["numel"] = offsetof(Table, numel);
  d["chunk_start"] = offsetof(Table, chunk_start);
  d["flags"] = offsetof(Table, flags);
  d["size"] = sizeof(Table);
  return d;
}

py::dict table_layout(int depth) {
  switch (depth) {
    case sslfast::kEmaDepth: return layout<sslfast::kEmaDepth>();
    case sslfast::kLarsDepth: return layout<sslfast::kLarsDepth>();
    case sslfast::kAdamWDepth: return layout<sslfast::kAdamWDepth>();
    default: throw std::invalid_argument("sslfast._C.table_layout: no table of depth " + std::to_string(depth));
  }
}

// The table bytes of a numpy uint8 buffer, 8-byte aligned (copied when the buffer is not).
class TableBytes {
 public:
  TableBytes(const py::buffer& buf, size_t expected) {
    const py::buffer_info info = buf.request();
    const size_t nbytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
    if (info.ndim != 1 || info.itemsize != 1 || nbytes != expected) {
      throw std::invalid_argument("sslfast._C: table must be a 1-D uint8 buffer of " + std::to_string(expected) +
                                  " bytes, got " + std::to_string(nbytes));
    }
    if (reinterpret_cast<uintptr_t>(info.ptr) % alignof(uint64_t) == 0) {
      ptr_ = info.ptr;
    } else {
      copy_.resize((expected + 7) / 8);
      std::memcpy(copy_.data(), info.ptr, expected);
      ptr_ = copy_.data();
    }
  }
  const void* get() const { return ptr_; }

 private:
  const void* ptr_ = nullptr;
  std::vector<uint64_t> copy_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sslfast CUDA kernels (torch-free): multi-tensor EMA and fused optimizer steps + EMA";

  m.attr("MAX_TENSORS") = sslfast::kMaxTensors;
  m.attr("THREADS") = sslfast::kThreads;
  m.attr("VEC") = sslfast::kVec;
  m.attr("EMA_DEPTH") = sslfast::kEmaDepth;
  m.attr("ADAMW_DEPTH") = sslfast::kAdamWDepth;
  m.attr("LARS_DEPTH") = sslfast::kLarsDepth;
  m.attr("FLAG_VECTOR") = sslfast::kFlagVector;
  m.attr("FLAG_TEACHER") = sslfast::kFlagTeacher;
  m.attr("FLAG_ADAPT") = sslfast::kFlagAdapt;
  m.attr("FLAG_DECAY") = sslfast::kFlagDecay;
  py::dict codes;
  codes["float32"] = sslfast::kFloat32;
  codes["bfloat16"] = sslfast::kBFloat16;
  codes["float16"] = sslfast::kFloat16;
  m.attr("DTYPE_CODES") = codes;

  m.def("table_layout", &table_layout, py::arg("depth"),
        "Byte offsets of the TensorTable<depth> fields and its size, for the Python packer.");

  m.def(
      "ema_apply",
      [](const py::buffer& table, int teacher_dtype, int student_dtype, float weight, uintptr_t momentum,
         uintptr_t stream, int device) {
        TableBytes t(table, sizeof(sslfast::TensorTable<sslfast::kEmaDepth>));
        sslfast::ema_apply(t.get(), teacher_dtype, student_dtype, weight, momentum, stream, device);
      },
      py::arg("table"), py::arg("teacher_dtype"), py::arg("student_dtype"), py::arg("weight"),
      py::arg("momentum_ptr"), py::arg("stream"), py::arg("device"),
      "teacher <- lerp(teacher, student, w) for every row of the table; w = 1 - *momentum_ptr if momentum_ptr "
      "else weight.");

  m.def(
      "adamw_ema_apply",
      [](const py::buffer& table, int param_dtype, int teacher_dtype, float lr, uintptr_t lr_ptr, float beta1,
         float beta2, float eps, float weight_decay, float ema_weight, uintptr_t ema_momentum, uintptr_t stream,
         int device) {
        TableBytes t(table, sizeof(sslfast::TensorTable<sslfast::kAdamWDepth>));
        sslfast::adamw_ema_apply(t.get(), param_dtype, teacher_dtype, lr, lr_ptr, beta1, beta2, eps, weight_decay,
                                 ema_weight, ema_momentum, stream, device);
      },
      py::arg("table"), py::arg("param_dtype"), py::arg("teacher_dtype"), py::arg("lr"), py::arg("lr_ptr"),
      py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("ema_weight"),
      py::arg("ema_momentum_ptr"), py::arg("stream"), py::arg("device"),
      "One AdamW step per row (steps incremented on the device), then the flagged teachers' EMA; lr = *lr_ptr "
      "(fp32, read on the device) if lr_ptr else lr.");

  m.def(
      "lars_ema_apply",
      [](const py::buffer& table, int param_dtype, int teacher_dtype, uintptr_t partials, float lr, uintptr_t lr_ptr,
         float momentum, float weight_decay, float eta, float ema_weight, uintptr_t ema_momentum, uintptr_t stream,
         int device) {
        TableBytes t(table, sizeof(sslfast::TensorTable<sslfast::kLarsDepth>));
        sslfast::lars_ema_apply(t.get(), param_dtype, teacher_dtype, partials, lr, lr_ptr, momentum, weight_decay,
                                eta, ema_weight, ema_momentum, stream, device);
      },
      py::arg("table"), py::arg("param_dtype"), py::arg("teacher_dtype"), py::arg("partials_ptr"), py::arg("lr"),
      py::arg("lr_ptr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("eta"), py::arg("ema_weight"),
      py::arg("ema_momentum_ptr"), py::arg("stream"), py::arg("device"),
      "LARS (BYOL / Barlow Twins semantics) + EMA: per-chunk norms into partials_ptr (2 floats per chunk), "
      "then the update (lr = *lr_ptr if lr_ptr else lr); no host sync.");
}
