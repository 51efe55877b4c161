"""Reading the files a user names (the configuration, secrets, a report):
regular files only, of a bounded size. ``token_file: /dev/zero`` would
otherwise grow the process without end, and a FIFO would block it forever."""
from __future__ import annotations

import os
import stat

#: The most a secret file (a token, a password) may hold.
SECRET_BYTES = 64 * 1024

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK:
          "a block device", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket"}


class NotRegular(ValueError):
    """Not a regular file: a FIFO, a device, a directory, a socket."""


class TooLarge(ValueError):
    """Larger than the limit."""


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The content of the regular file at ``path``, at most ``limit`` bytes.
    Raises OSError when it cannot be opened (ValueError for a NUL in the
    path), NotRegular or TooLarge (their text one line, without the content)."""
    # O_NONBLOCK: opening a FIFO with no writer would wait for one.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special')})")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise TooLarge(f"larger than {_size(limit)}")
    return b"".join(chunks)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else \
        f"{n >> 10} KiB" if n >= 1 << 10 and not n % (1 << 10) else f"{n} bytes"
