"""One nested fit for tests/test_nested.py: run alone, or as every rank under torchrun.

    python tests/nested_dist_job.py FOLDER OUT_JSON
    torchrun --standalone --nproc-per-node 2 tests/nested_dist_job.py FOLDER OUT_JSON

Fits ``FOLDER/x.npy`` → ``FOLDER/y.npy`` (read from disk as every rank's shared cache) with ``nested=True``; rank 0
writes the gains, their intervals and the instability.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kcore import distributed as kd
from kcore.feature_cache import CachedArray
from kcore.fit import fit


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    with kd.job("cpu") as ctx:
        res = fit(CachedArray(folder / "x.npy"), CachedArray(folder / "y.npy"), orders=2, nested=True, max_steps=40,
                  seed=0, ctx=ctx)
        if ctx.is_main:
            g = res.nested.gains
            out.write_text(json.dumps({"world_size": ctx.world_size, **g.as_dict()}))


if __name__ == "__main__":
    main()
