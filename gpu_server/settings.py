"""Settings read from `LLAMA_*` environment variables; command-line flags override them.

`ModelSettings` is shared: gpu-server uses it, and so does tee-client when it runs the
model in-process (`--backend passthrough|tee-only`).
"""

from typing import Literal

import torch
from pydantic import Field, PositiveFloat, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.endpoints import default_endpoint

DTypeName = Literal["float32", "bfloat16", "float16"]


class LlamaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMA_", extra="ignore")

    @classmethod
    def from_args(cls, args) -> "LlamaSettings":
        """Environment first, then every flag the user actually gave (argparse default None)."""
        given = {k: v for k, v in vars(args).items() if v is not None and k in cls.model_fields}
        return cls(**given)


class ModelSettings(LlamaSettings):
    model_path: str | None = Field(
        None, description="HF checkpoint folder or .gguf file (default: embedded SmolLM2-135M)"
    )
    gpu_device: str | None = Field(None, description="cpu, cuda or cuda:N (default: cuda when available)")
    dtype: DTypeName = Field("float32", description="weights and wire dtype")

    @property
    def device(self) -> torch.device:
        return resolve_device(self.gpu_device)


class TransportSettings(LlamaSettings):
    """Where the server listens, and this process's CURVE key: the same facts on both sides."""

    gpu_endpoint: str = Field(default_factory=default_endpoint)
    curve_secret_key: str | None = Field(None, description="this process's .key_secret file: turns CURVE on")


class ServerSettings(ModelSettings, TransportSettings):
    max_message_mb: PositiveFloat = Field(1024, description="inbound messages above this are dropped")
    max_result_mb: PositiveFloat = Field(2048, description="requests whose result would be larger are refused")
    curve_authorized_keys: str | None = Field(None, description="folder of the client public keys admitted")

    @model_validator(mode="after")
    def curve_pair(self) -> "ServerSettings":
        return require_together(self, "curve_secret_key", "curve_authorized_keys")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    @property
    def max_result_bytes(self) -> int:
        return int(self.max_result_mb * 2**20)


def require_together(settings: LlamaSettings, *fields: str) -> LlamaSettings:
    given = [getattr(settings, f) is not None for f in fields]
    if any(given) and not all(given):
        raise ValueError("CURVE needs " + " and ".join("--" + f.replace("_", "-") for f in fields))
    return settings


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine has no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device
