// Host launcher of relax_select (kernel and semantics: relax_select.cuh).
#include "relax_select.cuh"

namespace relaxkv {

namespace {
constexpr const char* kOp = "relax_select_cuda";
constexpr size_t kMaxSmem = 48 * 1024;  // default dynamic shared memory limit, no opt-in needed
}  // namespace

void relax_select_cuda(uintptr_t proto, uintptr_t slot_pos, uintptr_t sink_slots, uintptr_t tail_slots,
                       uintptr_t cand_slots, uintptr_t target_pos, uintptr_t seg, uintptr_t scores,
                       int64_t batch, int64_t n_slots, int64_t head_dim, int64_t n_sink, int64_t n_tail,
                       int64_t n_cand, int64_t n_sel, int64_t n_seg, int64_t seg_index,
                       int64_t frame_tokens, double lam, bool batch0_decides, bool contiguous,
                       int64_t p_sb, int64_t p_ss, int64_t p_sd, int64_t s_pos, int64_t s_sink,
                       int64_t s_tail, int64_t s_cand, int64_t s_tgt, int64_t s_sb, int64_t s_ss,
                       int64_t s_sf, int64_t o_sb, int64_t o_sc, uintptr_t stream) {
    require_device(kOp);
    RELAXKV_CHECK_ARG(kOp, batch >= 0 && batch <= 65535, "batch: expected 0 .. 65535, got " << batch);
    RELAXKV_CHECK_ARG(kOp, head_dim >= 1 && head_dim <= 4096, "head_dim: expected 1 .. 4096, got " << head_dim);
    RELAXKV_CHECK_ARG(kOp, n_sink >= 0 && n_tail >= 0 && n_slots >= 1,
                      "sink, tail, slots: expected counts >= 0 (slots >= 1), got " << n_sink << ", " << n_tail
                                                                                   << ", " << n_slots);
    RELAXKV_CHECK_ARG(kOp, n_sel >= 1 && n_sel <= n_cand,
                      "target_pos: expected 1 .. " << n_cand << " (candidates) entries, got " << n_sel);
    RELAXKV_CHECK_ARG(kOp, seg_index >= 0 && seg_index + n_sel <= n_seg,
                      "seg_index: expected 0 .. " << n_seg - n_sel << " (n_seg - H_sel), got " << seg_index);
    RELAXKV_CHECK_ARG(kOp, frame_tokens >= 1 && (n_slots - 1) * frame_tokens <= INT32_MAX,
                      "frame_tokens: expected >= 1 and slot rows within int32, got " << frame_tokens);
    const size_t smem = sizeof(float) * (2 * size_t(head_dim) + 2 * size_t(n_cand)) + sizeof(int) * 2 * n_cand;
    RELAXKV_CHECK_ARG(kOp, smem <= kMaxSmem,
                      "head_dim and candidates: expected at most " << kMaxSmem << " bytes of shared memory, got "
                                                                    << smem);
    if (batch == 0) return;

    RelaxSelectParams p{};
    p.proto = reinterpret_cast<const float*>(proto);
    p.slot_pos = reinterpret_cast<const int64_t*>(slot_pos);
    p.sink_slots = reinterpret_cast<const int64_t*>(sink_slots);
    p.tail_slots = reinterpret_cast<const int64_t*>(tail_slots);
    p.cand_slots = reinterpret_cast<const int64_t*>(cand_slots);
    p.target_pos = reinterpret_cast<const int64_t*>(target_pos);
    p.seg = reinterpret_cast<int32_t*>(seg);
    p.scores = reinterpret_cast<float*>(scores);
    p.n_slots = n_slots;
    p.frame_tokens = frame_tokens;
    p.n_sink = int(n_sink), p.n_tail = int(n_tail), p.n_cand = int(n_cand), p.n_sel = int(n_sel);
    p.head_dim = int(head_dim), p.seg_index = int(seg_index);
    p.lam = lam;
    p.batch0 = batch0_decides;
    p.contiguous = contiguous;
    p.p_sb = p_sb, p.p_ss = p_ss, p.p_sd = p_sd;
    p.s_pos = s_pos, p.s_sink = s_sink, p.s_tail = s_tail, p.s_cand = s_cand, p.s_tgt = s_tgt;
    p.s_sb = s_sb, p.s_ss = s_ss, p.s_sf = s_sf;
    p.o_sb = o_sb, p.o_sc = o_sc;

    cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
    relax_select_kernel<<<unsigned(batch), kRelaxThreads, smem, s>>>(p);
    RELAXKV_CHECK_LAUNCH(kOp);
}

}  // namespace relaxkv
