"""kcore's benchmark suite: ``python -m bench --quick`` (minutes) or ``--full`` (docs/performance.md's table, hours).

Sections (each a module): time to quality against the authors' recipe (:mod:`bench.quality`), training
FLOP/s against a matrix multiply (:mod:`bench.throughput`), decomposition against a forward pass
(:mod:`bench.decomposition`), extraction speed and peak memory with the disk cache (:mod:`bench.extraction`),
and the embedded default end to end with the dashboard's redraw (:mod:`bench.end_to_end`). Every comparison
is a ratio of timings taken in the same process, so that a busy shared machine affects both sides alike.
"""
