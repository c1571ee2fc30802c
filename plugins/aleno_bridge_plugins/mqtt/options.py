"""Options of the ``mqtt`` driver: validation only, no I/O (the guarantees, the topic
rule and the formats are described in :mod:`aleno_bridge_plugins.mqtt`)."""

from __future__ import annotations

import secrets
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from bridge.sinks.kit import PasswordOptions, TlsOptions

#: longest topic name MQTT accepts, in UTF-8 bytes
MAX_TOPIC_BYTES: Final = 65535


def _default_client_id() -> str:
    return f"aleno-bridge-{secrets.token_hex(4)}"


class MqttOptions(TlsOptions, PasswordOptions):
    """Options of an ``mqtt`` sink (everything under ``sinks.<name>`` but the common keys);
    ``username``/``password`` and the ``tls_*`` files come from the driver kit."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    host: str = Field(min_length=1, description="broker host name or IP address")
    port: int | None = Field(
        None, ge=1, le=65535, description="broker port (default 1883, or 8883 with tls)"
    )
    client_id: str = Field(
        default_factory=_default_client_id, min_length=1, max_length=65535,
        description="MQTT client identifier; unique per bridge (a broker disconnects the "
        "older of two clients with the same id); default aleno-bridge-<random>",
    )
    tls: bool = Field(False, description="connect with TLS")
    protocol: Literal["5", "3.1.1"] = "5"
    qos: Literal[0, 1, 2] = 1
    retain: bool = Field(
        False, description="retain the last message of every topic for new subscribers"
    )
    message_expiry_s: int | None = Field(
        None, ge=1, le=4_294_967_295,
        description="MQTT 5 message expiry interval: the broker discards a message (a "
        "retained price too) this many seconds after it was published",
    )
    session_expiry_s: int | None = Field(
        None, ge=0, le=4_294_967_295, description="MQTT 5 session expiry interval"
    )
    clean_start: bool = True
    keepalive_s: int = Field(15, ge=1, le=65535)
    max_inflight: int = Field(
        100, ge=1, le=65535, description="QoS 1/2 messages waiting for their ack at once"
    )
    connect_timeout_s: float = Field(10.0, gt=0)
    ack_timeout_s: float = Field(
        30.0, gt=0, description="longest wait for the acks of one batch (the sink's own "
        "bound; retry.publish_timeout_s usually fires first)",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_text(cls, v: Any) -> Any:
        # YAML reads `protocol: 5` as an int
        return str(v) if isinstance(v, int | float) else v

    @field_validator("host")
    @classmethod
    def _plain_host(cls, v: str) -> str:
        # the host goes into logs and /readyz: a "user:pw@host" would show the password.
        # The message never quotes the value.
        if "@" in v or "/" in v or any(c.isspace() for c in v) or v.count(":") == 1:
            msg = ("must be a host name or IP address only (no user:password@, no scheme, "
                   "no :port); put credentials in username/password and the port in port")
            raise ValueError(msg)
        return v

    @field_validator("message_expiry_s")
    @classmethod
    def _expiry_needs_v5(cls, v: int | None, info: ValidationInfo) -> int | None:
        # a field validator, not the model one: the error is reported at this option's
        # path (``sinks.<name>.message_expiry_s``); ``protocol`` is declared earlier,
        # so it has been validated already
        if v is not None and info.data.get("protocol") == "3.1.1":
            msg = ("needs protocol 5 (MQTT 3.1.1 has no message expiry); use protocol: '5' "
                   "or remove message_expiry_s")
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> MqttOptions:
        if self.tls_files and not self.tls:
            msg = f"{', '.join(self.tls_files)} given but tls is false; set tls: true"
            raise ValueError(msg)
        if self.protocol == "3.1.1" and self.session_expiry_s is not None:
            msg = "session_expiry_s needs protocol 5 (MQTT 3.1.1 has no session expiry)"
            raise ValueError(msg)
        if self.qos == 2 and not self.clean_start:
            # a fresh client per connection restarts packet ids at 1: a resumed session
            # still holding an unfinished QoS 2 flow with the same id would make the
            # broker drop the new message as a duplicate
            msg = "qos 2 needs clean_start: true (the sink does not resume QoS 2 flows)"
            raise ValueError(msg)
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls else 1883

    @property
    def address(self) -> str:
        return f"{self.host}:{self.effective_port}"

