// relaxkv_kernels._C: the one pybind11 module exposing every CUDA launcher.
//
// Launchers take raw device pointers (Tensor.data_ptr()), sizes, strides in elements, a dtype code
// and the cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream); the Python side
// (relaxkv_kernels/cuda/) validates tensors and fills these in. std::runtime_error -> RuntimeError,
// std::invalid_argument -> ValueError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace relaxkv {

// Number of CUDA devices visible to this module's runtime; 0 without a device or driver.
int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // reset the (non-sticky) error
        return 0;
    }
    return n;
}

// Launchers (csrc/<op>.cu).
void rope_append_cuda(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t q_rot, uintptr_t k_cache,
                      uintptr_t v_cache, uintptr_t proto, uintptr_t frame_slot,
                      uintptr_t frame_pos, int64_t batch, int64_t frames, int64_t height,
                      int64_t width, int64_t heads, int64_t head_dim, int64_t cache_rows,
                      int64_t n_slots, int64_t q_sb, int64_t q_sn, int64_t q_sh, int64_t k_sb,
                      int64_t k_sn, int64_t k_sh, int64_t v_sb, int64_t v_sn, int64_t v_sh,
                      int64_t o_sb, int64_t o_sn, int64_t o_sh, int64_t kc_sb, int64_t kc_sn,
                      int64_t kc_sh, int64_t vc_sb, int64_t vc_sn, int64_t vc_sh, int64_t p_sb,
                      int64_t p_ss, int64_t slot_stride, int64_t pos_stride, int dtype,
                      uintptr_t stream);
}  // namespace relaxkv

PYBIND11_MODULE(_C, m) {
    m.doc() = "relaxkv CUDA launchers (raw pointers, explicit strides and stream; no torch headers)";
    m.attr("DTYPE_FLOAT32") = 0;
    m.attr("DTYPE_FLOAT16") = 1;
    m.attr("DTYPE_BFLOAT16") = 2;

    m.def("device_count", &relaxkv::device_count,
          "Number of CUDA devices visible to this module's runtime; 0 without a device or driver.");

    m.def("rope_append_cuda", &relaxkv::rope_append_cuda,
          "Fused RoPE(q), RoPE(k) -> k_cache, v -> v_cache, pre-RoPE frame means -> proto "
          "(csrc/rope_append.cuh). Asynchronous on `stream`.",
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_rot"), py::arg("k_cache"),
          py::arg("v_cache"), py::arg("proto"), py::arg("frame_slot"), py::arg("frame_pos"),
          py::arg("batch"), py::arg("frames"), py::arg("height"), py::arg("width"),
          py::arg("heads"), py::arg("head_dim"), py::arg("cache_rows"), py::arg("n_slots"),
          py::arg("q_sb"), py::arg("q_sn"), py::arg("q_sh"), py::arg("k_sb"), py::arg("k_sn"),
          py::arg("k_sh"), py::arg("v_sb"), py::arg("v_sn"), py::arg("v_sh"), py::arg("o_sb"),
          py::arg("o_sn"), py::arg("o_sh"), py::arg("kc_sb"), py::arg("kc_sn"), py::arg("kc_sh"),
          py::arg("vc_sb"), py::arg("vc_sn"), py::arg("vc_sh"), py::arg("p_sb"), py::arg("p_ss"),
          py::arg("slot_stride"), py::arg("pos_stride"), py::arg("dtype"), py::arg("stream"),
          py::call_guard<py::gil_scoped_release>());
}
