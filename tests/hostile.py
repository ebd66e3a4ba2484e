"""Hostile requests, shared by the in-process tests (test_handler.py) and the process tests.

`MALFORMED` is a table of broken requests and the error type each must get; `mutated_request`
is a hypothesis strategy that mutates valid requests (shapes, dtypes, frames, headers, and the
shared-memory offsets and lengths of protocol.shm: given a region's name it aims inside it).
"""

import itertools

import msgpack
import numpy as np
from hypothesis import strategies as st

from protocol.wire import PROTOCOL_VERSION


IDS = itertools.count(1)  # ids only grow, as a client's do: a server runs none older than the newest on a region


def request(method: str, args: dict | None = None, tensors=(), **header) -> list:
    """Frames of one request; each tensor is (dtype, shape, its bytes), or (dtype, shape, [offset, nbytes]):
    in shared memory."""
    specs = [{"dtype": d, "shape": s, **({"shm": b} if isinstance(b, list) else {})} for d, s, b in tensors]
    head = {"v": PROTOCOL_VERSION, "id": next(IDS), "method": method, "args": args or {}, "tensors": specs, **header}
    return [msgpack.packb(head), *(b for _, _, b in tensors if not isinstance(b, list))]


def f32(*shape) -> tuple:
    n = 1
    for d in shape:
        n *= d
    return ("float32", list(shape), bytes(4 * n))


MALFORMED = {
    "not msgpack": ([b"\xc1\x00"], "BadRequest"),
    "not a map": ([msgpack.packb([1, 2])], "BadRequest"),
    "wrong version": (request("Ping", v=PROTOCOL_VERSION + 1), "VersionMismatch"),
    "unknown method": (request("Generate"), "UnknownMethod"),
    "unknown argument": (request("Matmul", {"transpose": True}, [f32(2, 2), f32(2, 2)]), "BadRequest"),
    "unknown module": (request("Linear", {"layer": 0, "names": ["x_proj"]}, [f32(1, 64)]), "BadRequest"),
    "layer out of range": (request("Linear", {"layer": 99, "names": ["q_proj"]}, [f32(1, 64)]), "UnknownModule"),
    "wrong last dim": (request("Linear", {"layer": 0, "names": ["q_proj"]}, [f32(1, 65)]), "BadShape"),
    "wrong dtype": (
        request("Linear", {"layer": 0, "names": ["q_proj"]}, [("float16", [1, 64], bytes(128))]),
        "BadShape",
    ),
    "unknown dtype": (request("LMHead", {}, [("float64", [1, 64], bytes(512))]), "BadShape"),
    "missing frame": (request("LMHead", {}, [f32(1, 64)])[:1], "BadShape"),
    "lying byte length": (request("LMHead", {}, [("float32", [1, 64], bytes(100))]), "BadShape"),
    "inner dims differ": (request("Matmul", {}, [f32(2, 3), f32(4, 2)]), "BadShape"),
    "too few tensors": (request("Matmul", {}, [f32(2, 3)]), "BadShape"),
    "ids out of vocab": (request("Embedding", {}, [("int64", [1], (10**6).to_bytes(8, "little"))]), "BadShape"),
    "float ids": (request("Embedding", {}, [f32(1, 2)]), "BadShape"),
    "huge result": (request("Matmul", {}, [f32(1, 1), ("float32", [1, 1 << 30], b"")]), "BadShape"),
    "residual into the wrong module": (
        request("Residual", {"layer": 0, "out": "o_proj", "names": ["q_proj"]}, [f32(1, 64), f32(1, 64)]),
        "UnknownModule",
    ),
    "residual rows differ": (
        request("Residual", {"layer": 0, "out": "o_proj", "names": ["up_proj"]}, [f32(2, 64), f32(1, 64)]),
        "BadShape",
    ),
    "residual of the wrong width": (
        request("Residual", {"layer": 0, "out": "down_proj", "names": ["q_proj"]}, [f32(1, 64), f32(1, 64)]),
        "BadShape",
    ),
    "dimension past int64": (request("Echo", {}, [("float32", [0, 2**63], b"")]), "BadShape"),
    "dimension of 2**64-1": (request("Echo", {}, [("float32", [0, 2**64 - 1], b"")]), "BadShape"),
    "empty but vast": (request("Echo", {}, [("float32", [0, 2**62, 2**62], b"")]), "BadShape"),
    "result dwarfs operands": (
        request("Matmul", {}, [("float32", [7000, 0], b""), ("float32", [0, 7000], b"")]),
        "TooLarge",
    ),
    "shared memory, no region": (request("LMHead", {}, [("float32", [1, 64], [0, 256])]), "BadShape"),
    "unknown region": (request("Ping", shm="tsqp-shm-" + "0" * 32), "RegionGone"),
    "negative offset": (request("LMHead", {}, [("float32", [1, 64], [-64, 256])]), "BadShape"),
}
REGION_NAME = "tsqp-shm-" + "0" * 32  # placeholder, replaced by a real region's name in `shm_malformed`


