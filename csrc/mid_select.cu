// Host launcher of mid_select (kernels and semantics: mid_select.cuh).
#include <algorithm>
#include <cmath>

#include "mid_select.cuh"

namespace relaxkv {

namespace {

constexpr const char* kOp = "mid_select_cuda";
constexpr size_t kMaxSmem = 48 * 1024;

template <typename T, int VEC, bool VECTOR>
void launch_qsum(const MidSelectParams& p, cudaStream_t stream) {
    const int lanes_x = p.head_dim / VEC;
    const int lanes_y = lanes_x >= kMidQsumThreads ? 1 : kMidQsumThreads / lanes_x;
    const size_t smem = sizeof(float) * size_t(lanes_y) * p.head_dim;
    const dim3 grid(unsigned(p.n_split), unsigned(p.half_heads), unsigned(p.batch));
    mid_select_qsum_kernel<T, VEC, VECTOR><<<grid, dim3(lanes_x, lanes_y), smem, stream>>>(p);
    RELAXKV_CHECK_LAUNCH(kOp);
}

template <typename T>
void dispatch_qsum(const MidSelectParams& p, bool vector, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    if (vector)
        launch_qsum<T, kVec, true>(p, stream);
    else
        launch_qsum<T, 2, false>(p, stream);
}

}  // namespace

int64_t mid_select_splits(int64_t n_sub) {
    // ~64 subsampled tokens per block, at most 32 splits: Wan (Nq = 6240, stride 8, H/2 = 6) gets
    // 13 x 6 = 78 blocks of 60 tokens; kernel 2 then sums 13 partials per element.
    return std::max<int64_t>(1, std::min<int64_t>(32, ceil_div(n_sub, 64)));
}

void mid_select_cuda(uintptr_t q, uintptr_t mean_key, uintptr_t mid_slots, uintptr_t block_pos,
                     uintptr_t target_pos, uintptr_t seg, uintptr_t scores, uintptr_t ws, int64_t batch,
                     int64_t n_q, int64_t heads, int64_t head_dim, int64_t n_blocks, int64_t n_mid,
                     int64_t n_sel, int64_t n_seg, int64_t seg_index, int64_t row0, int64_t block_tokens,
                     int64_t q_stride, int64_t n_split, int64_t q_sb, int64_t q_sn, int64_t q_sh,
                     int64_t k_sb, int64_t k_sn, int64_t k_sh, int64_t k_sd, int64_t s_mid, int64_t s_pos,
                     int64_t s_tgt, int64_t s_sb, int64_t s_ss, int64_t s_sf, int64_t o_s, int dtype,
                     uintptr_t stream) {
    require_device(kOp);
    RELAXKV_CHECK_ARG(kOp, batch >= 1 && batch <= 65535, "batch: expected 1 .. 65535, got " << batch);
    RELAXKV_CHECK_ARG(kOp, heads >= 2 && heads / 2 <= 65535, "heads: expected 2 .. 131071, got " << heads);
    RELAXKV_CHECK_ARG(kOp, head_dim >= 2 && head_dim % 2 == 0 && head_dim <= 512,
                      "head_dim: expected an even number in [2, 512], got " << head_dim);
    RELAXKV_CHECK_ARG(kOp, q_stride >= 1 && n_q >= 1 && q_stride <= n_q,
                      "q_stride: expected 1 .. " << n_q << " (query tokens), got " << q_stride);
    RELAXKV_CHECK_ARG(kOp, n_sel >= 1 && n_sel <= n_mid,
                      "target_pos: expected 1 .. " << n_mid << " (mid blocks) entries, got " << n_sel);
    RELAXKV_CHECK_ARG(kOp, seg_index >= 0 && seg_index + n_sel <= n_seg,
                      "seg_index: expected 0 .. " << n_seg - n_sel << " (n_seg - k), got " << seg_index);
    RELAXKV_CHECK_ARG(kOp, row0 >= 0 && block_tokens >= 1 && row0 + n_blocks * block_tokens <= INT32_MAX,
                      "row0, block_tokens: expected compressed rows within int32, got row0 "
                          << row0 << ", Nc " << block_tokens);
    const int64_t n_sub = ceil_div(n_q, q_stride);
    RELAXKV_CHECK_ARG(kOp, n_split == mid_select_splits(n_sub),
                      "n_split: expected " << mid_select_splits(n_sub) << " (mid_select_splits), got " << n_split);
    const size_t smem = (sizeof(float) + 2 * sizeof(int)) * size_t(n_mid);
    RELAXKV_CHECK_ARG(kOp, smem <= kMaxSmem, "mid_slots: expected at most " << kMaxSmem / 12 << " entries, got " << n_mid);
    RELAXKV_CHECK_ARG(kOp, dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
                      "dtype code: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " << dtype);

    MidSelectParams p{};
    p.q = reinterpret_cast<const void*>(q);
    p.mean_key = reinterpret_cast<const float*>(mean_key);
    p.mid_slots = reinterpret_cast<const int64_t*>(mid_slots);
    p.block_pos = reinterpret_cast<const int64_t*>(block_pos);
    p.target_pos = reinterpret_cast<const int64_t*>(target_pos);
    p.seg = reinterpret_cast<int32_t*>(seg);
    p.scores = reinterpret_cast<float*>(scores);
    p.ws = reinterpret_cast<float*>(ws);
    p.n_sub = n_sub;
    p.q_stride = q_stride;
    p.n_blocks = n_blocks;
    p.row0 = row0;
    p.block_tokens = block_tokens;
    p.batch = int(batch), p.half_heads = int(heads / 2), p.head_dim = int(head_dim);
    p.n_split = int(n_split), p.n_mid = int(n_mid), p.n_sel = int(n_sel), p.seg_index = int(seg_index);
    p.factor = float(double(block_tokens) / (std::sqrt(double(head_dim)) * double(batch) * double(heads / 2)));
    p.q_sb = q_sb, p.q_sn = q_sn, p.q_sh = q_sh;
    p.k_sb = k_sb, p.k_sn = k_sn, p.k_sh = k_sh, p.k_sd = k_sd;
    p.s_mid = s_mid, p.s_pos = s_pos, p.s_tgt = s_tgt;
    p.s_sb = s_sb, p.s_ss = s_ss, p.s_sf = s_sf;
    p.o_s = o_s;

    // 16-byte query loads when the base pointer and every row stride allow them.
    const int64_t vec = dtype == kFloat32 ? 4 : 8;
    const bool vector = head_dim % vec == 0 && aligned16(p.q) && q_sb % vec == 0 && q_sn % vec == 0 &&
                        q_sh % vec == 0;
    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case kFloat32: dispatch_qsum<float>(p, vector, s); break;
        case kFloat16: dispatch_qsum<__half>(p, vector, s); break;
        default: dispatch_qsum<__nv_bfloat16>(p, vector, s); break;
    }
    mid_select_kernel<<<1, kMidSelectThreads, smem, s>>>(p);
    RELAXKV_CHECK_LAUNCH(kOp);
}

}  // namespace relaxkv
