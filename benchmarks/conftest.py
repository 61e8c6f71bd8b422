"""Benchmark test setup: Triton interpreter on CPU-only machines, GPU tests skipped without CUDA.

``tests/conftest.py`` does not apply here (conftest files are per directory), so this mirrors the two
parts of it the benchmarks need. The package's NaN poisoning of ``torch.empty`` is not used: these
tests time ops, the op tests in ``tests/`` check their outputs.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped cleanly when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
