// relaxkv_kernels._C: the one pybind11 module exposing every CUDA launcher.
//
// Launchers take raw device pointers (Tensor.data_ptr()), sizes, strides in elements, a dtype code
// and the cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream); the Python side
// (relaxkv_kernels/cuda/) validates tensors and fills these in. std::runtime_error -> RuntimeError,
// std::invalid_argument -> ValueError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "launchers.h"

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

}  // namespace relaxkv

PYBIND11_MODULE(_C, m) {
    m.doc() = "relaxkv CUDA launchers (raw pointers, explicit strides and stream; no torch headers)";
    py::dict dtype_codes;  // the launchers' dtype argument: the enum of common.cuh is the one source
    dtype_codes["float32"] = int(relaxkv::kFloat32);
    dtype_codes["float16"] = int(relaxkv::kFloat16);
    dtype_codes["bfloat16"] = int(relaxkv::kBFloat16);
    m.attr("dtype_codes") = dtype_codes;

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

    m.def("relax_select_cuda", &relaxkv::relax_select_cuda,
          "Relax Forcing candidate scores and top-H history frames -> segment table "
          "(csrc/relax_select.cuh). Asynchronous on `stream`.",
          py::arg("proto"), py::arg("slot_pos"), py::arg("sink_slots"), py::arg("tail_slots"),
          py::arg("cand_slots"), py::arg("target_pos"), py::arg("seg"), py::arg("scores"), py::arg("batch"),
          py::arg("n_slots"), py::arg("head_dim"), py::arg("n_sink"), py::arg("n_tail"), py::arg("n_cand"),
          py::arg("n_sel"), py::arg("n_seg"), py::arg("seg_index"), py::arg("frame_tokens"), py::arg("lam"),
          py::arg("batch0_decides"), py::arg("contiguous"), py::arg("p_sb"), py::arg("p_ss"), py::arg("p_sd"),
          py::arg("s_pos"), py::arg("s_sink"), py::arg("s_tail"), py::arg("s_cand"), py::arg("s_tgt"),
          py::arg("s_sb"), py::arg("s_ss"), py::arg("s_sf"), py::arg("o_sb"), py::arg("o_sc"),
          py::arg("stream"), py::call_guard<py::gil_scoped_release>());

    m.def("mid_select_splits", &relaxkv::mid_select_splits,
          "Number of token splits of mid_select's query sum for |Sq| subsampled tokens (workspace size).",
          py::arg("n_sub"));

    m.def("mid_select_cuda", &relaxkv::mid_select_cuda,
          "PackForcing mid-block affinities and top-k -> segment table (csrc/mid_select.cuh). "
          "Asynchronous on `stream`; ws: fp32 [B * H/2 * (n_split + 1) * D] workspace.",
          py::arg("q"), py::arg("mean_key"), py::arg("mid_slots"), py::arg("block_pos"), py::arg("target_pos"),
          py::arg("seg"), py::arg("scores"), py::arg("ws"), py::arg("batch"), py::arg("n_q"), py::arg("heads"),
          py::arg("head_dim"), py::arg("n_blocks"), py::arg("n_mid"), py::arg("n_sel"), py::arg("n_seg"),
          py::arg("seg_index"), py::arg("row0"), py::arg("block_tokens"), py::arg("q_stride"),
          py::arg("n_split"), py::arg("q_sb"), py::arg("q_sn"), py::arg("q_sh"), py::arg("k_sb"),
          py::arg("k_sn"), py::arg("k_sh"), py::arg("k_sd"), py::arg("s_mid"), py::arg("s_pos"),
          py::arg("s_tgt"), py::arg("s_sb"), py::arg("s_ss"), py::arg("s_sf"), py::arg("o_s"),
          py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

    m.def("compress_kv_cuda", &relaxkv::compress_kv_cuda,
          "PackForcing 2x4x4 pooling of a block into compressed K (RoPE at window centres) / V rows and "
          "its mean key (csrc/compress_kv.cuh). Asynchronous on `stream`; ws: fp32 [B, Nc, H, D] workspace.",
          py::arg("k"), py::arg("v"), py::arg("k_pool"), py::arg("v_pool"), py::arg("mean_key"), py::arg("ws"),
          py::arg("block_slot"), py::arg("t0"), py::arg("batch"), py::arg("frames"), py::arg("height"),
          py::arg("width"), py::arg("heads"), py::arg("head_dim"), py::arg("n_rows"), py::arg("row0"),
          py::arg("n_blocks"), py::arg("k_sb"), py::arg("k_sn"), py::arg("k_sh"), py::arg("v_sb"),
          py::arg("v_sn"), py::arg("v_sh"), py::arg("kp_sb"), py::arg("kp_sn"), py::arg("kp_sh"),
          py::arg("vp_sb"), py::arg("vp_sn"), py::arg("vp_sh"), py::arg("m_sb"), py::arg("m_ss"),
          py::arg("m_sh"), py::arg("m_sd"), py::arg("dtype"), py::arg("stream"),
          py::call_guard<py::gil_scoped_release>());

    m.def("gather_kv_rope_cuda", &relaxkv::gather_kv_rope_cuda,
          "K (temporal delta-rotated) and V of a segment table -> contiguous [B, total, H, D] "
          "(csrc/gather_kv_rope.cuh). Asynchronous on `stream`.",
          py::arg("k_pool"), py::arg("v_pool"), py::arg("seg"), py::arg("k"), py::arg("v"), py::arg("batch"),
          py::arg("n_rows"), py::arg("heads"), py::arg("head_dim"), py::arg("n_seg"), py::arg("total"),
          py::arg("kp_sb"), py::arg("kp_sn"), py::arg("kp_sh"), py::arg("vp_sb"), py::arg("vp_sn"),
          py::arg("vp_sh"), py::arg("s_sb"), py::arg("s_ss"), py::arg("s_sf"), py::arg("o_sb"), py::arg("dtype"),
          py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
