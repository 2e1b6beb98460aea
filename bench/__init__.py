"""taskwarden's benchmark suite: ``python -m bench`` (full) or ``python -m bench --quick`` (smoke).

One module per measurement (each exposes ``TITLE``, ``METHOD`` and
``async def run(sizes, scratch) -> Section``); ``bench.__main__`` runs them,
prints one JSON line and writes docs/BENCHMARKS.md. See that page for the
method of each measurement and the latest results.
"""
