// Host launcher of gather_kv_rope (contract: relaxkv_kernels.ops.gather_kv_rope; kernel: gather_kv_rope.cuh).
#include "gather_kv_rope.cuh"

namespace relaxkv {

namespace {
constexpr const char* kOp = "gather_kv_rope_cuda";
}  // namespace

void gather_kv_rope_cuda(uintptr_t k_pool, Strides3 kp_s, uintptr_t v_pool, Strides3 vp_s, uintptr_t k_scale,
                         Strides3 ks_s, uintptr_t v_scale, Strides3 vs_s, uintptr_t seg, Strides3 s_s, uintptr_t k,
                         uintptr_t v, int64_t o_sb, int64_t batch, int64_t n_rows, int64_t heads, int64_t head_dim,
                         int64_t n_seg, int64_t total, int dtype, uintptr_t stream) {
    require_device(kOp);
    const bool fp8 = fp8_pools(kOp, k_scale, v_scale);
    check_range(kOp, "batch", batch, 0, kMaxGridYZ);
    check_range(kOp, "total", total, 1, kMaxGridX * kGatherRows);
    check_head_dim(kOp, head_dim);
    check_range(kOp, "heads", heads, 1, (1 << 24) / head_dim);  // int item index of a row tile
    const RopeFreqs freqs = wan_rope(head_dim);
    const size_t smem = (sizeof(int64_t) + 2 * sizeof(int32_t)) * size_t(n_seg) +
                        (sizeof(int64_t) + sizeof(int32_t)) * kGatherRows + sizeof(float2) * kGatherRows * freqs.n_t;
    check_range(kOp, "seg rows", n_seg, 1, int64_t(kMaxSmem - 16 * 1024) / 16);  // 16 B each, with <= 16 KiB of
                                                                                  // row tables: smem < kMaxSmem
    if (batch == 0) return;

    GatherParams p{};
    p.k_pool = Rows(k_pool, kp_s), p.v_pool = Rows(v_pool, vp_s);
    p.k_scale = Rows(k_scale, ks_s), p.v_scale = Rows(v_scale, vs_s);
    p.seg = reinterpret_cast<const int32_t*>(seg), p.seg_s = s_s;
    p.k = reinterpret_cast<void*>(k), p.v = reinterpret_cast<void*>(v);
    p.total = total, p.n_rows = n_rows, p.o_sb = o_sb;
    p.n_seg = int(n_seg), p.heads = int(heads), p.head_dim = int(head_dim);
    // 16-byte accesses when every base address and stride allows them (output rows are contiguous); dtype is
    // the outputs' (the pools' too unless they are FP8: 16 codes per load).
    const Strides3 o_s = {o_sb, heads * head_dim, head_dim};
    const bool wide = fp8 ? wide_ok(dtype, head_dim, {Rows(k, o_s), Rows(v, o_s)}) &&
                                head_dim % 16 == 0 && rows_aligned(16, 1, {p.k_pool, p.v_pool})
                          : wide_ok(dtype, head_dim, {p.k_pool, p.v_pool, Rows(k, o_s), Rows(v, o_s)});
    dispatch_vec(kOp, dtype, wide, [&](auto vec) {
        using V = decltype(vec);
        const auto launch = [&](auto read) {
            using P = decltype(read);
            const dim3 grid(unsigned(ceil_div(total, kGatherRows)), unsigned(batch));
            gather_kv_rope_kernel<V, P><<<grid, kGatherThreads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(p, freqs);
            RELAXKV_CHECK_LAUNCH(kOp);
        };
        if (fp8)
            launch(typename CodesOf<V>::type{});
        else
            launch(vec);
    });
}

}  // namespace relaxkv
