"""relaxkv-kernels: pure-Python package + optional CUDA extension relaxkv_kernels._C.

The extension (csrc/*.cu + csrc/bindings.cpp, pybind11, no torch headers) is compiled and linked by
nvcc itself, so it builds against any torch wheel, CPU-only included. It is skipped, leaving a
pure-Python install, when nvcc is not found or RELAXKV_SKIP_CUDA_BUILD=1.
RELAXKV_CUDA_ARCHS picks the targets, as torch's TORCH_CUDA_ARCH_LIST does ("+PTX": embed that target's PTX
too). The default is every GPU of relaxkv_kernels/targets.py plus PTX of the newest, which later GPUs JIT.
"""
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension
from setuptools import find_packages
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden"]


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in ([os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []) + [
            shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


DEFAULT_ARCHS = "80;86;89;90a;100a;120+PTX"  # the `gencode` of every relaxkv_kernels.targets.TARGETS entry


def cuda_archs() -> list[str]:
    """What the extension holds: ``sm_<arch>`` cubins and ``compute_<arch>`` PTX, from RELAXKV_CUDA_ARCHS."""
    spec = os.environ.get("RELAXKV_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").replace(" ", ";")
    archs = []
    for entry in filter(None, spec.split(";")):
        arch = entry.removesuffix("+PTX").replace(".", "")
        archs.append(f"sm_{arch}")
        if entry.endswith("+PTX"):
            archs.append(f"compute_{arch}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc's -gencode flags for ``archs`` (``cuda_archs()``)."""
    return [f"-gencode=arch=compute_{a.split('_')[1]},code={a}" for a in archs]


class NvccBuildExt(build_ext):
    """Compile every source of an extension with nvcc (in parallel), link with nvcc -shared."""

    def build_extension(self, ext):
        import pybind11

        nvcc = find_nvcc()
        out = Path(self.get_ext_fullpath(ext.name))
        tmp = Path(self.build_temp) / "csrc"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        includes = [f"-I{d}" for d in (pybind11.get_include(), sysconfig.get_paths()["include"],
                                       str(ROOT / "csrc"))]
        archs = cuda_archs()
        gencode = gencode_flags(archs)
        # the list reaches the module as _C.cuda_archs (relaxkv_kernels.targets checks the running GPU against it)
        define = f"-DRELAXKV_CUDA_ARCHS={';'.join(archs)}"

        def compile_one(src):
            obj = tmp / (Path(src).name + ".o")
            cmd = [nvcc, "-c", str(ROOT / src), "-o", str(obj), *NVCC_FLAGS, *gencode, define, *includes]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return str(obj)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objs = list(pool.map(compile_one, ext.sources))
        # cudart linked statically: no libcudart.so lookup at import, works beside any torch wheel.
        cmd = [nvcc, "-shared", *objs, "-o", str(out), "-cudart=static", *gencode]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def extensions():
    if os.environ.get("RELAXKV_SKIP_CUDA_BUILD", "0") == "1":
        print("relaxkv-kernels: RELAXKV_SKIP_CUDA_BUILD=1, pure-Python install")
        return []
    if find_nvcc() is None:
        print("relaxkv-kernels: nvcc not found, pure-Python install (no relaxkv_kernels._C)")
        return []
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cuh"))
    return [Extension("relaxkv_kernels._C", sources + ["csrc/bindings.cpp"], depends=headers)]


DIFFUSERS_EXTRA = ["diffusers>=0.42.1", "accelerate", "transformers", "imageio", "imageio-ffmpeg"]  # 0.42.1: tested
py_packages = find_packages(where="python", include=["relaxkv_gen", "relaxkv_gen.*"])

# guarded: benchmarks/reports/cuda_resource_report.py and tests/package/ import from here
# (setuptools runs this file as __main__)
if __name__ == "__main__":
    setup(
        name="relaxkv-kernels",
        version="0.1.0",
        description="Fused Triton/CUDA kernels for KV memory in autoregressive video diffusion",
        python_requires=">=3.10",
        packages=find_packages(include=["relaxkv_kernels", "relaxkv_kernels.*"]) + py_packages,
        # python/ holds relaxkv_gen and the command's light launcher module; relaxkv_kernels stays at the top
        package_dir={"": "python", "relaxkv_kernels": "relaxkv_kernels"},
        py_modules=["relaxkv_generate"],
        # the engine="auto" table (read by relaxkv_kernels/ops/dense_attention/tuning.py)
        package_data={"relaxkv_kernels": ["ops/dense_attention/tuning.json"]},
        install_requires=["torch", "numpy", "tqdm", "matplotlib", "safetensors",
                          "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # the test tiers: pytest-benchmark (benchmarks/), pybind11 + ninja (the emulated CUDA kernels, tests/cuda_emu/),
        # ruff: the lint check of tests/package/test_layout.py and .ci/run, pinned so every machine lints by the same rules;
        # and the diffusers extra (relaxkv_kernels.integrations.diffusers, relaxkv_gen.diffusers: accelerate for
        # diffusers' from_pretrained, transformers for the text encoder, imageio-ffmpeg for the mp4s), whose tests
        # run everywhere; docs: the site of docs/ (mkdocs build --strict -f docs/mkdocs.yml, in .ci/run), API pages
        # read from the docstrings statically by mkdocstrings, README sections included by pymdownx.snippets
        extras_require={"diffusers": DIFFUSERS_EXTRA,
                        "test": ["pytest", "pytest-benchmark", "pybind11", "ninja", "ruff==0.17.6", *DIFFUSERS_EXTRA],
                        "docs": ["mkdocs==1.6.1", "mkdocstrings[python]>=1.0", "pymdown-extensions>=10"]},
        entry_points={"console_scripts": ["relaxkv-generate = relaxkv_generate:main"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": NvccBuildExt},
        zip_safe=False,
    )
