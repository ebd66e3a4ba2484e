"""tee-client settings: `LLAMA_*` environment variables, overridden by flags."""

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from gpu_server.settings import LlamaSettings, ModelSettings
from protocol.endpoints import default_endpoint


class ClientSettings(LlamaSettings):
    gpu_endpoint: str = Field(default_factory=default_endpoint)
    rpc_timeout: PositiveFloat = Field(30.0, description="seconds to wait for one reply")
    rpc_retries: int = Field(2, ge=0, description="resends over a fresh socket before giving up")


class PrefillSettings(ClientSettings, ModelSettings):
    backend: Literal["remote", "passthrough", "tee-only"] = "remote"
    prefill_length: PositiveInt = 128
    tee_batch_size: PositiveInt = 1
    prompt: list[str] | None = None
    prompt_path: str | None = None
    tee_result_path: str | None = None
    save_logits: str | None = None
    warmup: int = Field(1, ge=0)
    repeat: PositiveInt = 1
