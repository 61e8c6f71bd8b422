"""Compile the Triton attention kernel for Hopper (sm_90a) on any machine and report what ptxas made of it.

No GPU needed: registers, stack (spills), shared memory, and whether loads were pipelined (cp.async) and
dots became wgmma, for every autotune config at Wan shapes (bf16, D = 128; pools in bf16, then FP8 pools),
with the specialisations the JIT applies at run time (unit last-dim strides, 16-divisible pointers and
strides). A CPU-side check of "look at the compiler output" before a GPU session measures anything.

    python benchmarks/ptxas_report.py [--max-stack BYTES]

Run it without TRITON_INTERPRET=1 (the interpreter replaces the jitted kernels this compiles).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from relaxkv_kernels.availability import interpreter_enabled
from relaxkv_kernels.ops.sparse_kv_attention import triton as attention

STRIDES = ["s_qb", "s_qn", "s_qh", "s_qd", "s_kb", "s_kn", "s_kh", "s_kd", "s_vb", "s_vn", "s_vh", "s_vd",
           "s_sb", "s_ss", "s_sf", "s_ob", "s_on", "s_oh", "s_od"]
SCALE_STRIDES = ["s_ksb", "s_ksn", "s_vsb", "s_vsn"]  # FP8 scales [B, n_rows, H]: s_ksh = s_vsh = 1
UNIT = ["s_qd", "s_kd", "s_vd", "s_od", "s_sf"]  # contiguous last dims: the JIT specialises 1 to a constant
DIV16 = ["q", "k_pool", "v_pool", "seg", "inv_freq", "out", "HEAD_DIM", "s_qb", "s_qn", "s_qh", "s_kb", "s_kn",
         "s_kh", "s_vb", "s_vn", "s_vh", "s_ob", "s_on", "s_oh"]


def jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # autotuner -> jitted function
    return kernel


def compile_config(cfg: triton.Config, head_dim: int = 128, fp8: bool = False):
    """``cfg`` compiled for bf16 q; pools in bf16 (the scales None, as the launcher passes them), or FP8 ones."""
    fn = jit_function(attention._sparse_kv_attention_kernel)
    block_d = max(32, triton.next_power_of_2(head_dim))
    n_t, _ = attention.pair_split(head_dim)
    constexprs = {"N_T": n_t, "BLOCK_D": block_d, "HALF_D": block_d // 2, "UPCAST": False, "FP8": fp8, **cfg.kwargs,
                  **{n: 1 for n in UNIT}}
    if fp8:
        constexprs.update(s_ksh=1, s_vsh=1)
        scales = {"k_scale": "*fp32", "v_scale": "*fp32", **{n: "i64" for n in SCALE_STRIDES}}
    else:
        constexprs.update(k_scale=None, v_scale=None)
        scales = {n: "i64" for n in [*SCALE_STRIDES, "s_ksh", "s_vsh"]}
    pool = "*fp8e4nv" if fp8 else "*bf16"
    sig = {"q": "*bf16", "k_pool": pool, "v_pool": pool, "seg": "*i32", "inv_freq": "*fp32", "out": "*bf16",
           "sm_scale": "fp32", "N_Q": "i32", "N_SEG": "i32", "N_HEADS": "i32", "HEAD_DIM": "i32",
           **{n: "i64" for n in STRIDES}, **scales, **{n: "constexpr" for n in constexprs}}
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in DIV16 + (["k_scale", "v_scale"] if fp8 else [])}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def resource_usage(cubin: bytes) -> str:
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs {found.group(1):>3}  stack {found.group(2):>4} B" if found else "regs ?  stack ?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-stack", type=int,
                        help="exit 1 if the first (main) config uses more stack (bytes), with either pool format")
    args = parser.parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("ptxas_report: unset TRITON_INTERPRET (it replaces the jitted kernels)")
    print("Triton", triton.__version__, "| sparse_kv_attention, bf16, D = 128, target sm_90a (compiled here, not run)")
    status = 0
    for fp8 in (False, True):
        stacks = []
        for cfg in attention._configs():
            ck = compile_config(cfg, fp8=fp8)
            ptx = ck.asm["ptx"]
            usage = resource_usage(ck.asm["cubin"])
            stacks.append(int(re.search(r"stack\s+(\d+)", usage).group(1)))
            pools = "fp8 " if fp8 else "bf16"
            print(f"{pools} pools BM {cfg.kwargs['BLOCK_M']:>3} BN {cfg.kwargs['BLOCK_N']:>3} warps "
                  f"{cfg.num_warps} stages {cfg.num_stages}: {usage}  smem {ck.metadata.shared // 1024:>3} KiB  "
                  f"cp.async {'cp.async' in ptx}  wgmma {'wgmma' in ptx}")
        if args.max_stack is not None and stacks[0] > args.max_stack:
            print(f"main config ({'fp8' if fp8 else 'bf16'} pools) uses {stacks[0]} B of stack, more than "
                  f"{args.max_stack}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
