"""One writer per run folder: an exclusive lock held while a command writes into the folder.

``fit`` (new or resumed), ``eval`` (it writes predictions and T-CAMs), and every run of ``compare`` and
``demo`` hold the lock of the folder they write; ``compare`` and ``demo`` also hold the lock of the
comparison's folder. A second writer is refused at once with one line naming the folder and the pid
that holds it, before it reads or writes anything there:

    error: run folder runs/tiny is in use by process 4242 (lock runs/tiny/.lock), wait for it to end or
    choose another run folder

The lock is ``flock`` on ``<folder>/.lock``, which also holds the holder's pid. The kernel releases it
when the holder ends, however it ends, so a killed run never blocks the folder: the next writer takes
the lock over and says so. While it holds the lock no other writer can be active, so temporary files
left by a killed writer (``.latest.pt.tmp<pid>`` and the like: a SIGKILL during a checkpoint write)
are removed then.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

from ..config import ConfigError

log = logging.getLogger("train")

LOCK_FILE = ".lock"
# What a writer leaves behind when it is killed mid-write (train.run.checkpoint.save_atomic, the outputs of
# train.run.folder, config.yaml, compare's records).
TEMPORARY = (".*.tmp*", "*.tmp")


class RunFolderBusy(ConfigError):
    """Another process holds the run folder's lock."""


def _flock():
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the lock file alone, created exclusively
        return None
    return fcntl


class RunFolderLock:
    """The exclusive lock of ``folder`` (created if missing), as a context manager.

    On entry: the lock is taken or :class:`RunFolderBusy` is raised; a lock left by a process that no
    longer runs is taken over (a note says so) and its temporary files removed. On exit: released, the
    lock file removed, and the folder too if the lock had created it and nothing else was written.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunFolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunFolderBusy` (see the class docstring)."""
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fcntl = _flock()
        fd, previous = self._open_flock(fcntl) if fcntl is not None else self._open_exclusive()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        removed = self._remove_temporaries()
        if previous is not None and previous != os.getpid():
            log.warning("note: took over the lock of run folder %s from process %d, which no longer runs%s",
                        self.folder, previous,
                        f"; removed what it left half-written: {', '.join(removed)}" if removed else "")
        elif removed:
            log.warning("note: removed files left half-written in %s by a process that was stopped: %s",
                        self.folder, ", ".join(removed))

    def _open_flock(self, fcntl) -> tuple[int, int | None]:
        """The locked lock file, and the pid a previous holder left in it (None if none)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise self._busy(_holder(self.path)) from None
            # the previous holder removes the file before it lets go: if it did so between our open and
            # our flock, this lock guards a file no longer in the folder, so start again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd, _read_pid_fd(fd)
            os.close(fd)

    def _open_exclusive(self) -> tuple[int, int | None]:
        """Without flock: the lock file created exclusively; one whose pid no longer runs is stale."""
        previous = None
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), previous
            except FileExistsError:
                holder = _holder(self.path)
                if holder is None or _alive(holder):
                    raise self._busy(holder) from None
                previous = holder
                self.path.unlink(missing_ok=True)

    def _busy(self, holder: int | None) -> RunFolderBusy:
        who = f"process {holder}" if holder is not None else "another process"
        return RunFolderBusy(f"run folder {self.folder} is in use by {who} (lock {self.path}), wait for it to "
                             f"end or choose another run folder")

    def _remove_temporaries(self) -> list[str]:
        removed = []
        for pattern in TEMPORARY:
            for p in sorted(self.folder.glob(pattern)):
                if p.is_file() and p.name != LOCK_FILE:
                    p.unlink(missing_ok=True)
                    removed.append(p.name)
        return removed

    def release(self) -> None:
        """Let go of the lock (and remove the folder if taking the lock created it and it stayed empty)."""
        if self._fd is None:
            return
        # remove the file while still holding the lock (a waiter that opened it notices, see acquire)
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.folder.rmdir()  # only if the command wrote nothing there (e.g. it failed at once)
            except OSError:
                pass


def _read_pid_fd(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _holder(path: Path) -> int | None:
    """The pid in the lock file at ``path`` (its holder writes it just after locking: wait briefly)."""
    for _ in range(20):
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
