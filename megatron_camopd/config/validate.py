"""`camopd validate SPEC [key=value ...]`: load a spec strictly and print it resolved, or one error line.

Exit status 0 on success (the resolved YAML on stdout), 2 on a spec error (one line on stderr). With
`--check-paths` it also fails when a local input path (model, in-process teachers, data files) does not exist.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from megatron_camopd.config.loader import dump_yaml, load_spec
from megatron_camopd.config.spec import ExperimentSpec
from megatron_camopd.errors import CamopdError, SpecError


def missing_inputs(spec: ExperimentSpec) -> list[str]:
    """Dotted fields whose local input path does not exist (outputs such as checkpoint.dir are not inputs)."""
    paths: list[tuple[str, str | None]] = [
        ("model.hf_path", spec.model.hf_path),
        ("model.checkpoint", spec.model.checkpoint),
        ("model.tokenizer", spec.model.tokenizer),
    ]
    method = spec.method.method_class()
    if method.needs_reference:
        paths.append((f"method.{method.name}.reference", method.reference_path(spec.method)))
    for name, teacher in spec.teachers.items():
        paths += [(f"teachers.{name}.checkpoint", teacher.checkpoint), (f"teachers.{name}.hf_path", teacher.hf_path)]
    paths += [(f"data.streams.{i}.path", s.path) for i, s in enumerate(spec.data.streams)]
    return [f"{field}: {path}" for field, path in paths if path is not None and not os.path.exists(path)]


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the validate command (the CLI reuses it)."""
    parser = argparse.ArgumentParser(prog="camopd validate", description="Validate an experiment spec.")
    parser.add_argument("spec", help="YAML experiment spec")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. method.rho_g=0.6")
    parser.add_argument("--check-paths", action="store_true", help="also require local input paths to exist")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return parser


def validate_main(argv: Sequence[str] | None = None) -> int:
    """Run `camopd validate`; returns the exit status (0 valid, 2 invalid or bad arguments)."""
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse already printed usage
        return int(exc.code or 0)
    try:
        spec = load_spec(args.spec, args.overrides)
        if args.check_paths:
            missing = missing_inputs(spec)
            if missing:
                raise SpecError(f"{args.spec}: missing input paths: {'; '.join(missing)}")
    except CamopdError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        sys.stdout.write(dump_yaml(spec))
    return 0
