"""Ops backends: where the linear half of the model runs.

    remote       gpu-server over ZeroMQ (the product)
    passthrough  in this process on --device, tensors moved with .to() (Intel TDX with a
                 passthrough GPU: the GPU is reachable directly, no IPC)
    tee-only     in this process on the CPU: the all-in-TEE security baseline

All three record the same `Call`s, so their results carry the same timing breakdown.
"""

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from tee_client.model import ModelSpec
from tee_client.stats import Call, current


class RemoteOps:
    def __init__(self, rpc):
        self.rpc = rpc

    def init(self) -> ModelSpec:
        spec = ModelSpec.from_init(*self.rpc.call("Init"))
        self.rpc.wire_dtype, self.rpc.fingerprint = spec.dtype, spec.fingerprint
        return spec

    def embedding(self, input_ids: Tensor) -> Tensor:
        return self.rpc.call("Embedding", {}, [input_ids])[1][0]

    def linear(self, layer: int, names: Sequence[str], x: Tensor) -> list[Tensor]:
        return self.rpc.call("Linear", {"layer": layer, "names": list(names)}, [x])[1]

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
        return self.rpc.call("Matmul", {"transpose_b": transpose_b}, [a, b])[1][0]

    def lm_head(self, x: Tensor) -> Tensor:
        return self.rpc.call("LMHead", {}, [x])[1][0]

    def close(self) -> None:
        self.rpc.close()


class LocalOps:
    def __init__(self, engine):
        self.engine = engine
        self.moves = engine.device.type != "cpu"  # tee-only moves nothing: its transfer is zero

    def init(self) -> ModelSpec:
        return ModelSpec.from_init(*self.engine.init())

    def embedding(self, input_ids: Tensor) -> Tensor:
        return self.run("Embedding", self.engine.embedding, input_ids)[0]

    def linear(self, layer: int, names: Sequence[str], x: Tensor) -> list[Tensor]:
        return self.run("Linear", lambda x: self.engine.linear(layer, names, x), x)

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
        return self.run("Matmul", lambda a, b: self.engine.matmul(a, b, transpose_b), a, b)[0]

    def lm_head(self, x: Tensor) -> Tensor:
        return self.run("LMHead", self.engine.lm_head, x)[0]

    def close(self) -> None:
        pass

    def run(self, method: str, fn, *tensors: Tensor) -> list[Tensor]:
        t0 = time.perf_counter_ns()
        inputs = [self.to_device(t) for t in tensors]
        t1 = time.perf_counter_ns()
        out = fn(*inputs)
        out = out if isinstance(out, list) else [out]
        self.engine.synchronize()
        t2 = time.perf_counter_ns()
        results = [self.to_host(t) for t in out]
        t3 = time.perf_counter_ns()
        if (stats := current()) is not None:
            moved = lambda ts: sum(t.nbytes for t in ts) if self.moves else 0  # noqa: E731
            stats.record(
                method,
                Call(
                    bytes_sent=moved(inputs),
                    bytes_received=moved(out),
                    wall_ns=t3 - t0,
                    transfer_ns=(t1 - t0) + (t3 - t2) if self.moves else 0,
                    compute_ns=t2 - t1,
                    serialize_ns=t1 - t0,
                    deserialize_ns=t3 - t2,
                ),
            )
        return results

    def to_device(self, t: Tensor) -> Tensor:
        if t.is_floating_point():
            t = t.to(self.engine.dtype)
        return t.to(self.engine.device, non_blocking=False) if self.moves else t

    def to_host(self, t: Tensor) -> Tensor:
        t = t.to("cpu") if self.moves else t
        return t.float()


def make_ops(settings) -> RemoteOps | LocalOps:
    """The ops object for `settings.backend` (a tee_client.settings.PrefillSettings)."""
    if settings.backend == "remote":
        return RemoteOps(settings.rpc_client())
    from gpu_server.checkpoint import load_checkpoint
    from gpu_server.engine import Engine
    from protocol.wire import TORCH_DTYPES

    device = torch.device("cpu") if settings.backend == "tee-only" else settings.device
    return LocalOps(Engine(load_checkpoint(settings.model_path, TORCH_DTYPES[settings.dtype], device)))
