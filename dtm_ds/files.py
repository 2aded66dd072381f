"""The repository's root and the one atomic writer: a file is replaced whole or not at all (a kill or a full
disk mid-write leaves the previous version), and synced to disk before it replaces the old one."""

import os
from pathlib import Path

__all__ = ["ROOT", "write_atomic"]

ROOT = Path(__file__).resolve().parents[1]
"""The repository (ds_configs/, the entrypoints): found from the package, whatever the working directory."""


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temporary beside it, fsynced, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
