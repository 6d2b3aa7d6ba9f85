"""The held-out evaluation of one fixed g_θ for tests/test_distributed_ci.py: run alone, or as every rank under
torchrun.

    python tests/shares_dist_job.py FOLDER OUT_JSON [grouped]
    torchrun --standalone --nproc-per-node 2 tests/shares_dist_job.py FOLDER OUT_JSON [grouped]

Reads ``FOLDER/x.npy`` → ``FOLDER/y.npy`` as every rank's shared cache, splits and normalises them as a fit does
(:func:`kcore.fit.prepare_data`), and evaluates one seeded K = 2 g_θ (no training, so one process and two ranks
evaluate the very same function) on the held-out images; with ``grouped``, images come in groups of three and the
bootstrap resamples groups. Rank 0 writes the report's shares and their bootstrap intervals.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kcore import distributed as kd
from kcore.feature_cache import CachedArray
from kcore.fit import make_config, plan
from kcore.fit.data import prepare_data
from kcore.fit.evaluate import evaluate_heldout
from kcore.gtheta import GTheta, GThetaSpec


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    grouped = len(sys.argv) > 3 and sys.argv[3] == "grouped"
    torch.set_num_threads(1)
    plan.EVAL_BATCH_SIZE = 8  # several held-out batches, so that both ranks of a 2-rank job evaluate some images
    with kd.job("cpu") as ctx:
        x, y = CachedArray(folder / "x.npy"), CachedArray(folder / "y.npy")
        cfg = make_config("fast", orders=2, gate="linear", seed=0)
        groups = [i // 3 for i in range(x.shape[0])] if grouped else None
        data = prepare_data(x, y, cfg, torch.device("cpu"), ctx, groups=groups)
        torch.manual_seed(0)
        model = GTheta(GThetaSpec(x.shape[1], y.shape[1], 2, cfg.kernel_size, "paper", "linear", 0.5)).eval()
        with torch.no_grad():
            model.running_var.uniform_(0.5, 2.0)
        model = model.to(memory_format=data.memory_format)
        _, rep, _ = evaluate_heldout(model, data, cfg, None)
        if ctx.is_main:
            out.write_text(json.dumps({"world_size": ctx.world_size, "n_heldout": len(data.heldout_idx),
                                       "share_orders": list(rep.share_orders), "instability": rep.instability,
                                       "ci": rep.ci.as_dict()}))


if __name__ == "__main__":
    main()
