"""gpu-server settings: the shared model and transport settings, plus the server's own."""

from typing import Literal

from pydantic import Field, PositiveFloat, model_validator

from tsqp.settings import ModelSettings, TransportSettings, require_together

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ServerSettings(ModelSettings, TransportSettings):
    max_message_mb: PositiveFloat = Field(1024, description="inbound messages above this are dropped")
    max_result_mb: PositiveFloat = Field(2048, description="requests whose result would be larger are refused")
    curve_authorized_keys: str | None = Field(None, description="folder of the client public keys admitted")
    log_level: LogLevel = Field("INFO", description="the server log's level")
    record_dir: str | None = Field(None, description="save every request's tensors here (audits, tests)")
    inject_fault: str | None = Field(None, description="METHOD:N[:shape|:slow], tests only: reply N of METHOD is wrong")

    @model_validator(mode="after")
    def curve_pair(self) -> "ServerSettings":
        return require_together(self, "curve_secret_key", "curve_authorized_keys")

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    @property
    def max_result_bytes(self) -> int:
        return int(self.max_result_mb * 2**20)
