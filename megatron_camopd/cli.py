"""The `camopd` command: one sub-command per user task, each implemented in its own module.

    camopd validate SPEC [key=value ...]      check a spec, print it resolved
    camopd train SPEC [key=value ...]         on-policy distillation (CaMOPD, MOPD, Uni-OPD, baselines)
    camopd sft SPEC [key=value ...]           response-only cross-entropy on chat data
    camopd serve --checkpoint DIR             SGLang-compatible server: scoring, sampling, weight sync (CPU, tests)
                                              (`camopd serve-teacher` is an alias)
    camopd plan SPEC [key=value ...] [--json] megatron-core config, memory per GPU, Slurm components of a spec
    camopd convert --to-hf|--from-hf SRC DST  Megatron <-> HuggingFace
    camopd eval MODEL --task ...              accuracy / pass@k of a model
    camopd demo --out DIR                     the end-to-end story on one CPU
    camopd tiny [--out runs/tiny_cpu]         tiny models/tokenizer/data for yaml/examples/camopd_tiny_cpu.yaml
    camopd compare SPEC --seeds N             methods side by side
    camopd sbatch SPEC / camopd launch SPEC   Slurm launchers

Errors a user can fix (`CamopdError`) print as one line and exit 2; anything else is a bug and keeps its
traceback. Sub-commands import their modules lazily so `camopd validate` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

from megatron_camopd.errors import CamopdError

# sub-command -> (module, function taking argv and returning an exit code)
COMMANDS = {
    "validate": ("megatron_camopd.config.validate", "validate_main"),
    "train": ("megatron_camopd.loop.train", "train_main"),
    "sft": ("megatron_camopd.loop.train", "sft_main"),
    "serve": ("megatron_camopd.serve.server", "serve_main"),
    "serve-teacher": ("megatron_camopd.serve.server", "serve_main"),  # alias of serve
    "plan": ("megatron_camopd.launch.plan", "plan_main"),
    "convert": ("megatron_camopd.convert.main", "convert_main"),
    "eval": ("megatron_camopd.evaluate.main", "eval_main"),
    "demo": ("megatron_camopd.demo.main", "demo_main"),
    "tiny": ("megatron_camopd.demo.tiny", "tiny_main"),
    "compare": ("megatron_camopd.demo.compare", "compare_main"),
    "sbatch": ("megatron_camopd.launch.sbatch", "sbatch_main"),
    "launch": ("megatron_camopd.launch.submit", "launch_main"),
}


def _usage() -> str:
    return __doc__.split("\n\n")[1] if __doc__ else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: camopd COMMAND [args]\n\n" + _usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"camopd: unknown command {cmd!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # megatron-core logs every bucket/config at INFO
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")  # expected on CPU machines
    module, func = COMMANDS[cmd]
    try:
        fn = getattr(importlib.import_module(module), func)
        return int(fn(rest) or 0)
    except CamopdError as exc:
        print(f"camopd {cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
