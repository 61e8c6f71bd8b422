// Host launcher of rope_append (kernels and semantics: rope_append.cuh).
#include <algorithm>

#include "rope_append.cuh"

namespace relaxkv {

namespace {

constexpr const char* kOp = "rope_append_cuda";

// Threads along D with n-element accesses (each loops over D when D / n is larger).
int64_t lanes(int64_t head_dim, int n) { return std::min<int64_t>(head_dim / n, kRopeThreads); }

// Tokens per block: blockDim = (lanes, this), at most kRopeThreads threads.
int64_t tile_tokens(int64_t head_dim, int n) { return kRopeThreads / lanes(head_dim, n); }

}  // namespace

int64_t rope_append_tiles(int64_t frame_tokens, int64_t head_dim) {
    return ceil_div(frame_tokens, tile_tokens(head_dim, 2));  // element accesses: the smallest tiles
}

void rope_append_cuda(uintptr_t q, Strides3 q_s, uintptr_t k, Strides3 k_s, uintptr_t v, Strides3 v_s,
                      uintptr_t q_rot, Strides3 o_s, uintptr_t k_cache, Strides3 kc_s, uintptr_t v_cache,
                      Strides3 vc_s, uintptr_t proto, int64_t p_sb, int64_t p_ss, uintptr_t ws, uintptr_t frame_slot,
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
    if (batch == 0 || frames == 0) return;

    RopeAppendParams p{};
    p.q = Rows(q, q_s), p.k = Rows(k, k_s), p.v = Rows(v, v_s), p.q_rot = Rows(q_rot, o_s);
    p.k_cache = Rows(k_cache, kc_s), p.v_cache = Rows(v_cache, vc_s);
    p.proto = reinterpret_cast<float*>(proto);
    p.ws = reinterpret_cast<float*>(ws);
    p.frame_slot = reinterpret_cast<const int64_t*>(frame_slot);
    p.frame_pos = reinterpret_cast<const int64_t*>(frame_pos);
    p.frame_tokens = height * width, p.width = width, p.n_slots = n_slots, p.p_sb = p_sb, p.p_ss = p_ss;
    p.heads = int(heads), p.head_dim = int(head_dim);
    p.inv_count = float(1.0 / (double(p.frame_tokens) * double(heads)));
    const RopeFreqs freqs = wan_rope(head_dim);
    const bool wide = wide_ok(dtype, head_dim, {p.q, p.k, p.v, p.q_rot, p.k_cache, p.v_cache});
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    int64_t tiles = 0;
    dispatch_vec(kOp, dtype, wide, [&](auto vec) {
        using V = decltype(vec);
        const dim3 block(unsigned(lanes(head_dim, V::N)), unsigned(tile_tokens(head_dim, V::N)));
        tiles = ceil_div(p.frame_tokens, block.y);
        check_range(kOp, "token tiles per frame", tiles, 1, kMaxGridX);
        const size_t smem = proto ? sizeof(float) * block.y * head_dim : 0;  // [R, D] partial sums
        rope_append_kernel<V><<<dim3(unsigned(tiles), unsigned(frames), unsigned(batch)), block, smem, s>>>(p, freqs);
        RELAXKV_CHECK_LAUNCH(kOp);
    });
    if (proto) {
        rope_append_proto_kernel<<<dim3(unsigned(frames), unsigned(batch)), 128, 0, s>>>(p, tiles);
        RELAXKV_CHECK_LAUNCH(kOp);
    }
}

}  // namespace relaxkv
