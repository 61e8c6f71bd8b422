// Host launcher of mid_select (contract: relaxkv_kernels.ops.mid_select; kernels: mid_select.cuh).
#include <algorithm>
#include <cmath>

#include "mid_select.cuh"

namespace relaxkv {

namespace {
constexpr const char* kOp = "mid_select_cuda";
}  // namespace

int64_t mid_select_splits(int64_t n_sub) {
    // ~64 subsampled tokens per block, at most 32 splits: Wan (Nq = 6240, stride 8, H/2 = 6) gets
    // 13 x 6 = 78 blocks of 60 tokens; kernel 2 then sums 13 partials per element.
    return std::max<int64_t>(1, std::min<int64_t>(32, ceil_div(n_sub, 64)));
}

void mid_select_cuda(uintptr_t q, Strides3 q_s, uintptr_t mean_key, Strides4 k_s, uintptr_t mid_slots,
                     uintptr_t block_pos, uintptr_t target_pos, uintptr_t seg, Strides3 s_s, uintptr_t scores,
                     uintptr_t ws, int64_t batch, int64_t n_q, int64_t heads, int64_t head_dim, int64_t n_blocks,
                     int64_t n_mid, int64_t n_sel, int64_t n_seg, int64_t seg_index, int64_t row0, int64_t block_tokens,
                     int64_t q_stride, bool batch_mean, int64_t n_split, int dtype, uintptr_t stream) {
    require_device(kOp);
    check_range(kOp, "batch", batch, 1, kMaxGridYZ);
    check_range(kOp, "heads", heads, 2, 2 * kMaxGridYZ + 1);
    check_head_dim(kOp, head_dim);
    check_range(kOp, "q_stride", q_stride, 1, n_q);                     // subsampled rows lie inside q
    check_range(kOp, "target_pos entries (k)", n_sel, 1, n_mid);        // picked[] holds n_mid entries
    check_range(kOp, "seg_index", seg_index, 0, n_seg - n_sel);         // the rows written lie in the table
    check_range(kOp, "compressed rows (row0 + n_blocks * Nc)", row0 + n_blocks * block_tokens, 0, INT32_MAX);
    const int64_t n_sub = ceil_div(n_q, q_stride);
    check_range(kOp, "n_split (workspace rows)", n_split, mid_select_splits(n_sub), mid_select_splits(n_sub));
    const size_t smem = (sizeof(float) + 2 * sizeof(int)) * size_t(n_mid);
    check_range(kOp, "mid_slots entries", n_mid, 1, int64_t(kMaxSmem / 12));  // smem <= kMaxSmem

    MidSelectParams p{};
    p.q = Rows(q, q_s);
    p.mean_key = reinterpret_cast<const float*>(mean_key), p.k_s = k_s;
    p.mid_slots = reinterpret_cast<const int64_t*>(mid_slots);
    p.block_pos = reinterpret_cast<const int64_t*>(block_pos);
    p.target_pos = reinterpret_cast<const int64_t*>(target_pos);
    p.seg = reinterpret_cast<int32_t*>(seg), p.seg_s = s_s;
    p.scores = reinterpret_cast<float*>(scores);
    p.ws = reinterpret_cast<float*>(ws);
    p.n_sub = n_sub, p.q_stride = q_stride, p.n_blocks = n_blocks, p.row0 = row0, p.block_tokens = block_tokens;
    p.batch = int(batch), p.half_heads = int(heads / 2), p.head_dim = int(head_dim);
    p.n_split = int(n_split), p.n_mid = int(n_mid), p.n_sel = int(n_sel), p.seg_index = int(seg_index);
    p.batch_mean = batch_mean;
    const double n_avg = batch_mean ? double(batch) : 1.0;  // samples each score averages over
    p.factor = float(double(block_tokens) / (std::sqrt(double(head_dim)) * n_avg * double(heads / 2)));
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    dispatch_vec(kOp, dtype, wide_ok(dtype, head_dim, {p.q}), [&](auto vec) {  // 16-byte query loads
        const int lanes_x = int(head_dim / decltype(vec)::N), lanes_y = std::max(1, kMidQsumThreads / lanes_x);
        const dim3 grid(unsigned(n_split), unsigned(p.half_heads), unsigned(batch));
        const size_t qsum_smem = sizeof(float) * size_t(lanes_y) * head_dim;  // [R, D] partials
        mid_select_qsum_kernel<decltype(vec)><<<grid, dim3(lanes_x, lanes_y), qsum_smem, s>>>(p);
        RELAXKV_CHECK_LAUNCH(kOp);
    });
    mid_select_kernel<<<batch_mean ? 1 : unsigned(batch), kMidSelectThreads, smem, s>>>(p);  // a block per sample
    RELAXKV_CHECK_LAUNCH(kOp);
}

}  // namespace relaxkv
