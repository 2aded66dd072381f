"""The repository's root, the check that a folder can be written, and the one atomic writer: a file is replaced
whole or not at all (a kill or a full disk mid-write leaves the previous version), and synced to disk before it
replaces the old one."""

import os
from pathlib import Path

__all__ = ["ROOT", "check_writable", "write_atomic"]

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


def check_writable(folder: str | Path, what: str) -> None:
    """``folder`` (which may not exist yet) can be created and written, by the kernel's account (a read-only or
    immutable folder, a file in the way); checked before any work, without writing anything."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {folder} cannot be written: {existing} is read-only for this user")
