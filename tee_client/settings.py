"""tee-client settings: `LLAMA_*` environment variables, overridden by flags."""

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from tsqp.settings import ModelSettings, Timeout, TransportSettings, require_together


class ClientSettings(TransportSettings):
    rpc_timeout: Timeout = Field(30.0, description="seconds to wait for one reply")
    rpc_retries: int = Field(2, ge=0, le=100, description="resends over a fresh socket before giving up")
    curve_server_key: str | None = Field(None, description="the server's public .key file")
    model_fingerprint: str | None = Field(None, min_length=12, description="refuse a server holding another model")

    @model_validator(mode="after")
    def curve_pair(self) -> "ClientSettings":
        return require_together(self, "curve_secret_key", "curve_server_key")

    def rpc_client(self, timeout_s: float | None = None, retries: int | None = None, shm: bool | None = None):
        from protocol.security import client_keys
        from tee_client.rpc import RpcClient

        keys = client_keys(self.curve_secret_key, self.curve_server_key) if self.curve_secret_key else None
        return RpcClient(
            self.gpu_endpoint,
            self.rpc_timeout if timeout_s is None else timeout_s,
            self.rpc_retries if retries is None else retries,
            curve_keys=keys,
            shm=self.shm if shm is None else shm,
            shm_dir=self.shm_dir,
        )


Backend = Literal["remote", "passthrough", "tee-only"]
Privacy = Literal["plain", "otp", "mix"]
Attention = Literal["tee", "server"]


class RunSettings(ClientSettings, ModelSettings):
    """What prefill and generate share: the prompts, where the linear ops run, privacy, verify, the output."""

    backend: Backend = "remote"
    privacy: Privacy = "plain"
    verify: bool = False
    attention: Attention = "tee"  # where a prefill's attention runs: here, or as two Matmul calls (plain only)
    mix_block: int = Field(16, ge=2, le=4096, description="tokens mixed together in the mix privacy mode")
    tee_batch_size: PositiveInt | None = None  # default: one row per prompt
    prompt: list[str] | None = None
    prompt_path: str | None = None
    tee_result_path: str | None = None

    @model_validator(mode="after")
    def attention_private(self) -> "RunSettings":
        if self.attention == "server" and self.privacy != "plain":
            raise ValueError(
                f"--attention server sends queries, keys, values, attention scores and probabilities to the GPU host: "
                f"--privacy {self.privacy} keeps attention here (use --attention tee, the default)"
            )
        return self


class PrefillSettings(RunSettings):
    prefill_length: PositiveInt = 128
    save_logits: str | None = None
    logits: Literal["last", "all"] | None = None  # None: last, or all when save_logits asks for them
    warmup: int = Field(1, ge=0)
    repeat: PositiveInt = 1

    @property
    def logits_kept(self) -> str:
        """Which logits LMHead is asked for: --logits, else all when --save-logits writes them, else last."""
        return self.logits or ("all" if self.save_logits else "last")


class GenerateSettings(RunSettings):
    max_new_tokens: PositiveInt = 64
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of tokens this likely")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0: all")
    seed: int | None = Field(None, ge=0, lt=2**63, description="sampling seed (default: drawn and reported)")
    ignore_eos: bool = False
