"""gpu-server's shared-memory regions: one per client, created on ShmAttach, dropped when unused.

The layout, the handshake and who owns which area when are written down once, in protocol.shm;
this file is the server's bookkeeping: create, look up by name, unlink once the client has
mapped, drop (detach, replaced, idle, evicted, shutdown), and on CUDA register each region as
pinned memory so results go from the device straight into it, one DMA copy.
"""

import logging
import time
from dataclasses import dataclass, field

import torch

from protocol.errors import RegionGone, TooLarge
from protocol.messages import ShmAttachArgs
from protocol.shm import IDLE_S, LINK_GRACE_S, MAX_REGIONS, Area, Segment, aligned, create_segment

log = logging.getLogger("gpu_server")


@dataclass(eq=False)
class Region:
    segment: Segment
    request: Area  # the client writes, this server reads
    reply: Area  # this server writes, the client reads
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    pinned: bool = False
    last_id: int = 0  # the newest request run on this region: none older runs after it (Handler.region)


class Regions:
    def __init__(self, folder: str, max_request_bytes: int, max_reply_bytes: int, device: torch.device):
        self.folder = folder
        self.max_request_bytes, self.max_reply_bytes = aligned(max_request_bytes), aligned(max_reply_bytes)
        self.device = device
        self.regions: dict[str, Region] = {}

    def offer(self) -> dict:
        """What Init and Ping say: shared memory is on, and how large an area may be."""
        return {"max_request_bytes": self.max_request_bytes, "max_reply_bytes": self.max_reply_bytes}

    def attach(self, args: ShmAttachArgs) -> dict:
        """A new region for the client asking (its previous one, if named, is dropped); its name and sizes."""
        if args.replaces is not None:
            self.drop(args.replaces)
        request_bytes = aligned(min(args.request_bytes, self.max_request_bytes))
        reply_bytes = aligned(min(args.reply_bytes, self.max_reply_bytes))
        while len(self.regions) >= MAX_REGIONS:  # the least recently used goes first
            self.drop(min(self.regions.values(), key=lambda r: r.last_used).segment.name, "evicted")
        try:
            segment = create_segment(self.folder, request_bytes + reply_bytes)
        except OSError as e:
            raise TooLarge(
                f"cannot create a {(request_bytes + reply_bytes) / 2**20:.0f} MiB shared-memory region in "
                f"{self.folder}: {e.strerror}"
            ) from None
        region = Region(segment, *segment.areas(request_bytes))
        region.pinned = self.pin(region)
        self.regions[segment.name] = region
        log.debug("shared-memory region %s: %d + %d bytes", segment.name, request_bytes, reply_bytes)
        return {"name": segment.name, "request_bytes": request_bytes, "reply_bytes": reply_bytes}

    def get(self, name: str) -> Region:
        """The region a request names; its file is unlinked on first use (the client has mapped it)."""
        region = self.regions.get(name)
        if region is None:
            raise RegionGone(f"no shared-memory region {name[:40]!r} here (dropped, or the server restarted)")
        region.segment.unlink()
        region.last_used = time.monotonic()
        return region

    def detach(self, name: str) -> None:
        self.drop(name, "detached")

    def sweep(self) -> None:
        """Between requests: drop regions idle past IDLE_S, unlink names never mapped within LINK_GRACE_S."""
        now = time.monotonic()
        for name, region in list(self.regions.items()):
            if now - region.last_used > IDLE_S:
                self.drop(name, "idle")
            elif region.segment.inode is not None and now - region.created > LINK_GRACE_S:
                region.segment.unlink()

    def close(self) -> None:
        for name in list(self.regions):
            self.drop(name, "server stopping")

    def drop(self, name: str, why: str = "replaced") -> None:
        region = self.regions.pop(name, None)
        if region is None:
            return
        region.segment.unlink()
        if region.pinned:
            torch.cuda.cudart().cudaHostUnregister(region.segment.memory.data_ptr())
        log.debug("shared-memory region %s dropped (%s)", name, why)
        # the mapping goes with the last tensor viewing it (protocol.shm.Segment)

    def pin(self, region: Region) -> bool:
        """On CUDA: page-lock the region, so copies to and from the device are one DMA each, no staging."""
        if self.device.type != "cuda":
            return False
        memory = region.segment.memory
        err = torch.cuda.cudart().cudaHostRegister(memory.data_ptr(), memory.numel(), 0)
        if int(err) != 0:  # still correct, only slower: pageable copies
            log.warning("could not pin shared-memory region %s (cudaHostRegister error %s)", region.segment.name, err)
            return False
        return True
