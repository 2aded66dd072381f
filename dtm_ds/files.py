"""The repository's root, the check that a folder can be written, and the one atomic writer: a file is replaced
whole or not at all (a kill or a full disk mid-write leaves the previous version), and synced to disk before it
replaces the old one."""

import fcntl
import os
import socket
import time
from pathlib import Path

__all__ = ["ROOT", "FolderInUse", "FolderLock", "check_writable", "write_atomic"]

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


class FolderInUse(RuntimeError):
    """Another process holds the run folder's lock."""


class FolderLock:
    """An exclusive lock on a run folder for this process's life: ``flock`` on ``<folder>/.lock``, which the
    kernel releases when the process ends, however it ends (a SIGKILL, a lost node), so a stale lock never
    blocks a requeue. The file names its holder (host, pid, since when) for the launch it refuses."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """None when this process now holds the lock; else who holds it (the file's line)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        self.fd = fd  # held until this process ends or the lock is dropped
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self):  # a main() that raised in a process that goes on (tests calling main in-process)
        self.release()
