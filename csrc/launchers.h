// The launchers of csrc/<op>.cu as bindings.cpp exposes them (relaxkv_kernels._C), and the dtype codes
// they take: the one declaration of each, included by the .cu files (so the compiler checks their
// definitions against it) and by bindings.cpp. Host-only C++: no CUDA or torch headers.
//
// Launchers take raw device pointers (Tensor.data_ptr()), a float tensor's strides in elements as one
// array (Tensor.stride()[:3]: batch, row, head; its last dim is contiguous unless the array has 4 entries),
// contiguous int64 index tensors as bare pointers, sizes, a dtype code and the cudaStream_t as an integer
// (torch.cuda.current_stream().cuda_stream). The Python wrappers in relaxkv_kernels/ops/<op>/cuda.py call
// them positionally. std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#pragma once

#include <array>
#include <cstdint>

namespace relaxkv {

// Element type of a tensor. Python reads the codes from the module (relaxkv_kernels._C.dtype_codes).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

using Strides3 = std::array<int64_t, 3>;
using Strides4 = std::array<int64_t, 4>;

// Number of CUDA devices visible to this module's runtime; 0 without a device or driver.
int device_count();

// k_scale, v_scale: fp32 [B, n_rows, H] scales of FP8 (uint8 e4m3 code) caches; both 0 for caches of `dtype`.
void rope_append_cuda(uintptr_t q, Strides3 q_s, uintptr_t k, Strides3 k_s, uintptr_t v, Strides3 v_s,
                      uintptr_t q_rot, Strides3 o_s, uintptr_t k_cache, Strides3 kc_s, uintptr_t v_cache,
                      Strides3 vc_s, uintptr_t k_scale, Strides3 ks_s, uintptr_t v_scale, Strides3 vs_s,
                      uintptr_t proto, int64_t p_sb, int64_t p_ss, uintptr_t ws, uintptr_t frame_slot,
                      uintptr_t frame_pos, int64_t batch, int64_t frames, int64_t height, int64_t width, int64_t heads,
                      int64_t head_dim, int64_t cache_rows, int64_t n_slots, int dtype, uintptr_t stream);
int64_t rope_append_tiles(int64_t frame_tokens, int64_t head_dim, bool fp8);

void relax_select_cuda(uintptr_t proto, Strides3 p_s, uintptr_t slot_pos, uintptr_t sink_slots, uintptr_t tail_slots,
                       uintptr_t cand_slots, uintptr_t target_pos, uintptr_t seg, Strides3 s_s, uintptr_t scores,
                       int64_t batch, int64_t n_slots, int64_t head_dim, int64_t n_sink, int64_t n_tail, int64_t n_cand,
                       int64_t n_sel, int64_t n_seg, int64_t seg_index, int64_t frame_tokens, double lam, double eps,
                       bool batch0_decides, bool contiguous, uintptr_t stream);

int64_t mid_select_splits(int64_t n_sub);
void mid_select_cuda(uintptr_t q, Strides3 q_s, uintptr_t mean_key, Strides4 k_s, uintptr_t mid_slots,
                     uintptr_t block_pos, uintptr_t target_pos, uintptr_t seg, Strides3 s_s, uintptr_t scores,
                     uintptr_t ws, int64_t batch, int64_t n_q, int64_t heads, int64_t head_dim, int64_t n_blocks,
                     int64_t n_mid, int64_t n_sel, int64_t n_seg, int64_t seg_index, int64_t row0, int64_t block_tokens,
                     int64_t q_stride, bool batch_mean, int64_t n_split, int dtype, uintptr_t stream);

void compress_kv_cuda(uintptr_t k, Strides3 k_s, uintptr_t v, Strides3 v_s, uintptr_t k_pool, Strides3 kp_s,
                      uintptr_t v_pool, Strides3 vp_s, uintptr_t k_scale, Strides3 ks_s, uintptr_t v_scale,
                      Strides3 vs_s, uintptr_t mean_key, Strides4 m_s, uintptr_t ws,
                      uintptr_t block_slot, uintptr_t t0, int64_t batch, int64_t frames, int64_t height, int64_t width,
                      int64_t heads, int64_t head_dim, int64_t n_rows, int64_t row0, int64_t n_blocks, int dtype,
                      uintptr_t stream);

// k_scale, v_scale: fp32 [B, n_rows, H] scales of FP8 pools; both 0 for pools of `dtype` (the outputs').
void gather_kv_rope_cuda(uintptr_t k_pool, Strides3 kp_s, uintptr_t v_pool, Strides3 vp_s, uintptr_t k_scale,
                         Strides3 ks_s, uintptr_t v_scale, Strides3 vs_s, uintptr_t seg, Strides3 s_s, uintptr_t k,
                         uintptr_t v, int64_t o_sb, int64_t batch, int64_t n_rows, int64_t heads, int64_t head_dim,
                         int64_t n_seg, int64_t total, int dtype, uintptr_t stream);

}  // namespace relaxkv
