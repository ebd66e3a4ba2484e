"""Shared memory for `ipc://` endpoints: tensor bytes cross through one mapped region per client.

ZeroMQ still carries every message (the msgpack header, and any tensor sent as a frame) and stays
the signal: the REQ/REP lockstep, deadlines, Lazy Pirate resends and error replies are unchanged.
Only where a tensor's bytes lie changes: a spec with `"shm": [offset, nbytes]` names bytes in the
region instead of the next frame. `tcp://` endpoints (other hosts cannot map our memory), a side
with shared memory off (`LLAMA_SHM=0`, `--no-shm`) and CURVE (it encrypts frames, not memory)
keep raw frames.

Layout of one region (one file, one client, created by the server, unlinked once both mapped it):

    0                           request_bytes                        request_bytes + reply_bytes
    +-----------------------------+--------------------------------------+
    | request area                | reply area                           |
    | the client writes,          | the server writes,                   |
    | the server reads            | the client reads (and copies out)    |
    +-----------------------------+--------------------------------------+

    A tensor lies at `offset` from the start of its area, a multiple of ALIGN, and spans
    nbytes = prod(shape) * itemsize, C-contiguous, little-endian: the same bytes as its frame would
    be. Writers place tensors one after another; a tensor that does not fit (or is empty) crosses
    as a frame, in order, as before. The client may also reserve a tensor at the top of its request
    area for its next message, compute into it and send it where it lies (`Area.reserve`). The
    reader trusts nothing but its own arithmetic: it computes nbytes from dtype and shape, and
    checks alignment and offset + nbytes <= its area's size before it makes a view (`Area.view`).
    Nothing about the layout is ever read from the memory itself.

Handshake and state machine (server side; the client's steps in brackets):

    Init / Ping reply  "shm": {"max_request_bytes", "max_reply_bytes"}   (absent: frames only)
    ShmAttach {request_bytes, reply_bytes, replaces}                      (when a call needs room)
        CREATED   an unnamed file (O_TMPFILE) in the shm folder, mode 0600, pages reserved
                  (posix_fallocate: ENOSPC now, not SIGBUS later), mapped with MAP_POPULATE
        LINKED    linked as tsqp-shm-<32 random hex> just before the reply names it
                  [open O_NOFOLLOW; check: regular file, our uid, 0600, one link, the size;
                   map; unlink at once]
        MAPPED    unlinked: the first request that names the region unlinks it if the client
                  has not (same inode only); nothing is left in the folder from here on
        DROPPED   on ShmDetach (the client closing), ShmAttach `replaces` (it grew), idle for
                  IDLE_S, evicted (MAX_REGIONS), or the server stopping: unlinked if still linked,
                  unmapped once no tensor views it
    A LINKED region whose client never came back is unlinked after LINK_GRACE_S. A request naming
    an unknown region gets RegionGone; the client attaches afresh (or falls back) and resends what
    it sent (from its old request area and frames: the caller's tensors may have changed since).

Ownership is the lockstep: from sending a request until its reply arrives the server owns both
areas (reads the request area, writes the reply area); from the reply until the next request
the client owns both. That binds an honest peer only: a hostile server can write any byte of the
region at any moment, so what the client checks (--verify) never lies in it, either way. A resend
(Lazy Pirate) carries the same bytes from the same unchanged area under a new id, and a tensor frame
that would view the reply area (a borrowed reply sent back) crosses as a copy. The copies a client's
resends leave queued at the server still arrive; the server runs no request older than the newest it
has run on a region (ids only grow), so none reads or writes the region after the client moved on.
The client copies each reply tensor out of the reply area before anything uses it (the server
could change it later), unless the caller borrows the reply (tee_client.rpc: read where it lies,
and done with before the next call; never a reply anything checks); the server copies integer
tensors (token ids, which it checks before it indexes with them) out of the request area, and
computes on float tensors in place.

What a crash leaves behind: nothing in the folder once a region is MAPPED (both sides unlinked
it). The file exists only between LINKED and the client's open, microseconds; if the client dies
there the server unlinks it after LINK_GRACE_S or when it stops. A kill -9 of either side frees
the memory with its last mapping. The file is created unnamed, so a server killed while creating
leaves nothing either.

Names: SEGMENT_PREFIX + 16 random bytes (128 bits, `secrets`), O_EXCL on the fallback path.
Within one user: the socket is 0600, and a process that can map the region could ptrace either
side anyway.
"""

