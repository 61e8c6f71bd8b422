"""head_parallel.py: the tables of the docs' "Many GPUs" page are what the script computes now, and its model agrees
with the caches it describes."""
from pathlib import Path

from benchmarks.reports import head_parallel

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "pages" / "guides" / "many-gpus.md"


def test_docs_tables_are_the_scripts():
    assert head_parallel.markdown() in PAGE.read_text(), (
        f"{PAGE.relative_to(ROOT)}: the tables are stale: paste `python -m benchmarks head_parallel` in")


def test_each_rank_holds_a_pth_of_the_pools():
    for model in head_parallel.MODELS:
        for policy in head_parallel.POLICIES:
            whole = head_parallel.rank_cache(model, policy, 1)
            for p in head_parallel.RANKS:
                rank = head_parallel.rank_cache(model, policy, p)
                if rank is not None:
                    assert rank.storage.k.numel() * p == whole.storage.k.numel()
                    assert rank.memory_bytes() * p <= whole.memory_bytes() * 1.01  # + prototypes and tables
