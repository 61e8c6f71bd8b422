// Host launcher of gather_kv_rope (kernel and semantics: gather_kv_rope.cuh).
#include "gather_kv_rope.cuh"

namespace relaxkv {

namespace {

constexpr const char* kOp = "gather_kv_rope_cuda";
constexpr size_t kMaxSmem = 48 * 1024;

template <typename T, int VEC, bool VECTOR>
void launch(const GatherParams& p, const RopeFreqs& freqs, int64_t batch, size_t smem, cudaStream_t stream) {
    const dim3 grid(unsigned(ceil_div(p.total, kGatherRows)), unsigned(batch));
    gather_kv_rope_kernel<T, VEC, VECTOR><<<grid, kGatherThreads, smem, stream>>>(p, freqs);
    RELAXKV_CHECK_LAUNCH(kOp);
}

template <typename T>
void dispatch(const GatherParams& p, const RopeFreqs& freqs, int64_t batch, size_t smem, bool vector,
              cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    if (vector)
        launch<T, kVec, true>(p, freqs, batch, smem, stream);
    else
        launch<T, 2, false>(p, freqs, batch, smem, stream);
}

}  // namespace

void gather_kv_rope_cuda(uintptr_t k_pool, uintptr_t v_pool, uintptr_t seg, uintptr_t k, uintptr_t v,
                         int64_t batch, int64_t n_rows, int64_t heads, int64_t head_dim, int64_t n_seg,
                         int64_t total, int64_t kp_sb, int64_t kp_sn, int64_t kp_sh, int64_t vp_sb,
                         int64_t vp_sn, int64_t vp_sh, int64_t s_sb, int64_t s_ss, int64_t s_sf, int64_t o_sb,
                         int dtype, uintptr_t stream) {
    require_device(kOp);
    RELAXKV_CHECK_ARG(kOp, batch >= 0 && batch <= 65535, "batch: expected 0 .. 65535, got " << batch);
    RELAXKV_CHECK_ARG(kOp, total >= 1 && ceil_div(total, kGatherRows) <= INT32_MAX,
                      "total: expected >= 1 (and < 2^35), got " << total);
    RELAXKV_CHECK_ARG(kOp, heads >= 1 && heads <= (1 << 20) && heads * head_dim <= (1 << 24),
                      "heads: expected 1 .. 2^20 with heads * head_dim <= 2^24 (int item index), got "
                          << heads << " x " << head_dim);
    RELAXKV_CHECK_ARG(kOp, head_dim >= 2 && head_dim % 2 == 0 && head_dim <= 2 * kRopeMaxPairs,
                      "head_dim: expected an even number in [2, " << 2 * kRopeMaxPairs << "], got " << head_dim);
    RELAXKV_CHECK_ARG(kOp, n_seg >= 1, "seg: expected at least one segment row, got " << n_seg);
    RELAXKV_CHECK_ARG(kOp, dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
                      "dtype code: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " << dtype);
    const RopeSplit split = wan_pair_split(int(head_dim));
    const size_t smem = (sizeof(int64_t) + 2 * sizeof(int32_t)) * size_t(n_seg) +
                        (sizeof(int64_t) + sizeof(int32_t)) * kGatherRows +
                        sizeof(float2) * kGatherRows * size_t(split.n_t);
    RELAXKV_CHECK_ARG(kOp, smem <= kMaxSmem,
                      "seg: expected at most " << (kMaxSmem - 16 * 1024) / 16 << " segment rows, got " << n_seg);
    if (batch == 0) return;

    GatherParams p{};
    p.k_pool = reinterpret_cast<const void*>(k_pool);
    p.v_pool = reinterpret_cast<const void*>(v_pool);
    p.seg = reinterpret_cast<const int32_t*>(seg);
    p.k = reinterpret_cast<void*>(k);
    p.v = reinterpret_cast<void*>(v);
    p.total = total;
    p.n_rows = n_rows;
    p.n_seg = int(n_seg), p.heads = int(heads), p.head_dim = int(head_dim), p.n_t_pairs = split.n_t;
    p.kp_sb = kp_sb, p.kp_sn = kp_sn, p.kp_sh = kp_sh;
    p.vp_sb = vp_sb, p.vp_sn = vp_sn, p.vp_sh = vp_sh;
    p.s_sb = s_sb, p.s_ss = s_ss, p.s_sf = s_sf;
    p.o_sb = o_sb;
    const RopeFreqs freqs = wan_inv_freq(p.head_dim);

    // 16-byte accesses when every base pointer and stride allows them (output rows are contiguous).
    const int64_t vec = dtype == kFloat32 ? 4 : 8;
    bool vector = head_dim % vec == 0;
    for (const void* ptr : {p.k_pool, p.v_pool, static_cast<const void*>(p.k), static_cast<const void*>(p.v)})
        vector = vector && aligned16(ptr);
    for (int64_t s : {kp_sb, kp_sn, kp_sh, vp_sb, vp_sn, vp_sh, o_sb}) vector = vector && s % vec == 0;

    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case kFloat32: dispatch<float>(p, freqs, batch, smem, vector, s); break;
        case kFloat16: dispatch<__half>(p, freqs, batch, smem, vector, s); break;
        default: dispatch<__nv_bfloat16>(p, freqs, batch, smem, vector, s); break;
    }
}

}  // namespace relaxkv
