"""Ops: where the linear half of the model runs, behind one small interface.

    remote       gpu-server over ZeroMQ (the product)
    passthrough  in this process on --device, tensors moved with .to() (Intel TDX with a
                 passthrough GPU: the GPU is reachable directly, no IPC)
    tee-only     in this process on the CPU: the all-in-TEE security baseline

`Ops` is the one place of the precision policy: floating tensors cross in the model's dtype
(`wire_dtype`, learnt at Init) and come back as float32, what the trusted side computes in;
integer tensors cross as they are. A backend only moves tensors (`send`), the same bytes out
and back, and records one `Call` per op, so every backend's result has the same breakdown.
Privacy modes mask in float32 or integers before `call`, so before any cast.
"""

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from protocol.errors import BadReply
from tee_client.stats import Call, current
from tsqp.methods import reply_layout
from tsqp.spec import ModelSpec


class Ops:
    wire_dtype: torch.dtype | None = None  # None until Init: nothing floating crosses before it
    fingerprint: str | None = None  # the model Init reported; every later request carries it
    config = None  # its config (from Init): what every reply must hold follows from it
    verifier = None  # --verify: a tee_client.verify.Verifier checks every reply, as it crossed
    fuses_residuals = True  # whether `residual` may be used (a privacy mode masks each matmul on its own)

    def send(self, method: str, args: dict, tensors: list[Tensor], borrow: bool = False) -> tuple[dict, list[Tensor]]:
        """borrow: the reply's tensors may stay where they crossed, valid until the next call (RemoteOps)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def transport(self) -> str | None:
        """How tensors reach the linear ops: "shm" or "frames" (remote), None in-process; a wrapper asks its inner."""
        inner = getattr(self, "inner", None)
        return inner.transport() if inner is not None else None

    def prepare(self, rows: int, head_rows: int | None = None) -> None:
        """The offline phase before a forward of `rows` tokens whose LMHead gets `head_rows` of them (default: all;
        one per sequence with --logits last and in generation): a privacy mode draws its pads here."""
        if self.verifier is not None:
            self.verifier.prepare()  # --verify: the next forward's secret r and Wᵀ·r, drawn ahead

    def request_buffer(self, shape) -> Tensor | None:
        """Where the next call's float32 input may be computed so that it crosses with no copy (RemoteOps over shared
        memory), or None: compute it anywhere. Not with --verify: what its check reads must lie in private memory
        (the server can write the region at any moment), nor when floats cross in another dtype (a cast copies)."""
        return None

    def init(self) -> ModelSpec:
        spec = ModelSpec.from_init(*self.send("Init", {}, []))
        self.wire_dtype, self.fingerprint, self.config = spec.dtype, spec.fingerprint, spec.config
        if self.verifier is not None:
            self.verifier.expect(spec)
        return spec

    def call(
        self, method: str, args: dict, tensors: Sequence[Tensor], normed: bool = False, borrow: bool = False
    ) -> list[Tensor]:
        """`normed`: the input's rows are the output of the RMSNorm in front of the modules called, which lets
        --verify bound their norms without a pass over them. `borrow`: the caller is done with the reply before its
        next call, so over shared memory it may read the reply where the server wrote it instead of a copy; not
        with --verify, whose check must see exactly what the model then uses (the server could rewrite it)."""
        sent = [t.to(self.wire_dtype) if t.is_floating_point() else t for t in tensors]
        # --verify: what its check needs of the request alone is done before the send, while that is in cache
        verify = self.verifier.timed_begin(method, args, sent, normed) if self.verifier is not None else None
        received = self.send(method, args, sent, borrow and verify is None)[1]
        if self.config is not None:  # after Init: a reply holds what its request asks for, or the run stops here
            check_reply(self.config, self.wire_dtype, method, args, sent, received)
        if verify is not None:
            verify(received)
        return [t.float() if t.is_floating_point() else t for t in received]

    # ---- the model's linear steps -------------------------------------------------------------

    def embedding(self, input_ids: Tensor) -> Tensor:
        return self.call("Embedding", {}, [input_ids])[0]

    def linear(self, layer: int, names: Sequence[str], x: Tensor, normed: bool = False) -> list[Tensor]:
        """x·Wᵀ (+ b) for each module; normed: x is the output of the RMSNorm in front of them (see call)."""
        return self.call("Linear", {"layer": layer, "names": list(names)}, [x], normed)

    def matmul(self, a: Tensor, b: Tensor, transpose_b: bool = False) -> Tensor:
        return self.call("Matmul", {"transpose_b": transpose_b}, [a, b])[0]

    def lm_head(self, x: Tensor, normed: bool = False) -> Tensor:
        return self.call("LMHead", {}, [x], normed)[0]

    def residual(
        self, layer: int, out: str, names: Sequence[str], a: Tensor, x: Tensor, borrow: bool = False
    ) -> list[Tensor]:
        """[h = x + a·W_outᵀ, then (h ⊙ w_norm)·Wᵀ for each next module] (tsqp.engine.Engine.residual); borrow:
        see `call`."""
        return self.call("Residual", {"layer": layer, "out": out, "names": list(names)}, [a, x], borrow=borrow)


class RemoteOps(Ops):
    def __init__(self, rpc):
        self.rpc = rpc

    def send(self, method: str, args: dict, tensors: list[Tensor], borrow: bool = False) -> tuple[dict, list[Tensor]]:
        return self.rpc.call(method, args, tensors, fingerprint=self.fingerprint, borrow=borrow)

    def request_buffer(self, shape) -> Tensor | None:
        if self.verifier is not None or self.wire_dtype != torch.float32:
            return None
        return self.rpc.reserve(shape, torch.float32)

    def transport(self) -> str:
        return "shm" if self.rpc.region is not None else "frames"

    def close(self) -> None:
        self.rpc.close()


class LocalOps(Ops):
    def __init__(self, engine):
        self.engine = engine
        self.moves = engine.device.type != "cpu"  # tee-only moves nothing: its transfer is zero

    def send(self, method: str, args: dict, tensors: list[Tensor], borrow: bool = False) -> tuple[dict, list[Tensor]]:
        from tsqp.methods import dispatch  # every result is a new tensor: nothing to borrow

        t0 = time.perf_counter_ns()
        inputs = [t.to(self.engine.device) for t in tensors] if self.moves else tensors
        t1 = time.perf_counter_ns()
        result, out, compute_ns = dispatch(self.engine, method, args, inputs)
        t2 = time.perf_counter_ns()
        outputs = [t.to("cpu") for t in out] if self.moves else out
        t3 = time.perf_counter_ns()
        if (stats := current()) is not None:
            moved = sum(t.nbytes for t in inputs) if self.moves else 0, sum(t.nbytes for t in out) if self.moves else 0
            stats.record(
                method,
                Call(
                    bytes_sent=moved[0],
                    bytes_received=moved[1],
                    wall_ns=t3 - t0,
                    transfer_ns=(t1 - t0) + (t3 - t2) if self.moves else 0,
                    compute_ns=compute_ns,
                    serialize_ns=t1 - t0,
                    deserialize_ns=t3 - t2,
                ),
            )
        return result, outputs


def check_reply(config, wire_dtype, method: str, args: dict, sent: list[Tensor], received: list[Tensor]) -> None:
    """The tensors a reply holds must be exactly those its request asks for (tsqp.methods.reply_layout): a broken or
    hostile server stops the run with one line (BadReply), not with a crash deep in the model."""
    layout = reply_layout(config, method, args, sent, wire_dtype)
    if layout is None:
        return
    shapes, dtype = layout
    if [tuple(t.shape) for t in received] != shapes or any(t.dtype != dtype for t in received):
        got = ", ".join(described(t.dtype, t.shape) for t in received) or "nothing"
        wanted = ", ".join(described(dtype, shape) for shape in shapes)
        raise BadReply(f"{method}: the server replied {got}, where the request asks for {wanted}")


def described(dtype: torch.dtype, shape) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


def make_ops(settings) -> Ops:
    """The ops object for `settings.backend` and `settings.privacy` (a tee_client.settings.PrefillSettings).

    tee-only ignores the privacy mode and --verify: nothing leaves the process. The others, in a
    privacy mode or with --verify, load the client's own copy of the model (on the CPU): PrivateOps
    wraps their ops, and a Verifier checks every reply at the wire, masked or not.
    """
    from protocol.wire import TORCH_DTYPES
    from tsqp.checkpoint import load_checkpoint

    dtype = TORCH_DTYPES[settings.dtype]
    private = settings.privacy != "plain" and settings.backend != "tee-only"
    verify = settings.verify and settings.backend != "tee-only"
    own = load_checkpoint(settings.model_path, dtype, torch.device("cpu")) if private or verify else None
    if settings.backend == "remote":
        ops = RemoteOps(settings.rpc_client())
    else:
        from tsqp.engine import Engine

        device = torch.device("cpu") if settings.backend == "tee-only" else settings.device
        ckpt = own if own is not None and device.type == "cpu" else load_checkpoint(settings.model_path, dtype, device)
        ops = LocalOps(Engine(ckpt))
    if verify:
        from tee_client.verify import Verifier
        from tsqp.engine import Engine

        ops.verifier = Verifier(Engine(own))
    if not private:
        return ops
    from tee_client.privacy import PrivateOps

    return PrivateOps(ops, own, settings.privacy, settings.mix_block)
