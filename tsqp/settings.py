"""Settings read from `LLAMA_*` environment variables; command-line flags override them.

The pieces both sides use live here: the model (`ModelSettings`: gpu-server loads it, and so
does tee-client when it runs the model in-process), the transport (`TransportSettings`), and
the validators every CLI shares. Each side adds its own settings on top (gpu_server.settings,
tee_client.settings). torch is imported only when a device is resolved.
"""

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.endpoints import SHM_DIR, default_endpoint
from protocol.errors import UsageError, describe

DTypeName = Literal["float32", "bfloat16", "float16"]
MAX_TIMEOUT_S = 24 * 3600.0


def finite_timeout(seconds: float) -> float:
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
        raise ValueError(f"a timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    if seconds < 0.001:
        raise ValueError("a timeout under 1 ms cannot be waited for; give at least 0.001 s")
    return seconds


Timeout = Annotated[float, AfterValidator(finite_timeout)]  # every timeout of every CLI


class LlamaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMA_", extra="ignore")

    @classmethod
    def from_args(cls, args) -> "LlamaSettings":
        """Environment first, then every flag the user actually gave (argparse default None)."""
        given = {k: v for k, v in vars(args).items() if v is not None and k in cls.model_fields}
        try:
            return cls(**given)
        except ValidationError as e:
            raise UsageError(describe(e)) from None


class ModelSettings(LlamaSettings):
    model_path: str | None = Field(
        None, description="HF checkpoint folder or .gguf file (default: embedded SmolLM2-135M)"
    )
    gpu_device: str | None = Field(None, description="cpu, cuda or cuda:N (default: cuda when available)")
    dtype: DTypeName = Field("float32", description="weights and wire dtype")

    @property
    def device(self):
        return resolve_device(self.gpu_device)


class TransportSettings(LlamaSettings):
    """Where the server listens, this process's CURVE key, shared memory: the same facts on both sides."""

    gpu_endpoint: str = Field(default_factory=default_endpoint)
    curve_secret_key: str | None = Field(None, description="this process's .key_secret file: turns CURVE on")
    shm: bool = Field(True, description="tensors through shared memory over ipc:// (protocol.shm); off: frames")
    shm_dir: str = Field(SHM_DIR, description="where shared-memory regions are created and opened")

    @property
    def shared_memory(self) -> bool:
        """Whether this side uses shared memory: asked for, on an ipc endpoint, without CURVE (it encrypts frames)."""
        return self.shm and self.gpu_endpoint.startswith("ipc://") and self.curve_secret_key is None


def require_together(settings: LlamaSettings, *fields: str) -> LlamaSettings:
    given = [getattr(settings, f) is not None for f in fields]
    if any(given) and not all(given):
        raise ValueError("CURVE needs " + " and ".join("--" + f.replace("_", "-") for f in fields))
    return settings


def resolve_device(name: str | None):
    """The torch.device for `cpu`, `cuda` or `cuda:N`; None picks cuda when there is one."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device