def shm_malformed(region: str, area: int) -> dict:
    """Requests naming a real region (`area` bytes of request area) whose offsets or lengths lie; each gets BadShape."""
    x = lambda at: request("LMHead", {}, [("float32", [1, 64], at)], shm=region)  # noqa: E731
    return {
        "offset past the area": (x([area, 256]), "BadShape"),
        "ends past the area": (x([area - 192, 256]), "BadShape"),
        "offset not aligned": (x([4, 256]), "BadShape"),
        "length lies, short": (x([0, 128]), "BadShape"),
        "length lies, long": (x([0, 512]), "BadShape"),
        "offset 2**62": (x([2**62, 256]), "BadShape"),
        "offset past int64": (x([2**64 - 64, 256]), "BadShape"),
        "empty in shared memory": (request("Echo", {}, [("float32", [0, 4], [0, 0])], shm=region), "BadShape"),
        "a frame too many": (request("Echo", {}, [("float32", [2], [0, 8])], shm=region) + [b"12345678"], "BadShape"),
        "an ok control": (x([64, 256]), None),
    }


F32 = lambda *shape: (
    {"dtype": "float32", "shape": list(shape)},
    np.random.default_rng(0).standard_normal(shape, dtype=np.float32).tobytes(),
)  # noqa: E731
TEMPLATES = [
    ("Ping", {}, []),
    ("Init", {}, []),
    ("Echo", {}, [F32(3, 4)]),
    ("Embedding", {}, [({"dtype": "int64", "shape": [1, 3]}, np.array([[1, 5, 9]], dtype=np.int64).tobytes())]),
    ("Linear", {"layer": 1, "names": ["q_proj", "k_proj", "v_proj"]}, [F32(1, 3, 64)]),
    ("Linear", {"layer": 0, "names": ["down_proj"]}, [F32(2, 112)]),
    ("Matmul", {"transpose_b": True}, [F32(1, 2, 2, 3, 16), F32(1, 2, 1, 3, 16)]),
    ("LMHead", {}, [F32(2, 64)]),
    ("Residual", {"layer": 0, "out": "o_proj", "names": ["gate_proj", "up_proj"]}, [F32(1, 2, 64), F32(1, 2, 64)]),
    ("Residual", {"layer": 1, "out": "down_proj", "names": ["lm_head"]}, [F32(2, 112), F32(2, 64)]),
]
dims = st.integers(min_value=-3, max_value=1 << 40)
ints = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)  # what msgpack can carry


offsets = st.one_of(
    st.integers(min_value=-3, max_value=1 << 41),
    st.sampled_from([0, 1, 63, 64, 1 << 20, (1 << 24) - 64, 1 << 24, 2**62, 2**64 - 1]),
)
SHM_MUTATIONS = ["shm_place", "shm_offset", "shm_length", "shm_region"]


@st.composite
def mutated_request(draw, region: str | None = None) -> list[bytes]:
    method, args, tensors = draw(st.sampled_from(TEMPLATES))
    specs, frames = [dict(s) for s, _ in tensors], [b for _, b in tensors]
    header = {
        "v": PROTOCOL_VERSION,
        "id": draw(st.integers(0, 1 << 31)),
        "method": method,
        "args": dict(args),
        "tensors": specs,
    }
    mutation = draw(
        st.sampled_from(
            [
                "none",
                "shape",
                "dtype",
                "frames",
                "truncate",
                "nan",
                "version",
                "method",
                "args",
                "field",
                "header_bytes",
                *SHM_MUTATIONS,
            ]
        )
    )
    if mutation == "shape" and specs:
        specs[draw(st.integers(0, len(specs) - 1))]["shape"] = draw(st.lists(dims, max_size=9))
    elif mutation == "dtype" and specs:
        specs[0]["dtype"] = draw(st.sampled_from(["float16", "bfloat16", "int32", "int64", "float64", "complex64", ""]))
    elif mutation == "frames":
        frames = draw(st.lists(st.binary(max_size=256), max_size=4))
    elif mutation == "truncate" and frames:
        frames[-1] = frames[-1][: draw(st.integers(0, max(len(frames[-1]) - 1, 0)))]
    elif mutation == "nan" and frames and specs[0]["dtype"] == "float32":
        frames[0] = np.full(
            len(frames[0]) // 4, draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38])), np.float32
        ).tobytes()
    elif mutation == "version":
        header["v"] = draw(st.one_of(ints, st.text(max_size=3), st.none()))
    elif mutation == "method":
        header["method"] = draw(st.one_of(st.text(max_size=12), ints))
    elif mutation == "args":
        header["args"] = draw(
            st.dictionaries(
                st.text(max_size=8), st.one_of(ints, st.text(max_size=4), st.lists(ints, max_size=3)), max_size=3
            )
        )
    elif mutation == "field":
        del header[draw(st.sampled_from(["v", "id", "method", "tensors"]))]
    elif mutation in SHM_MUTATIONS:  # the tensors move into shared memory, one after another (64-byte aligned)
        header["shm"] = region or draw(st.sampled_from([REGION_NAME, "../../etc/passwd", ""]))
        header["id"] = next(IDS)  # newer than any before it: past the region's check of ids, to its offsets
        offset = 0
        for spec, frame in zip(specs, frames, strict=True):
            spec["shm"] = [offset, len(frame)]
            offset += -(-max(len(frame), 1) // 64) * 64
        frames = [] if specs else frames
        if mutation == "shm_offset" and specs:
            specs[draw(st.integers(0, len(specs) - 1))]["shm"][0] = draw(offsets)
        elif mutation == "shm_length" and specs:
            specs[draw(st.integers(0, len(specs) - 1))]["shm"][1] = draw(offsets)
        elif mutation == "shm_region":
            header["shm"] = draw(st.one_of(st.text(max_size=70), ints, st.none(), st.just(REGION_NAME)))
    packed = msgpack.packb(header)
    if mutation == "header_bytes":
        packed = draw(st.one_of(st.binary(max_size=64), st.just(packed[: len(packed) // 2])))
    return [packed, *frames]
