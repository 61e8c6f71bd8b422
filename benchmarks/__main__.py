"""One entry point for the benchmarks: ``python -m benchmarks NAME [ARGS]``; without a name, the list.

    python -m benchmarks                        # the benchmarks, one line each
    python -m benchmarks chunk --shapes tiny    # the same run as python -m benchmarks.chunk.bench_chunk --shapes tiny
    python -m benchmarks chunk --help           # its options

NAME runs its module as ``python -m <module>`` would (its ``main``, its exit status); ``micro`` runs the per-op
microbenchmarks, a pytest file, with ARGS given to pytest.
"""
from __future__ import annotations

import ast
import importlib.util
import runpy
import sys
from pathlib import Path

BENCHMARKS = {  # name -> module, by group
    "rope_append": "benchmarks.ops.bench_rope_append",
    "micro": "benchmarks.ops.test_micro",
    "chunk": "benchmarks.chunk.bench_chunk",
    "host": "benchmarks.chunk.bench_host",
    "scaling": "benchmarks.chunk.bench_scaling",
    "generator": "benchmarks.end_to_end.bench_generator",
    "compile": "benchmarks.end_to_end.bench_compile",
    "ranks": "benchmarks.end_to_end.bench_ranks",
    "stream": "benchmarks.end_to_end.bench_stream",
    "diffusers": "benchmarks.end_to_end.bench_diffusers",
    "kv_memory": "benchmarks.reports.kv_memory",
    "fp8_budget": "benchmarks.reports.fp8_budget",
    "head_parallel": "benchmarks.reports.head_parallel",
    "target_report": "benchmarks.reports.target_report",
    "cuda_resource_report": "benchmarks.reports.cuda_resource_report",
    "plot_results": "benchmarks.plots.plot_results",
    "plot_generator": "benchmarks.plots.plot_generator",
}


def summary(module: str) -> str:
    """The first line of ``module``'s docstring, read from its source (nothing is imported)."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    return ast.get_docstring(ast.parse(source)).splitlines()[0]


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [f"  {name:{width}}  {module.split('.')[1]:10}  {summary(module)}" for name, module in BENCHMARKS.items()]
    return "usage: python -m benchmarks NAME [ARGS]   (NAME --help: its options)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(listing())
        return 0
    name, args = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"{listing()}\n\npython -m benchmarks: unknown benchmark {name!r}", file=sys.stderr)
        return 2
    if name == "micro":
        import pytest  # noqa: PLC0415

        return pytest.main([importlib.util.find_spec(BENCHMARKS[name]).origin, *args])
    sys.argv = [sys.argv[0], *args]
    runpy.run_module(BENCHMARKS[name], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
