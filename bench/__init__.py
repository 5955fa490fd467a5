"""The benchmark suite: engine plan, archive and restore against their floors.

Run it with ``python -m bench.run`` (see bench/README.md).
"""
