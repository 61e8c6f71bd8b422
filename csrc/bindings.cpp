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
void relax_select_cuda(uintptr_t proto, uintptr_t slot_pos, uintptr_t sink_slots, uintptr_t tail_slots,
                       uintptr_t cand_slots, uintptr_t target_pos, uintptr_t seg, uintptr_t scores,
                       int64_t batch, int64_t n_slots, int64_t head_dim, int64_t n_sink, int64_t n_tail,
                       int64_t n_cand, int64_t n_sel, int64_t n_seg, int64_t seg_index,
                       int64_t frame_tokens, double lam, bool batch0_decides, bool contiguous,
                       int64_t p_sb, int64_t p_ss, int64_t p_sd, int64_t s_pos, int64_t s_sink,
                       int64_t s_tail, int64_t s_cand, int64_t s_tgt, int64_t s_sb, int64_t s_ss,
                       int64_t s_sf, int64_t o_sb, int64_t o_sc, uintptr_t stream);
int64_t mid_select_splits(int64_t n_sub);
void mid_select_cuda(uintptr_t q, uintptr_t mean_key, uintptr_t mid_slots, uintptr_t block_pos,
                     uintptr_t target_pos, uintptr_t seg, uintptr_t scores, uintptr_t ws, int64_t batch,
                     int64_t n_q, int64_t heads, int64_t head_dim, int64_t n_blocks, int64_t n_mid,
                     int64_t n_sel, int64_t n_seg, int64_t seg_index, int64_t row0, int64_t block_tokens,
                     int64_t q_stride, int64_t n_split, int64_t q_sb, int64_t q_sn, int64_t q_sh,
                     int64_t k_sb, int64_t k_sn, int64_t k_sh, int64_t k_sd, int64_t s_mid, int64_t s_pos,
                     int64_t s_tgt, int64_t s_sb, int64_t s_ss, int64_t s_sf, int64_t o_s, int dtype,
                     uintptr_t stream);
void compress_kv_cuda(uintptr_t k, uintptr_t v, uintptr_t k_pool, uintptr_t v_pool, uintptr_t mean_key,
                      uintptr_t ws, uintptr_t block_slot, uintptr_t t0, int64_t batch, int64_t frames,
                      int64_t height, int64_t width, int64_t heads, int64_t head_dim, int64_t n_rows,
                      int64_t row0, int64_t n_blocks, int64_t k_sb, int64_t k_sn, int64_t k_sh,
                      int64_t v_sb, int64_t v_sn, int64_t v_sh, int64_t kp_sb, int64_t kp_sn, int64_t kp_sh,
                      int64_t vp_sb, int64_t vp_sn, int64_t vp_sh, int64_t m_sb, int64_t m_ss, int64_t m_sh,
                      int64_t m_sd, int dtype, uintptr_t stream);
void gather_kv_rope_cuda(uintptr_t k_pool, uintptr_t v_pool, uintptr_t seg, uintptr_t k, uintptr_t v,
                         int64_t batch, int64_t n_rows, int64_t heads, int64_t head_dim, int64_t n_seg,
                         int64_t total, int64_t kp_sb, int64_t kp_sn, int64_t kp_sh, int64_t vp_sb,
                         int64_t vp_sn, int64_t vp_sh, int64_t s_sb, int64_t s_ss, int64_t s_sf, int dtype,
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
          py::arg("vp_sh"), py::arg("s_sb"), py::arg("s_ss"), py::arg("s_sf"), py::arg("dtype"),
          py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
