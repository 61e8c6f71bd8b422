// The launchers of csrc/<op>.cu as bindings.cpp exposes them (relaxkv_kernels._C), and the dtype codes
// they take: the one declaration of each, included by the .cu files (so the compiler checks their
// definitions against it) and by bindings.cpp. Host-only C++: no CUDA or torch headers.
//
// Launchers take raw device pointers (Tensor.data_ptr()), sizes, strides in elements, a dtype code and
// the cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream); the Python wrappers in
// relaxkv_kernels/ops/<op>/cuda.py fill these in. std::invalid_argument -> ValueError, std::runtime_error
// -> RuntimeError.
#pragma once

#include <cstdint>

namespace relaxkv {

// Element type of a tensor. Python reads the codes from the module (relaxkv_kernels._C.dtype_codes).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Number of CUDA devices visible to this module's runtime; 0 without a device or driver.
int device_count();

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
                         int64_t vp_sn, int64_t vp_sh, int64_t s_sb, int64_t s_ss, int64_t s_sf, int64_t o_sb,
                         int dtype, uintptr_t stream);
}  // namespace relaxkv
