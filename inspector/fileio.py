"""Files in and out, safely: the tool's one way to open what a user names, and to write.

Every file espfix-inspect reads may come from another machine and be hostile, and the
tool runs as root.  So an input is opened without blocking (``O_NONBLOCK``: a FIFO
given as the core would otherwise hang in ``open()``), checked to be a regular file on
the open descriptor (no race with a rename), and read with a size bound.  The kernel's
own files that are meant (``/proc/kcore``, ``/proc/kallsyms``) are regular files in
procfs and pass the same check.

Outputs are written atomically: a temporary file in the target's directory, fsync,
rename, then fsync of the directory so that the rename itself survives a crash.  The
mode is never wider than asked and than the umask allows; an existing target that is
not a regular file (a device node, a FIFO, a directory, a symlink) is refused rather
than silently replaced.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

from .errors import InspectError

TYPE_CHECKING = False           # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO

__all__ = ["open_regular", "read_bounded", "buffered", "atomic_output", "MiB"]

MiB = 1 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str, what: str, fix: str) -> BinaryIO:
    """Open *path* for reading if it is a regular file, without ever blocking.

    *what* names the file's role in messages ("core", "symbol file", "config file"),
    *fix* is the advice for a missing or wrong file.  Raises InspectError.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InspectError(f"{what} {path} does not exist", fix) from None
    except IsADirectoryError:
        raise InspectError(f"{what} {path} is a directory", fix) from None
    except PermissionError:
        raise                                   # the caller knows what a refusal means here
    except OSError as e:
        raise InspectError(f"cannot open {what} {path}: {e.strerror}", fix) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InspectError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file",
                               fix)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_bounded(fh: BinaryIO, path: str, what: str, limit: int, *,
                 chunk: int = 4 * MiB, stop: bytes | None = None) -> bytes:
    """All of *fh*, refusing more than *limit* bytes (procfs files report size 0,
    so the bound is enforced while reading, not from ``st_size``).  With *stop*, the
    reading ends after the chunk in which those bytes first appear."""
    chunks = []
    total = 0
    with buffered(fh) as reader:
        while True:
            data = reader.read(min(chunk, limit + 1 - total))
            if not data:
                break
            chunks.append(data)
            total += len(data)
            if total > limit:
                raise InspectError(f"{what} {path} is larger than {limit // MiB} MiB, more "
                                   f"than any real one", f"pass the real {what}")
            if stop is not None and stop in data:
                break
    return b"".join(chunks)


@contextmanager
def buffered(fh: BinaryIO) -> Iterator[BinaryIO]:
    """*fh* with a buffer in front while the block runs, for large reads of a raw file
    from :func:`open_regular`.  A procfs ``seq_file`` (/proc/kallsyms) returns at most a
    page per ``read()``: on the raw file each ``read(1 MiB)`` allocates a megabyte for
    4 KiB (1,815 of them for trixie's kallsyms: 0.6 s of a live ``validate`` under TCG,
    docs/performance.md), where the buffered reader fills the megabyte in C.  The raw
    file is left open (detached), positioned after what was read."""
    import io
    if not isinstance(fh, io.RawIOBase):
        yield fh
        return
    reader = io.BufferedReader(fh, 1 << 16)
    try:
        yield reader            # type: ignore[misc]
    finally:
        reader.detach()


def _refuse_non_regular_target(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise InspectError(f"output {path} exists and is {_kind(st.st_mode)}; it would be "
                           "replaced by a regular file", "pick another output path")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass                                    # some filesystems refuse; the data is synced
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: str, mode: int = 0o644, *,
                  honour_umask: bool = True) -> Iterator[BinaryIO]:
    """Yield a file object; on success it replaces *path* atomically.

    The file gets *mode* minus the umask (so 0600 stays 0600 or narrower), or exactly
    *mode* with ``honour_umask=False``: for a file another user must read whatever
    umask the writer runs under (the Prometheus textfile, read by node_exporter's
    user, written by a unit with ``UMask=0077``).  An existing *path* that is not a
    regular file is refused with InspectError.
    """
    _refuse_non_regular_target(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    import tempfile                 # writers only: a read-only run never imports it
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~umask if honour_umask else mode)
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
