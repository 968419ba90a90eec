"""The adapter store: LoRA adapters written atomically, identified by checksum.

Layout: ``<root>/<run_id>/<version>/`` holding PEFT files
(``adapter_config.json``, ``adapter_model.safetensors``). A version is written
to a temporary sibling folder and renamed into place, so a reader never sees
a half-written adapter and a finished version is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
VERSION_RE = re.compile(r"^iter-(\d+)$")


def adapter_version(iteration: int) -> str:
    """The version the trainer publishes for an iteration's adapter: ``iter-NNNN``."""
    return f"iter-{iteration:04d}"


BASE_VERSION = "base"  # what the gateway reports before its first swap: the starting policy


def staleness(sampled_by: str | None, iteration: int) -> int | None:
    """How many adapter versions behind the on-policy one a response of ``iteration`` was sampled.

    Iteration i samples from ``iter-(i-1)`` (iteration 0 from the base): that is staleness 0. None when
    the version is unknown or not one of ours (a hand-published sample): it is not judged."""
    if sampled_by == BASE_VERSION:
        produced = -1
    elif sampled_by and (match := VERSION_RE.match(sampled_by)):
        produced = int(match.group(1))
    else:
        return None
    return iteration - 1 - produced


def adapter_checksum(path: str | Path) -> str:
    """sha256 over the PEFT files' names and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode())
        with open(Path(path) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def adapter_rank(path: str | Path) -> int:
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    ranks = [int(config.get("r", 0))] + [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


class AdapterStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, run_id: str, version: str) -> Path:
        return self.root / run_id / version

    def exists(self, run_id: str, version: str) -> bool:
        return all((self.path(run_id, version) / f).exists() for f in ADAPTER_FILES)

    def write(self, run_id: str, version: str, save: Callable[[Path], None]) -> tuple[Path, str]:
        """Calls ``save(tmp_dir)`` then renames into place; returns (path, checksum).

        Raises FileExistsError if the version is already complete: a finished
        iteration's adapter is never rewritten.
        """
        final = self.path(run_id, version)
        if self.exists(run_id, version):
            raise FileExistsError(f"adapter {run_id}/{version} already exists at {final}")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=final.parent))
        try:
            save(tmp)
            missing = [f for f in ADAPTER_FILES if not (tmp / f).exists()]
            if missing:
                raise RuntimeError(f"adapter save wrote no {', '.join(missing)}")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            checksum = adapter_checksum(tmp)
            if final.exists():  # a partial folder from an older layout or a crash
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, checksum

    def contains(self, path: str | Path) -> bool:
        """True if ``path`` resolves inside the store root (no ``..`` or symlink escape)."""
        try:
            Path(path).resolve().relative_to(self.root)
            return True
        except ValueError:
            return False
