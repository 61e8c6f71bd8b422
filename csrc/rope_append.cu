// Host launcher of rope_append (kernel and semantics: rope_append.cuh).
#include "rope_append.cuh"

namespace relaxkv {

namespace {

constexpr const char* kOp = "rope_append_cuda";

template <typename T, int VEC, bool VECTOR>
void launch(const RopeAppendParams& p, const RopeFreqs& freqs, int64_t batch, int64_t frames,
            cudaStream_t stream) {
    const int lanes_x = p.head_dim / VEC;
    const int lanes_y = lanes_x >= kRopeBlockThreads ? 1 : kRopeBlockThreads / lanes_x;
    const dim3 block(lanes_x, lanes_y);
    const dim3 grid(unsigned(ceil_div(p.frame_tokens, kRopeTileTokens)), unsigned(frames),
                    unsigned(batch));
    const size_t smem = sizeof(float2) * kRopeTileTokens * (p.head_dim / 2) +
                        sizeof(float) * size_t(lanes_y) * p.head_dim;
    rope_append_kernel<T, VEC, VECTOR><<<grid, block, smem, stream>>>(p, freqs);
    RELAXKV_CHECK_LAUNCH(kOp);
}

template <typename T>
void dispatch(const RopeAppendParams& p, const RopeFreqs& freqs, int64_t batch, int64_t frames,
              bool vector, cudaStream_t stream) {
    constexpr int kVec = 16 / sizeof(T);
    if (vector)
        launch<T, kVec, true>(p, freqs, batch, frames, stream);
    else
        launch<T, 2, false>(p, freqs, batch, frames, stream);
}

}  // namespace

void rope_append_cuda(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t q_rot, uintptr_t k_cache,
                      uintptr_t v_cache, uintptr_t proto, uintptr_t frame_slot,
                      uintptr_t frame_pos, int64_t batch, int64_t frames, int64_t height,
                      int64_t width, int64_t heads, int64_t head_dim, int64_t cache_rows,
                      int64_t n_slots, int64_t q_sb, int64_t q_sn, int64_t q_sh, int64_t k_sb,
                      int64_t k_sn, int64_t k_sh, int64_t v_sb, int64_t v_sn, int64_t v_sh,
                      int64_t o_sb, int64_t o_sn, int64_t o_sh, int64_t kc_sb, int64_t kc_sn,
                      int64_t kc_sh, int64_t vc_sb, int64_t vc_sn, int64_t vc_sh, int64_t p_sb,
                      int64_t p_ss, int64_t slot_stride, int64_t pos_stride, int dtype,
                      uintptr_t stream) {
    require_device(kOp);
    RELAXKV_CHECK_ARG(kOp, batch >= 0 && frames >= 0,
                      "batch and frames: expected >= 0, got " << batch << ", " << frames);
    RELAXKV_CHECK_ARG(kOp, height >= 1 && width >= 1,
                      "height, width: expected >= 1, got " << height << ", " << width);
    RELAXKV_CHECK_ARG(kOp, heads >= 1 && heads <= (1 << 20), "heads: expected >= 1, got " << heads);
    RELAXKV_CHECK_ARG(kOp, head_dim >= 2 && head_dim % 2 == 0 && head_dim <= 2 * kRopeMaxPairs,
                      "head_dim: expected an even number in [2, " << 2 * kRopeMaxPairs << "], got "
                                                                  << head_dim);
    RELAXKV_CHECK_ARG(kOp, frames <= 65535 && batch <= 65535,
                      "frames and batch: expected <= 65535 (grid limit), got " << frames << ", "
                                                                               << batch);
    RELAXKV_CHECK_ARG(kOp, n_slots >= 0 && n_slots * height * width <= cache_rows,
                      "cache: expected n_slots * height * width <= cache rows, got " << n_slots
                          << " * " << height * width << " > " << cache_rows);
    RELAXKV_CHECK_ARG(kOp, dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16,
                      "dtype code: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " << dtype);
    if (batch == 0 || frames == 0) return;

    RopeAppendParams p{};
    p.q = reinterpret_cast<const void*>(q);
    p.k = reinterpret_cast<const void*>(k);
    p.v = reinterpret_cast<const void*>(v);
    p.q_rot = reinterpret_cast<void*>(q_rot);
    p.k_cache = reinterpret_cast<void*>(k_cache);
    p.v_cache = reinterpret_cast<void*>(v_cache);
    p.proto = reinterpret_cast<float*>(proto);
    p.frame_slot = reinterpret_cast<const int64_t*>(frame_slot);
    p.frame_pos = reinterpret_cast<const int64_t*>(frame_pos);
    p.frame_tokens = height * width;
    p.width = width;
    p.n_slots = n_slots;
    p.heads = int(heads);
    p.head_dim = int(head_dim);
    const RopeSplit split = wan_pair_split(p.head_dim);
    p.n_t_pairs = split.n_t;
    p.n_h_pairs = split.n_h;
    p.inv_count = float(1.0 / (double(p.frame_tokens) * double(heads)));
    p.q_sb = q_sb, p.q_sn = q_sn, p.q_sh = q_sh;
    p.k_sb = k_sb, p.k_sn = k_sn, p.k_sh = k_sh;
    p.v_sb = v_sb, p.v_sn = v_sn, p.v_sh = v_sh;
    p.o_sb = o_sb, p.o_sn = o_sn, p.o_sh = o_sh;
    p.kc_sb = kc_sb, p.kc_sn = kc_sn, p.kc_sh = kc_sh;
    p.vc_sb = vc_sb, p.vc_sn = vc_sn, p.vc_sh = vc_sh;
    p.p_sb = p_sb, p.p_ss = p_ss;
    p.slot_stride = slot_stride, p.pos_stride = pos_stride;
    const RopeFreqs freqs = wan_inv_freq(p.head_dim);

    // 16-byte accesses when every base pointer and every row stride allows them, else per element.
    const int64_t vec = dtype == kFloat32 ? 4 : 8;
    bool vector = head_dim % vec == 0;
    for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.q_rot),
                            static_cast<const void*>(p.k_cache), static_cast<const void*>(p.v_cache)})
        vector = vector && aligned16(ptr);
    for (int64_t s : {q_sb, q_sn, q_sh, k_sb, k_sn, k_sh, v_sb, v_sn, v_sh, o_sb, o_sn, o_sh, kc_sb,
                      kc_sn, kc_sh, vc_sb, vc_sn, vc_sh})
        vector = vector && s % vec == 0;

    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    if (p.proto != nullptr) {
        rope_append_zero_proto_kernel<<<dim3(unsigned(frames), unsigned(batch)), 128, 0, s>>>(p);
        RELAXKV_CHECK_LAUNCH(kOp);
    }
    switch (dtype) {
        case kFloat32: dispatch<float>(p, freqs, batch, frames, vector, s); break;
        case kFloat16: dispatch<__half>(p, freqs, batch, frames, vector, s); break;
        default: dispatch<__nv_bfloat16>(p, freqs, batch, frames, vector, s); break;
    }
}

}  // namespace relaxkv
