// relaxkv_kernels._C: the one pybind11 module exposing every CUDA launcher (declared in launchers.h).
//
// The Python wrappers (relaxkv_kernels/ops/<op>/cuda.py) call the launchers positionally; strides arrive
// as tuples (pybind11/stl.h converts them to std::array). std::runtime_error -> RuntimeError,
// std::invalid_argument -> ValueError. The launches release the GIL.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "launchers.h"

namespace py = pybind11;

#ifndef RELAXKV_CUDA_ARCHS  // setup.py passes its target list (sm_80;...;compute_120); a build outside it has none
#define RELAXKV_CUDA_ARCHS
#endif
#define RELAXKV_STR2(x) #x
#define RELAXKV_STR(x) RELAXKV_STR2(x)

namespace relaxkv {

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // reset the (non-sticky) error
        return 0;
    }
    return n;
}

}  // namespace relaxkv

PYBIND11_MODULE(_C, m) {
    using namespace relaxkv;
    m.doc() = "relaxkv CUDA launchers (raw pointers, explicit strides and stream; no torch headers)";
    py::dict dtype_codes;  // the launchers' dtype argument: the enum of launchers.h is the one source
    dtype_codes["float32"] = int(kFloat32);
    dtype_codes["float16"] = int(kFloat16);
    dtype_codes["bfloat16"] = int(kBFloat16);
    m.attr("dtype_codes") = dtype_codes;
    m.attr("cuda_archs") = RELAXKV_STR(RELAXKV_CUDA_ARCHS);  // sm_XY cubins and compute_XY PTX, ';'-separated
    const auto nogil = py::call_guard<py::gil_scoped_release>();

    m.def("device_count", &device_count, "CUDA devices visible to this module's runtime; 0 without a driver.");
    m.def("rope_append_tiles", &rope_append_tiles, "Rows per frame of rope_append's fp32 [B, U, tiles, D] workspace "
          "(FP8 caches or not).");
    m.def("mid_select_splits", &mid_select_splits, "Token splits of mid_select's query sum (its workspace size).");
    m.def("rope_append_cuda", &rope_append_cuda, "Fused RoPE(q), RoPE(k) + v -> cache, frame prototypes.", nogil);
    m.def("relax_select_cuda", &relax_select_cuda, "Relax Forcing scores and history selection -> seg.", nogil);
    m.def("mid_select_cuda", &mid_select_cuda, "PackForcing mid-block affinities and top-k -> seg.", nogil);
    m.def("compress_kv_cuda", &compress_kv_cuda, "PackForcing 2x4x4 pooling into compressed K/V rows (FP8 pools: "
          "codes and scales).", nogil);
    m.def("gather_kv_rope_cuda", &gather_kv_rope_cuda, "K (delta-rotated) and V of a segment table.", nogil);
}
