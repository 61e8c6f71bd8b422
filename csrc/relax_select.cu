// Host launcher of relax_select (contract: relaxkv_kernels.ops.relax_select; kernel: relax_select.cuh).
#include "relax_select.cuh"

namespace relaxkv {

namespace {
constexpr const char* kOp = "relax_select_cuda";
}  // namespace

void relax_select_cuda(uintptr_t proto, Strides3 p_s, uintptr_t slot_pos, uintptr_t sink_slots, uintptr_t tail_slots,
                       uintptr_t cand_slots, uintptr_t target_pos, uintptr_t seg, Strides3 s_s, uintptr_t scores,
                       int64_t batch, int64_t n_slots, int64_t head_dim, int64_t n_sink, int64_t n_tail, int64_t n_cand,
                       int64_t n_sel, int64_t n_seg, int64_t seg_index, int64_t frame_tokens, double lam, double eps,
                       bool batch0_decides, bool contiguous, uintptr_t stream) {
    require_device(kOp);
    check_range(kOp, "batch", batch, 0, kMaxGridYZ);
    check_range(kOp, "head_dim", head_dim, 1, 4096);
    check_range(kOp, "target_pos entries (H_sel)", n_sel, 1, n_cand);  // picked[] holds n_cand entries
    check_range(kOp, "seg_index", seg_index, 0, n_seg - n_sel);       // the rows written lie in the table
    const size_t smem = sizeof(float) * (2 * size_t(head_dim) + 2 * size_t(n_cand)) + sizeof(int) * 2 * n_cand;
    RELAXKV_CHECK_ARG(kOp, smem <= kMaxSmem, "head_dim and candidates: expected at most " << kMaxSmem
                                                 << " bytes of shared memory, got " << smem);
    check_range(kOp, "slot rows (n_slots * frame_tokens)", n_slots * frame_tokens, 0, INT32_MAX);  // int32 seg
    if (batch == 0) return;

    RelaxSelectParams p{};
    p.proto = reinterpret_cast<const float*>(proto), p.p_s = p_s;
    p.slot_pos = reinterpret_cast<const int64_t*>(slot_pos);
    p.sink_slots = reinterpret_cast<const int64_t*>(sink_slots);
    p.tail_slots = reinterpret_cast<const int64_t*>(tail_slots);
    p.cand_slots = reinterpret_cast<const int64_t*>(cand_slots);
    p.target_pos = reinterpret_cast<const int64_t*>(target_pos);
    p.seg = reinterpret_cast<int32_t*>(seg), p.seg_s = s_s;
    p.scores = reinterpret_cast<float*>(scores);
    p.n_slots = n_slots, p.frame_tokens = frame_tokens, p.lam = lam, p.eps = eps, p.batch0 = batch0_decides;
    p.contiguous = contiguous;
    p.n_sink = int(n_sink), p.n_tail = int(n_tail), p.n_cand = int(n_cand), p.n_sel = int(n_sel);
    p.head_dim = int(head_dim), p.seg_index = int(seg_index);
    relax_select_kernel<<<unsigned(batch), kRelaxThreads, smem, reinterpret_cast<cudaStream_t>(stream)>>>(p);
    RELAXKV_CHECK_LAUNCH(kOp);
}

}  // namespace relaxkv
