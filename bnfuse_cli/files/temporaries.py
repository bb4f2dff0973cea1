"""Where bnfuse keeps what it writes before it is complete, and what it needs only while it runs.

An output is written beside its final name: an anonymous file (Linux ``O_TMPFILE``: no crash can leave
it), else a named ``.NAME.bnfuse-tmp.HOST.PID.RANDOM`` file, or, for an output of several files (an
``.onnx`` model and its external data), a folder of that name.  Files a run reads back and drops (the
graph onnxruntime optimised) live in memory where the system allows it (Linux ``memfd``: no disk, nothing
left by a kill), else, like files a run needs on disk (a model above 2 GiB for onnxruntime), in a private
folder ``bnfuse-PURPOSE.HOST.PID.RANDOM`` of the system's temporary folder, removed when the run ends.
Every name says whose it is: a later run removes those of processes that died on this host (kill -9, power
loss), and never one of a run still going, here or on another machine sharing the folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError

__all__ = ["scratch_folder", "scratch_file", "write_failure"]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "host"


def _temp_name(output_name: str) -> str:
    """``.NAME.bnfuse-tmp.HOST.PID.RANDOM``: whose it is, so a later write can tell a stale one."""
    return f".{output_name}.bnfuse-tmp.{_host()}.{os.getpid()}.{os.urandom(4).hex()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file or a folder (with what it holds); whatever cannot be removed stays."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def _remove_stale_temporaries(directory: Path, output_name: str) -> None:
    """Remove named temporary files (and folders) of earlier writes of ``output_name`` whose process has died
    (kill -9, power loss) on this host. Only bnfuse's own pattern, only dead processes, only this host: a
    temporary of a write still running, here or on another machine sharing the directory, stays."""
    prefix = f".{output_name}.bnfuse-tmp."
    pattern = re.compile(re.escape(prefix) + r"(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}")
    try:
        names = [e.name for e in os.scandir(directory) if e.name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        found = pattern.fullmatch(name)
        if found and found["host"] == _host() and not _alive(int(found["pid"])):
            _remove(directory / name)


def _open_temporary(directory: Path, output_name: str) -> "tuple[int, Path | None]":
    """A new empty file in ``directory``, mode 0666 less the umask: (fd, None) for an anonymous file
    (Linux ``O_TMPFILE``: it has no name, so no crash can leave it behind), else (fd, its name)."""
    cloexec = getattr(os, "O_CLOEXEC", 0)
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile and os.path.isdir("/proc/self/fd"):  # linking it into place needs /proc/self/fd
        try:
            return os.open(directory, tmpfile | os.O_RDWR | cloexec, 0o666), None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # not supported here: fall back
                raise
    named = directory / _temp_name(output_name)
    return os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL | cloexec, 0o666), named


def _make_staging_folder(directory: Path, output_name: str) -> Path:
    """A new folder ``.NAME.bnfuse-tmp.HOST.PID.RANDOM`` in ``directory`` for the files of one output, mode
    0777 less the umask (the files written in it keep theirs when they are placed)."""
    folder = directory / _temp_name(output_name)
    os.mkdir(folder, 0o777)
    return folder


# --------------------------------------------------------------------------- what a run needs while it runs

_SCRATCH = re.compile(r"bnfuse-(?P<purpose>[a-z]+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+")


def _remove_stale_scratch(base: Path) -> None:
    """Remove the scratch folders of runs that died on this host (only this user's)."""
    try:
        entries = [e for e in os.scandir(base) if e.name.startswith("bnfuse-") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        found = _SCRATCH.fullmatch(entry.name)
        try:
            mine = entry.stat(follow_symlinks=False).st_uid == os.getuid()
        except (OSError, AttributeError):
            mine = False
        if found and mine and found["host"] == _host() and not _alive(int(found["pid"])):
            shutil.rmtree(base / entry.name, ignore_errors=True)


@contextlib.contextmanager
def scratch_folder(purpose: str) -> Iterator[Path]:
    """A private folder (mode 0700) ``bnfuse-PURPOSE.HOST.PID.RANDOM`` in the system's temporary folder,
    removed with what it holds when the block ends (also on an error or Ctrl-C); the folders of runs killed
    before they could remove theirs are removed first."""
    base = Path(tempfile.gettempdir())
    _remove_stale_scratch(base)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"bnfuse-{purpose}.{_host()}.{os.getpid()}.", dir=base))
    except OSError as exc:
        raise OutputError(f"cannot make a private folder in {base} for {purpose}: {exc.strerror or exc}; free "
                          "space there or set TMPDIR to another folder") from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def scratch_file(purpose: str, name: str) -> Iterator[Path]:
    """A path where a library may write a file this run reads back and then drops: in memory where the system
    allows it (Linux ``memfd``, opened by its ``/proc/self/fd`` path: no disk, nothing left by a kill), else in
    a :func:`scratch_folder`."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
        try:
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with scratch_folder(purpose) as folder:
        yield folder / name


def write_failure(path: Path) -> "OSError | None":
    """Why a library's write to ``path`` (a file or a folder) failed when it did not say: the file size limit
    (``ulimit -f``) reached, or no space left where it lies; None when neither is the cause."""
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        files = [p for p in path.iterdir()] if path.is_dir() else [path]
        largest = max((os.stat(p).st_size for p in files if p.is_file()), default=0)
        if limit != resource.RLIM_INFINITY and largest >= limit:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        if os.statvfs(path).f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except (ImportError, OSError, ValueError):
        pass
    return None
