// Host launcher of rope_append (contract: relaxkv_kernels.ops.rope_append; kernels: rope_append.cuh).
#include <algorithm>

#include "rope_append.cuh"

namespace relaxkv {

namespace {

constexpr const char* kOp = "rope_append_cuda";

// Whether FP8 caches get one access of n elements per lane (chunk C = 1): a warp of lanes covers D. Otherwise
// they take element accesses in kFp8Chunks chunks (rope_append.cuh).
bool fp8_one_chunk(int64_t head_dim, int n) { return head_dim <= int64_t(kFp8Lanes) * n; }

// Threads along D with n-element accesses (each loops over D when D / n is larger); FP8 caches: the smallest
// power of two of lanes whose accesses cover D in C chunks (at most kFp8Lanes).
int64_t lanes(int64_t head_dim, int n, bool fp8) {
    if (!fp8) return std::min<int64_t>(head_dim / n, kRopeThreads);
    const int64_t need = ceil_div(head_dim, int64_t(n) * (fp8_one_chunk(head_dim, n) ? 1 : kFp8Chunks));
    int64_t l = 1;
    while (l < need) l *= 2;
    return l;
}

// Tokens per block: blockDim = (lanes, this), at most kRopeThreads threads.
int64_t tile_tokens(int64_t head_dim, int n, bool fp8) { return kRopeThreads / lanes(head_dim, n, fp8); }

// Whether the launcher may take n-element accesses (n = 2 always; 16 bytes: n = 4 for fp32, 8 for fp16 / bf16):
// D a multiple of n, and with FP8 caches one chunk (no 16-byte chunks: their registers would spill).
bool access_fits(int64_t head_dim, int n, bool fp8) {
    return n == 2 || (head_dim % n == 0 && (!fp8 || fp8_one_chunk(head_dim, n)));
}

}  // namespace

int64_t rope_append_tiles(int64_t frame_tokens, int64_t head_dim, bool fp8) {
    int64_t tiles = 0;  // the most of any access width the launcher may take (it also checks the alignments)
    for (int n : {2, 4, 8}) {
        if (access_fits(head_dim, n, fp8))
            tiles = std::max(tiles, ceil_div(frame_tokens, tile_tokens(head_dim, n, fp8)));
    }
    return tiles;
}

void rope_append_cuda(uintptr_t q, Strides3 q_s, uintptr_t k, Strides3 k_s, uintptr_t v, Strides3 v_s,
                      uintptr_t q_rot, Strides3 o_s, uintptr_t k_cache, Strides3 kc_s, uintptr_t v_cache,
                      Strides3 vc_s, uintptr_t k_scale, Strides3 ks_s, uintptr_t v_scale, Strides3 vs_s,
                      uintptr_t proto, int64_t p_sb, int64_t p_ss, uintptr_t ws, uintptr_t frame_slot,
                      uintptr_t frame_pos, int64_t batch, int64_t frames, int64_t height, int64_t width, int64_t heads,
                      int64_t head_dim, int64_t cache_rows, int64_t n_slots, int dtype, uintptr_t stream) {
    require_device(kOp);
    check_range(kOp, "batch", batch, 0, kMaxGridYZ);
    check_range(kOp, "frames", frames, 0, kMaxGridYZ);
    check_range(kOp, "height", height, 1, kMaxGridX);
    check_range(kOp, "width", width, 1, kMaxGridX);
    check_range(kOp, "heads", heads, 1, INT32_MAX);
    check_head_dim(kOp, head_dim);
    RELAXKV_CHECK_ARG(kOp, n_slots >= 0 && n_slots * height * width <= cache_rows,
                      "cache: expected n_slots * height * width <= cache rows, got " << n_slots << " * "
                                                                                    << height * width << " > " << cache_rows);
    const bool fp8 = fp8_pools(kOp, k_scale, v_scale);
    if (batch == 0 || frames == 0) return;

    RopeAppendParams p{};
    p.q = Rows(q, q_s), p.k = Rows(k, k_s), p.v = Rows(v, v_s), p.q_rot = Rows(q_rot, o_s);
    p.k_cache = Rows(k_cache, kc_s), p.v_cache = Rows(v_cache, vc_s);
    p.k_scale = Rows(k_scale, ks_s), p.v_scale = Rows(v_scale, vs_s);
    p.proto = reinterpret_cast<float*>(proto);
    p.ws = reinterpret_cast<float*>(ws);
    p.frame_slot = reinterpret_cast<const int64_t*>(frame_slot);
    p.frame_pos = reinterpret_cast<const int64_t*>(frame_pos);
    p.frame_tokens = height * width, p.width = width, p.n_slots = n_slots, p.p_sb = p_sb, p.p_ss = p_ss;
    p.heads = int(heads), p.head_dim = int(head_dim);
    p.inv_count = float(1.0 / (double(p.frame_tokens) * double(heads)));
    const RopeFreqs freqs = wan_rope(head_dim);
    const int per16 = int(16 / dtype_bytes(dtype));  // elements of one 16-byte access: codes of one FP8 store
    const bool wide = fp8 ? access_fits(head_dim, per16, true) && rows_aligned(per16, 1, {p.k_cache, p.v_cache}) &&
                                wide_ok(dtype, head_dim, {p.q, p.k, p.v, p.q_rot})
                          : wide_ok(dtype, head_dim, {p.q, p.k, p.v, p.q_rot, p.k_cache, p.v_cache});
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    int64_t tiles = 0;
    dispatch_vec(kOp, dtype, wide, [&](auto vec) {
        using V = decltype(vec);
        const dim3 block(unsigned(lanes(head_dim, V::N, fp8)), unsigned(tile_tokens(head_dim, V::N, fp8)));
        tiles = ceil_div(p.frame_tokens, block.y);
        check_range(kOp, "token tiles per frame", tiles, 1, kMaxGridX);
        const size_t smem = proto ? sizeof(float) * block.y * head_dim : 0;  // [R, D] partial sums
        const dim3 grid{unsigned(tiles), unsigned(frames), unsigned(batch)};
        if (!fp8)
            rope_append_kernel<V><<<grid, block, smem, s>>>(p, freqs);
        else if (fp8_one_chunk(head_dim, V::N))
            rope_append_fp8_kernel<V, 1><<<grid, block, smem, s>>>(p, freqs);
        else if constexpr (V::N == 2)  // element accesses in chunks (16-byte ones need one chunk: access_fits)
            rope_append_fp8_kernel<V, kFp8Chunks><<<grid, block, smem, s>>>(p, freqs);
        RELAXKV_CHECK_LAUNCH(kOp);
    });
    if (proto) {
        rope_append_proto_kernel<<<dim3(unsigned(frames), unsigned(batch)), 128, 0, s>>>(p, tiles);
        RELAXKV_CHECK_LAUNCH(kOp);
    }
}

}  // namespace relaxkv