import errno
import mmap
import os
import re
import secrets
import stat
from dataclasses import dataclass

import numpy as np
import torch

from protocol.errors import BadRequest, BadShape
from protocol.messages import TensorSpec
from protocol.wire import TORCH_DTYPES

ALIGN = 64  # bytes: a cache line, and a multiple of every wire dtype's size
SEGMENT_PREFIX = "tsqp-shm-"
NAME_RE = re.compile(rf"{SEGMENT_PREFIX}[0-9a-f]{{32}}")
MIN_AREA = 16 << 20  # the smallest area a client asks for; grown in powers of two
IDLE_S = 600.0  # a region unused this long is dropped (its client is gone, or idle)
LINK_GRACE_S = 30.0  # a named region whose client has not mapped it by then is unlinked
MAX_REGIONS = 16  # per server; the least recently used is dropped first


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _nbytes(shape, dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize


def area_size(need: int, cap: int) -> int:
    """The area a client asks for to hold `need` bytes: a power of two from MIN_AREA, at most `cap`."""
    size = MIN_AREA
    while size < need:
        size *= 2
    return min(size, cap)


class Area:
    """One side's window of a region: bounds-checked views of what the peer placed, and placement of its own."""

    def __init__(self, memory: torch.Tensor, start: int, size: int):
        if start % ALIGN:
            raise BadRequest(f"a shared-memory area must start at a multiple of {ALIGN} bytes, not {start}")
        self.memory, self.start = memory, start  # uint8 over the whole mapping
        self.bytes = memory[start : start + size]  # uint8, shares the mapping
        self.size = size
        self.base = self.bytes.data_ptr()
        self.used = 0  # the writer's next free byte in this message
        self.limit = size  # the end of what `take` may hand out in this message: below what was reserved for it
        self.reserved = 0  # bytes at the top set aside for the next message (`reserve`)
        self.typed: dict[torch.dtype, torch.Tensor] = {}  # the whole mapping viewed as each dtype, made on first use

    def at(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """The C-contiguous tensor of `shape` whose bytes start `offset` (a multiple of ALIGN) bytes into this area,
        already known to lie inside it: one as_strided over the mapping, not a slice and two views (every call
        pays this, twice on each side)."""
        strides, step = [], 1
        for d in reversed(shape):
            strides.append(step)
            step *= max(d, 1)
        if dtype not in self.typed:
            whole = self.memory.numel() // dtype.itemsize * dtype.itemsize
            self.typed[dtype] = self.memory[:whole].view(dtype)
        return self.typed[dtype].as_strided(shape, strides[::-1], (self.start + offset) // dtype.itemsize)

    def reset(self) -> "Area":
        """Start a new message: the whole area is free again (the peer is done with the last one), but for what was
        reserved for this message at its top; the message after it starts with nothing reserved."""
        self.used, self.limit, self.reserved = 0, self.size - self.reserved, 0
        return self

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor at the next aligned offset, or None when it does not fit (or is empty)."""
        nbytes = _nbytes(shape, dtype)
        offset = aligned(self.used)
        if nbytes == 0 or offset + nbytes > self.limit:
            return None
        self.used = offset + nbytes
        return self.at(offset, shape, dtype)

    def reserve(self, shape, dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor set aside at the top of the area for the next message, or None when it does not fit: the writer
        computes into it and sends it in that message, where `place` finds it already in place (no copy)."""
        nbytes = _nbytes(shape, dtype)
        offset = (self.size - self.reserved - nbytes) // ALIGN * ALIGN
        if nbytes == 0 or offset < 0:
            return None
        self.reserved = self.size - offset
        return self.at(offset, shape, dtype)

    def place(self, t: torch.Tensor) -> list[int] | None:
        """[offset, nbytes] of `t` here: where it already lies (a result written in place), else where
        it is copied to; None when it does not fit (it crosses as a frame)."""
        if self.holds(t):
            return [t.data_ptr() - self.base, t.nbytes]
        dst = self.take(t.shape, t.dtype)
        if dst is None:
            return None
        dst.copy_(t)
        return [dst.data_ptr() - self.base, t.nbytes]

    def holds(self, t: torch.Tensor) -> bool:
        start = t.data_ptr() - self.base
        return (
            t.device.type == "cpu"
            and t.is_contiguous()
            and 0 <= start
            and start % ALIGN == 0
            and start + t.nbytes <= self.size
            and t.nbytes > 0
        )

    def view(self, spec: TensorSpec) -> torch.Tensor:
        """The tensor a peer's header places here, once its offset and length are checked against this area."""
        offset, nbytes = spec.shm
        if nbytes != spec.nbytes:
            raise BadShape(f"shared-memory length {nbytes} does not match {spec.dtype}{spec.shape} ({spec.nbytes})")
        if offset % ALIGN:
            raise BadShape(f"shared-memory offset {offset} is not a multiple of {ALIGN}")
        if offset + nbytes > self.size:
            raise BadShape(f"shared-memory bytes [{offset}, {offset + nbytes}) lie outside the {self.size}-byte area")
        if nbytes == 0:
            raise BadShape("an empty tensor crosses as a frame, not in shared memory")
        return self.at(offset, spec.shape, TORCH_DTYPES[spec.dtype])


@dataclass(eq=False)
class Segment:
    """One mapped region file. The mapping lives as long as any tensor views it (`memory` holds it)."""

    name: str
    path: str
    size: int
    memory: torch.Tensor  # uint8 over the whole mapping
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file the creator linked; None once unlinked

    def areas(self, request_bytes: int) -> tuple[Area, Area]:
        return Area(self.memory, 0, request_bytes), Area(self.memory, request_bytes, self.size - request_bytes)

    def unlink(self) -> None:
        """Remove the name, if it still names this segment's file (never another file's)."""
        if self.inode is None:
            return
        try:
            st = os.stat(self.path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.inode = None


def _map(fd: int, size: int) -> torch.Tensor:
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    # numpy holds a buffer export of the mmap, and torch holds the array: the memory stays mapped
    # until the last tensor viewing it is gone, never unmapped under a view
    return torch.from_numpy(np.frombuffer(mm, dtype=np.uint8))


def create_segment(folder: str, size: int) -> Segment:
    """Server: a new private region of `size` bytes, mapped, not yet named (see `publish`).

    OSError (ENOSPC: the folder is full) propagates: the caller answers that shared memory is
    unavailable and the client keeps using frames.
    """
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        path = None
    except OSError as e:  # a filesystem without O_TMPFILE: a named file from the start
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        path = os.path.join(folder, SEGMENT_PREFIX + secrets.token_hex(16))
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly, whatever the umask
        os.posix_fallocate(fd, 0, size)
        memory = _map(fd, size)
        if path is None:
            path = os.path.join(folder, SEGMENT_PREFIX + secrets.token_hex(16))
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:  # linkat(AT_SYMLINK_FOLLOW) (a dir fd makes Python use it): fails if the name exists
                os.link(f"/proc/self/fd/{fd}", os.path.basename(path), dst_dir_fd=folder_fd, follow_symlinks=True)
            finally:
                os.close(folder_fd)
        st = os.fstat(fd)
    except BaseException:
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        raise
    finally:
        os.close(fd)
    return Segment(os.path.basename(path), path, size, memory, (st.st_dev, st.st_ino))


def open_segment(folder: str, name: str, size: int) -> Segment:
    """Client: map the region the server named, after checking it is what it should be; unlink it."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadRequest(f"shared-memory name {name!r:.60} is not one this client accepts")
    path = os.path.join(folder, name)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        problems = [
            "not a regular file" if not stat.S_ISREG(st.st_mode) else "",
            "owned by another user" if st.st_uid != os.getuid() else "",
            f"mode {oct(stat.S_IMODE(st.st_mode))}, not 0o600" if stat.S_IMODE(st.st_mode) != 0o600 else "",
            f"{st.st_nlink} links" if st.st_nlink != 1 else "",
            f"{st.st_size} bytes, not {size}" if st.st_size != size else "",
        ]
        if any(problems):
            raise BadRequest(f"refusing shared memory {path}: {', '.join(p for p in problems if p)}")
        memory = _map(fd, size)
    finally:
        os.close(fd)
    segment = Segment(name, path, size, memory, (st.st_dev, st.st_ino))
    segment.unlink()  # both sides have it mapped: nothing stays in the folder
    return segment
