"""Write the example Slurm scripts of `slurm/` from megatron_camopd/launch/templates/ (the one command that makes
them), or with `--check` exit 1 naming every file that differs from what the templates render (CI runs the
same comparison in tests/launch/test_sbatch_render.py).

    python tools/render_slurm.py [--check] [--out slurm]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_camopd.launch.sbatch import example_scripts

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when a file is stale")
    ap.add_argument("--out", default=str(REPO / "slurm"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    stale = []
    for name, text in example_scripts().items():
        path = out / name
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
            path.chmod(0o755)
    verb = "stale (run python tools/render_slurm.py)" if args.check else "written"
    for path in stale:
        print(f"{path}: {verb}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
