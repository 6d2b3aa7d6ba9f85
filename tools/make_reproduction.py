"""Assemble REPRODUCTION.md from the per-study notes in docs/reproduction/ (paper order).

    .venv/bin/python tools/make_reproduction.py
"""
from pathlib import Path

from kcore.experiments import STUDIES

ROOT = Path(__file__).resolve().parents[1]
HEADER = """# Reproducing the paper's studies on the embedded data

Each section below reports what a `kcore <study>` command found on the bundled kshapes data and sample
models, next to what the paper claims, and says plainly whether the trend reproduces. Every number comes
from the command quoted in its section, run on the shared 2-core CPU machine of the development session
(timings there are wall-clock under load). The networks here are small and trained for minutes on
64×64 (or 32×32) synthetic images, while the paper used VGG/ResNet/AlexNet on CUB, Stanford Dogs and
VOC; agreement or disagreement on this scale is evidence about the tool and the small setting, not a
verdict on the paper.

The per-study notes live in `docs/reproduction/`; this file is assembled from them by
`tools/make_reproduction.py`.
"""


def main() -> None:
    """Write REPRODUCTION.md: the header, then each study's note (or "Not run yet")."""
    parts = [HEADER]
    for name in STUDIES:
        note = ROOT / "docs" / "reproduction" / f"{name}.md"
        if note.is_file():
            parts.append(note.read_text().strip() + "\n")
        else:
            parts.append(f"## {name}\n\nNot run yet.\n")
    (ROOT / "REPRODUCTION.md").write_text("\n\n".join(parts))


if __name__ == "__main__":
    main()
