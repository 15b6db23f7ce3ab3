"""Reproduce the model cards' figures: ``python -m models.eval [--models models/build] [NAME…]``.

Runs each built model over the evaluation sets stored in its folder, through the same
runtime the service uses; needs only the runtime dependencies. ``--list`` prints what is
built. ``--json`` prints the figures in the manifest's ``metrics`` shape, so a rebuilt
model can be compared with the figures its manifest recorded at build time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from preflight_svc.onnx_errors import ManifestError, ModelError
from preflight_svc.onnx_eval import evaluate_model_dir, format_evaluation, list_model_dirs
from preflight_svc.onnx_manifest import load_manifest


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate or list built models; exit 1 when a model does not load."""
    parser = argparse.ArgumentParser(prog="python -m models.eval", description=__doc__)
    parser.add_argument("names", nargs="*", help="model names (default: all built models)")
    parser.add_argument("--models", type=Path, default=Path("models/build"))
    parser.add_argument("--list", action="store_true", help="list built models and exit")
    parser.add_argument("--json", action="store_true", help="print figures as JSON")
    args = parser.parse_args(argv)
    if not args.models.is_dir():
        print(f"error: {args.models} does not exist; run `make models` first", file=sys.stderr)
        return 1
    folders = list_model_dirs(args.models)
    if args.list:
        for folder in folders:
            try:
                m = load_manifest(folder)
            except ManifestError as exc:
                print(f"{folder.name}\tINVALID\t{exc.message}")
                continue
            print(f"{m.name}\t{m.version}\t{m.task}\t{m.sha256[:16]}\t{folder}")
        return 0
    chosen = [f for f in folders if not args.names or f.name in args.names]
    report: dict[str, object] = {}
    for folder in chosen:
        try:
            evaluation = evaluate_model_dir(folder)
        except ModelError as exc:
            print(f"error: {folder}: {exc.message}", file=sys.stderr)
            return 1
        if args.json:
            report[evaluation.model] = evaluation.as_dict()
        else:
            print(format_evaluation(evaluation))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
