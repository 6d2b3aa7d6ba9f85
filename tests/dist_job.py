"""One kcore job for tests/test_distributed.py: run alone, or as every rank under torchrun.

    python tests/dist_job.py OUT_JSON CACHE_DIR [N_IMAGES]
    torchrun --standalone --nproc-per-node 2 tests/dist_job.py OUT_JSON CACHE_DIR [N_IMAGES]

Compares the bundled sample pair on the bundled images with the features sharded into CACHE_DIR, then
rank 0 writes what the test compares: the normalisation statistics, the least-squares start W^(0), the
held-out report and the split.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kcore import distributed as kd
from kcore.checkpoints import load_model
from kcore.data import sample_images
from kcore.feature_cache import cached_arrays
from kcore.fit import init_model, make_config, prepare_data
from kcore.pipeline import compare

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out, cache = Path(sys.argv[1]), Path(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 160
    torch.set_num_threads(1)
    a = load_model(ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors")
    b = load_model(ROOT / "sample_models" / "kshapes_resnet_s0.safetensors")
    with kd.job("cpu") as ctx:
        comp = compare(a, "block2", b, "layer2", sample_images(n=n), epochs=4, seed=0, device="cpu",
                       batch_size=32, cache_dir=cache, ctx=ctx)
        fit = comp.directions["A_to_B"].fit
        cfg = make_config("fast", orders=2, epochs=4, seed=0)
        data = prepare_data(*cached_arrays(comp.features), cfg, ctx.device, ctx)
        _, lin = init_model(data, cfg)
        if ctx.is_main:
            norm = fit.norm
            out.write_text(json.dumps({
                "world_size": ctx.world_size,
                "hosts": comp.provenance["hosts"],
                "norm": {k: v.tolist() for k, v in norm.state().items()},
                "norm_again": {k: v.tolist() for k, v in data.norm.state().items()},
                "lstsq": lin.weight.flatten().tolist(),
                "instability": fit.heldout_report.instability,
                "heldout_error": fit.heldout_error,
                "heldout": list(fit.heldout_indices),
                "entry": str(comp.features.entry),
            }))


if __name__ == "__main__":
    main()
