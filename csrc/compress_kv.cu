// Host launcher of compress_kv (contract: relaxkv_kernels.ops.compress_kv; kernels: compress_kv.cuh).
#include <algorithm>

#include "compress_kv.cuh"

namespace relaxkv {

namespace {
constexpr const char* kOp = "compress_kv_cuda";
}  // namespace

void compress_kv_cuda(uintptr_t k, Strides3 k_s, uintptr_t v, Strides3 v_s, uintptr_t k_pool, Strides3 kp_s,
                      uintptr_t v_pool, Strides3 vp_s, uintptr_t k_scale, Strides3 ks_s, uintptr_t v_scale,
                      Strides3 vs_s, uintptr_t mean_key, Strides4 m_s, uintptr_t ws,
                      uintptr_t block_slot, uintptr_t t0, int64_t batch, int64_t frames, int64_t height, int64_t width,
                      int64_t heads, int64_t head_dim, int64_t n_rows, int64_t row0, int64_t n_blocks, int dtype,
                      uintptr_t stream) {
    require_device(kOp);
    check_range(kOp, "batch", batch, 0, kMaxGridYZ);
    check_range(kOp, "heads", heads, 1, kMaxGridYZ);
    check_head_dim(kOp, head_dim);
    const int64_t n_y = height / kPoolY, n_x = width / kPoolX, n_c = frames / kPoolT * n_y * n_x;
    check_range(kOp, "compressed tokens (frames/2 * height/4 * width/4)", n_c, 1, kMaxGridX);
    check_range(kOp, "row0", row0, 0, n_rows - n_c);  // the block's Nc rows lie inside the pool
    const bool fp8 = fp8_pools(kOp, k_scale, v_scale);  // uint8_t codes and fp32 scales
    if (batch == 0) return;

    CompressParams p{};
    p.k = Rows(k, k_s), p.v = Rows(v, v_s), p.k_pool = Rows(k_pool, kp_s), p.v_pool = Rows(v_pool, vp_s);
    p.k_scale = Rows(k_scale, ks_s), p.v_scale = Rows(v_scale, vs_s);
    p.mean_key = reinterpret_cast<float*>(mean_key), p.m_s = m_s;
    p.ws = reinterpret_cast<float*>(ws);
    p.block_slot = reinterpret_cast<const int64_t*>(block_slot);
    p.t0 = reinterpret_cast<const int64_t*>(t0);
    p.frame_tokens = height * width, p.width = width;
    p.n_y = n_y, p.n_x = n_x, p.n_c = n_c, p.row0 = row0;
    p.n_slots = std::min(n_blocks, (n_rows - row0) / n_c);
    p.heads = int(heads), p.head_dim = int(head_dim);
    const RopeFreqs freqs = wan_rope(head_dim);
    // FP8 codes are stored bytewise: only k and v constrain the access width
    const bool wide = fp8 ? wide_ok(dtype, head_dim, {p.k, p.v})
                          : wide_ok(dtype, head_dim, {p.k, p.v, p.k_pool, p.v_pool});
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    dispatch_vec(kOp, dtype, wide, [&](auto vec) {
        using V = decltype(vec);
        const int64_t lanes_x = head_dim / V::N;
        const dim3 block(unsigned(lanes_x), unsigned(std::clamp<int64_t>(kCompressThreads / lanes_x, 1, heads)));
        const dim3 grid{unsigned(n_c), unsigned(batch)};
        if (fp8) {  // shared memory: each thread's partial amax of K and V
            const size_t smem = 2 * sizeof(int) * block.x * block.y;
            compress_kv_kernel<V, uint8_t><<<grid, block, smem, s>>>(p, freqs);
        } else {
            compress_kv_kernel<V, typename V::T><<<grid, block, 0, s>>>(p, freqs);
        }
        RELAXKV_CHECK_LAUNCH(kOp);
    });
    const dim3 grid(unsigned(ceil_div(heads * head_dim, kMeanKeyThreads)), unsigned(batch));
    compress_mean_key_kernel<<<grid, kMeanKeyThreads, 0, s>>>(p);
    RELAXKV_CHECK_LAUNCH(kOp);
}

}  // namespace relaxkv
