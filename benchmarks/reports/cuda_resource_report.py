"""What nvcc/ptxas make of every csrc/ kernel for one GPU target, on any machine (no GPU needed).

Per kernel instantiation: registers, stack frame, spill stores/loads, barriers (``ptxas -v``), and for the
16-byte (``VECTOR = true``) instantiations how many 128-bit global loads and stores the PTX holds
(``ld.global.nc.v4`` from ``__ldg`` of a uint4, ``ld.global.v4``, ``st.global[.wb].v4`` from common.cuh's
``__stwb``): the accesses rope_append and gather_kv_rope need to reach their copy-bandwidth targets.

    python -m benchmarks cuda_resource_report [--arch sm_90a] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from setup import NVCC_FLAGS  # the flags the extension is built with (setup.py, at the root of the tree)
from setup import find_nvcc  # the nvcc the build itself uses

ROOT = Path(__file__).resolve().parents[2]

_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?")
_VECTOR = re.compile(r"Lb1E")  # mangled `true` template argument: the 16-byte instantiation
ACCESSES = {"ld_v4": re.compile(r"\bld\.global(?:\.nc)?\.v4\."), "st_v4": re.compile(r"\bst\.global(?:\.wb)?\.v4\.")}


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def ptx_entries(ptx: str) -> dict[str, str]:
    """Mangled entry name -> its PTX body."""
    starts = [(m.start(), m[1]) for m in re.finditer(r"^\.visible \.entry (\w+)\(", ptx, re.M)]
    bounds = [s for s, _ in starts[1:]] + [len(ptx)]
    return {name: ptx[s:e] for (s, name), e in zip(starts, bounds)}


def ptxas_usage(log: str) -> list[dict]:
    """Per entry function of a ``ptxas -v`` log: kernel (mangled name), registers, barriers, stack, spill_stores,
    spill_loads (bytes)."""
    rows = []
    for chunk in log.split("Compiling entry function")[1:]:
        stack, spill_st, spill_ld = map(int, _PROPS.search(chunk).groups())
        used = _USED.search(chunk)
        rows.append({"kernel": _ENTRY.search("Compiling entry function" + chunk)[1], "registers": int(used[1]),
                     "barriers": int(used[2] or 0), "stack": stack, "spill_stores": spill_st, "spill_loads": spill_ld})
    return rows


def report(arch: str = "sm_90a") -> list[dict]:
    """One row per kernel instantiation of csrc/*.cu."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("cuda_resource_report: nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)")
    ptxas = str(Path(nvcc).with_name("ptxas"))
    flags = [f for f in NVCC_FLAGS if f not in ("-Xcompiler", "-fPIC", "-fvisibility=hidden")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted((ROOT / "csrc").glob("*.cu")):
            ptx_path = Path(tmp) / (src.stem + ".ptx")
            subprocess.run([nvcc, "-ptx", str(src), "-o", str(ptx_path), f"-arch={arch}", f"-I{ROOT / 'csrc'}",
                            *flags], check=True, capture_output=True, text=True)
            info = subprocess.run([ptxas, "-v", f"-arch={arch}", str(ptx_path), "-o", str(Path(tmp) / "k.cubin")],
                                  check=True, capture_output=True, text=True).stderr
            bodies = ptx_entries(ptx_path.read_text())
            for row in ptxas_usage(info):
                name = row["kernel"]
                row.update(source=src.name, vector=bool(_VECTOR.search(name)))
                row.update({k: len(p.findall(bodies[name])) for k, p in ACCESSES.items()})
                rows.append(row)
    for row, pretty in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = pretty.removeprefix("void ").split("(")[0].replace("relaxkv::", "")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    rows = report(args.arch)
    print(f"{'kernel':50} {'regs':>4} {'stack':>5} {'spill':>5} {'ld.v4':>5} {'st.v4':>5}   ({args.arch})")
    for r in rows:
        print(f"{r['kernel']:50} {r['registers']:4d} {r['stack']:5d} {r['spill_stores'] + r['spill_loads']:5d} "
              f"{r['ld_v4']:5d} {r['st_v4']:5d}")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "kernels": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
