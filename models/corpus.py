"""Real source code for negatives: the Python standard library of the building interpreter.

The library is PSF-licensed and present wherever the build runs, so no download is needed;
its digest (over every file's path and content) goes into the manifest, so two builds can be
compared. Files are split into train and held-out by a hash of their path, which keeps the
split stable across machines whatever subset of files a build sees.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from cabincrew.canonical import canonical_hash, sha256_hex

# Test suites embed keys, odd encodings and deliberately broken code: label noise for every
# model here, so they are left out. Site-packages is not the standard library.
_EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
MAX_FILE_CHARS = 200_000


@dataclass(frozen=True)
class SourceFile:
    """One file of real code, addressed by its path relative to the library root."""

    rel: str
    text: str


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[SourceFile]:
    """Every ``.py`` file of the standard library outside test suites, sorted by path."""
    base = root or stdlib_root()
    files = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(base).as_posix()
        if _EXCLUDED_PARTS & set(rel.split("/")):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[:MAX_FILE_CHARS]
        if text.strip():
            files.append(SourceFile(rel, text))
    return files


def corpus_record(files: list[SourceFile], root: Path | None = None) -> dict[str, object]:
    """The provenance entry for a set of files: count, characters and digest."""
    digest = canonical_hash([[f.rel, sha256_hex(f.text.encode("utf-8"))] for f in files])
    return {
        "kind": "local-stdlib",
        "name": "python-stdlib",
        "version": sysconfig.get_python_version(),
        "path": str(root or stdlib_root()),
        "files": len(files),
        "chars": sum(len(f.text) for f in files),
        "sha256": digest,
        "licence": "PSF-2.0",
        "note": "*.py outside test suites and site-packages, first 200k characters each",
    }


def is_heldout(rel: str, share: float, salt: str) -> bool:
    """Whether a file belongs to the held-out split; stable for a given path and salt."""
    bucket = int.from_bytes(hashlib.sha256(f"{salt}:{rel}".encode()).digest()[:8], "big")
    return bucket / 2**64 < share


def split_files(
    files: list[SourceFile], share: float, salt: str
) -> tuple[list[SourceFile], list[SourceFile]]:
    """Split files into (train, held-out) by path hash."""
    train = [f for f in files if not is_heldout(f.rel, share, salt)]
    held = [f for f in files if is_heldout(f.rel, share, salt)]
    return train, held


def random_windows(text: str, size: int, count: int, rng: random.Random) -> list[str]:
    """Up to ``count`` windows of at most ``size`` characters at random offsets."""
    if len(text) <= size:
        return [text]
    starts = sorted(rng.randrange(0, len(text) - size) for _ in range(count))
    return [text[s : s + size] for s in starts]


def random_lines(text: str, rng: random.Random, max_lines: int) -> list[str]:
    """A run of 1 to ``max_lines`` consecutive lines from a random position."""
    lines = text.splitlines()
    if not lines:
        return []
    n = rng.randint(1, max_lines)
    start = rng.randrange(0, max(1, len(lines) - n + 1))
    return lines[start : start + n]
