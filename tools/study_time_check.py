"""How far the Studies page's first time estimate (a timed probe, no finished run yet) is from the measured time.

For each study named on the command line: probe this machine's costs, estimate the study at the page's Quick
settings, run the same ``kcore <study>`` command into a temporary folder and time it.

    .venv/bin/python tools/study_time_check.py cross_task compression diagnosis
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard.state._studies import QUICK  # noqa: E402
from kcore.study_options import estimate_time, probe_unit_costs, study_arguments, study_plan  # noqa: E402


def main(studies: list[str]) -> None:
    """Print one line per study: the estimate with its range, the measured time and their ratio."""
    for study in studies:
        plan = study_plan(study, QUICK[study])
        est = estimate_time(plan, probe_unit_costs())
        with tempfile.TemporaryDirectory() as tmp:
            args = study_arguments(study, QUICK[study])
            cmd = [sys.executable, "-m", "kcore.cli", study.replace("_", "-"), *args, "--out", f"{tmp}/study"]
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT).returncode
            took = time.perf_counter() - t0
        print(f"{study}: exit {rc}; estimate {est.seconds:.0f} s ({est.low:.0f}-{est.high:.0f}); measured {took:.0f} s; "
              f"ratio {took / est.seconds:.2f}; load {os.getloadavg()[0]:.1f}; {' '.join(args)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["cross_task"])
