// Host launcher of compress_kv (kernels and semantics: compress_kv.cuh).
#include <algorithm>

#include "compress_kv.cuh"

namespace relaxkv {

namespace {

constexpr const char* kOp = "compress_kv_cuda";

template <typename T, int VEC, bool VECTOR>
void launch(const CompressParams& p, const RopeFreqs& freqs, int64_t batch, cudaStream_t stream) {
    const int lanes_x = p.head_dim / VEC;
    const int lanes_y = std::max(1, std::min(p.heads, kCompressThreads / lanes_x));
    compress_kv_kernel<T, VEC, VECTOR>
        <<<dim3(unsigned(p.n_c), unsigned(batch)), dim3(lanes_x, lanes_y), 0, stream>>>(p, freqs);
    RELAXKV_CHECK_LAUNCH(kOp);
}

template <typename T>
void dispatch(const CompressParams& p, const RopeFreqs& freqs, int64_t batch, bool vector, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    if (vector)
        launch<T, kVec, true>(p, freqs, batch, stream);
    else
        launch<T, 2, false>(p, freqs, batch, stream);
}

}  // namespace

void compress_kv_cuda(uintptr_t k, uintptr_t v, uintptr_t k_pool, uintptr_t v_pool, uintptr_t mean_key,
                      uintptr_t ws, uintptr_t block_slot, uintptr_t t0, int64_t batch, int64_t frames,
                      int64_t height, int64_t width, int64_t heads, int64_t head_dim, int64_t n_rows,
                      int64_t row0, int64_t n_blocks, int64_t k_sb, int64_t k_sn, int64_t k_sh,
                      int64_t v_sb, int64_t v_sn, int64_t v_sh, int64_t kp_sb, int64_t kp_sn, int64_t kp_sh,
                      int64_t vp_sb, int64_t vp_sn, int64_t vp_sh, int64_t m_sb, int64_t m_ss, int64_t m_sh,
                      int64_t m_sd, int dtype, uintptr_t stream) {
    require_device(kOp);
    RELAXKV_CHECK_ARG(kOp, batch >= 0 && batch <= 65535, "batch: expected 0 .. 65535, got " << batch);
    RELAXKV_CHECK_ARG(kOp, frames >= kPoolT && height >= kPoolY && width >= kPoolX,
                      "block: expected at least 2x4x4 (t, y, x) to pool, got " << frames << "x" << height << "x"
                                                                             << width);
    RELAXKV_CHECK_ARG(kOp, heads >= 1 && heads <= 65535, "heads: expected 1 .. 65535, got " << heads);
    RELAXKV_CHECK_ARG(kOp, head_dim >= 2 && head_dim % 2 == 0 && head_dim <= 2 * kRopeMaxPairs,
                      "head_dim: expected an even number in [2, " << 2 * kRopeMaxPairs << "], got " << head_dim);
    RELAXKV_CHECK_ARG(kOp, dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
                      "dtype code: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " << dtype);
    const int64_t n_t = frames / kPoolT, n_y = height / kPoolY, n_x = width / kPoolX, n_c = n_t * n_y * n_x;
    RELAXKV_CHECK_ARG(kOp, row0 >= 0 && row0 + n_c <= n_rows,
                      "row0: expected 0 .. " << n_rows - n_c << " (pool rows - Nc), got " << row0);
    RELAXKV_CHECK_ARG(kOp, n_c <= INT32_MAX, "block: expected < 2^31 compressed tokens, got " << n_c);
    if (batch == 0) return;

    CompressParams p{};
    p.k = reinterpret_cast<const void*>(k);
    p.v = reinterpret_cast<const void*>(v);
    p.k_pool = reinterpret_cast<void*>(k_pool);
    p.v_pool = reinterpret_cast<void*>(v_pool);
    p.mean_key = reinterpret_cast<float*>(mean_key);
    p.ws = reinterpret_cast<float*>(ws);
    p.block_slot = reinterpret_cast<const int64_t*>(block_slot);
    p.t0 = reinterpret_cast<const int64_t*>(t0);
    p.frame_tokens = height * width;
    p.width = width;
    p.n_y = n_y, p.n_x = n_x, p.n_c = n_c;
    p.row0 = row0;
    p.n_slots = std::min(n_blocks, (n_rows - row0) / n_c);
    p.heads = int(heads), p.head_dim = int(head_dim);
    const RopeSplit split = wan_pair_split(p.head_dim);
    p.n_t_pairs = split.n_t, p.n_h_pairs = split.n_h;
    p.k_sb = k_sb, p.k_sn = k_sn, p.k_sh = k_sh;
    p.v_sb = v_sb, p.v_sn = v_sn, p.v_sh = v_sh;
    p.kp_sb = kp_sb, p.kp_sn = kp_sn, p.kp_sh = kp_sh;
    p.vp_sb = vp_sb, p.vp_sn = vp_sn, p.vp_sh = vp_sh;
    p.m_sb = m_sb, p.m_ss = m_ss, p.m_sh = m_sh, p.m_sd = m_sd;
    const RopeFreqs freqs = wan_inv_freq(p.head_dim);

    const int64_t vec = dtype == kFloat32 ? 4 : 8;
    bool vector = head_dim % vec == 0;
    for (const void* ptr : {p.k, p.v, static_cast<const void*>(p.k_pool), static_cast<const void*>(p.v_pool)})
        vector = vector && aligned16(ptr);
    for (int64_t s : {k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, kp_sb, kp_sn, kp_sh, vp_sb, vp_sn, vp_sh})
        vector = vector && s % vec == 0;

    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case kFloat32: dispatch<float>(p, freqs, batch, vector, s); break;
        case kFloat16: dispatch<__half>(p, freqs, batch, vector, s); break;
        default: dispatch<__nv_bfloat16>(p, freqs, batch, vector, s); break;
    }
    const dim3 grid(unsigned(ceil_div(heads * head_dim, kMeanKeyThreads)), unsigned(batch));
    compress_mean_key_kernel<<<grid, kMeanKeyThreads, 0, s>>>(p);
    RELAXKV_CHECK_LAUNCH(kOp);
}

}  // namespace relaxkv
