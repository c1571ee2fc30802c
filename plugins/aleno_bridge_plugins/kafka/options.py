"""Options of the ``kafka`` driver and Kafka's topic rule: validation only, no I/O
(the guarantees and the formats are described in :mod:`aleno_bridge_plugins.kafka`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, SecretStr, field_validator, model_validator

from bridge.sinks import SinkOptions
from bridge.sinks.kit import host_ports, split_list, topic_problem

#: longest topic name Kafka accepts
MAX_TOPIC_LENGTH: Final = 249
#: default ``max_batch_bytes``: one core batch (500 envelopes of ~0.6 KiB with their
#: headers) fits in one produce batch per partition. aiokafka keeps one open batch per
#: partition and a full one (``send()``) or the next one (``send_batch``) waits until it
#: has been delivered, so with aiokafka's own 16 KiB a 500-record publish took ~5 broker
#: round trips per partition, each paying for turns of a busy event loop
#: (docs/drivers/kafka.md, "Throughput")
DEFAULT_BATCH_BYTES: Final = 524_288

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]")

#: codec -> (its availability check in ``aiokafka.codec``, pip extra that installs the
#: library)
_CODECS: Final = {
    "lz4": ("has_lz4", "aiokafka[lz4]"),
    "zstd": ("has_zstd", "aiokafka[zstd]"),
    "snappy": ("has_snappy", "aiokafka[snappy]"),
}


def safe_token(value: str) -> str:
    """Replace every character Kafka forbids in a topic name with ``_``."""
    return _UNSAFE.sub("_", value)


def check_topic(topic: str) -> str | None:
    """Why Kafka can never accept ``topic``, or ``None``."""
    if topic in (".", ".."):
        return f"Kafka does not allow the topic name {topic!r}"
    return topic_problem(topic, bus="Kafka", max_chars=MAX_TOPIC_LENGTH,
                         control_chars=True, forbidden=_UNSAFE,
                         allowed="A-Z a-z 0-9 . _ -")


def _codec_installed(check: str) -> bool:
    """``aiokafka.codec.<check>()``: the client library is loaded only to check a codec."""
    from aiokafka import codec

    return bool(getattr(codec, check)())


class KafkaOptions(SinkOptions):
    """Options of the ``kafka`` driver (see docs/drivers/kafka.md for the table)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    bootstrap_servers: list[str] = Field(
        description="host:port of one or more brokers (a list or a comma-separated string)"
    )
    client_id: str = "aleno-bridge"
    acks: Literal["all", 0, 1] = "all"
    enable_idempotence: bool = Field(
        False,
        description="idempotent producer; needs broker support (not Tansu's memory store)",
    )
    compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "none"
    linger_ms: int = Field(0, ge=0, description="producer-side wait to fill batches")
    max_batch_bytes: int = Field(
        DEFAULT_BATCH_BYTES, ge=1024,
        description="bytes of records per partition batch (default: one worker batch)",
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="largest record accepted; larger ones are rejected"
    )
    request_timeout_ms: int = Field(10_000, ge=100)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    create_topics: list[str] | bool = Field(
        False,
        description="topics to create at connect, or true: every topic before its first record",
    )
    partitions: int = Field(1, ge=1, description="partitions of the topics this sink creates")
    replication_factor: int = Field(
        1, ge=1, description="replication factor of the topics this sink creates"
    )
    topic_config: dict[str, str] = Field(
        default_factory=dict,
        description="topic-level configs of the topics this sink creates "
        "(cleanup.policy, retention.ms, min.compaction.lag.ms...)",
    )
    compact: bool = Field(
        False,
        description="create topics with cleanup.policy=compact: the topic keeps the last "
        "record per key (the route's key, the symbol by default), a table of prices",
    )

    _split_servers = field_validator("bootstrap_servers", mode="before")(split_list)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        return host_ports(v, "broker")

    @field_validator("acks", mode="before")
    @classmethod
    def _acks(cls, v: Any) -> Any:
        # YAML and ${VAR} interpolation give "1", "-1" or -1 as often as 1 or "all"
        if v in (-1, "-1"):
            return "all"
        if isinstance(v, str) and v.strip() in ("0", "1"):
            return int(v)
        return v

    @field_validator("compression")
    @classmethod
    def _codec_installed(cls, v: str) -> str:
        codec = _CODECS.get(v)
        if codec is not None and not _codec_installed(codec[0]):
            msg = (
                f"compression {v!r} needs its codec library, which is not installed: "
                f"pip install '{codec[1]}'"
            )
            raise ValueError(msg)
        return v

    @field_validator("create_topics")
    @classmethod
    def _topic_names(cls, v: list[str] | bool) -> list[str] | bool:
        if isinstance(v, list):
            for topic in v:
                problem = check_topic(topic)
                if problem is not None:
                    msg = f"{topic!r}: {problem}"
                    raise ValueError(msg)
        return v

    @field_validator("topic_config", mode="before")
    @classmethod
    def _config_values_as_text(cls, v: Any) -> Any:
        # Kafka configs are strings on the wire; YAML gives `retention.ms: 60000` as an
        # int and `preallocate: true` as a bool: take them as Kafka writes them
        if isinstance(v, dict):
            return {k: (str(x).lower() if isinstance(x, bool)
                        else str(x) if isinstance(x, int | float) else x)
                    for k, x in v.items()}
        return v

    @field_validator("topic_config")
    @classmethod
    def _config_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name.strip() or name != name.strip():
                msg = f"{name!r} is not a Kafka config name (like cleanup.policy)"
                raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _coherent(self) -> KafkaOptions:
        sasl = self.security_protocol.startswith("SASL_")
        given = [
            n for n in ("sasl_mechanism", "sasl_username", "sasl_password")
            if getattr(self, n) is not None
        ]
        if sasl and len(given) < 3:
            missing = sorted({"sasl_mechanism", "sasl_username", "sasl_password"} - set(given))
            msg = f"security_protocol {self.security_protocol} needs {', '.join(missing)}"
            raise ValueError(msg)
        if not sasl and given:
            msg = (
                f"{', '.join(given)} given but security_protocol is {self.security_protocol}; "
                "use SASL_PLAINTEXT or SASL_SSL"
            )
            raise ValueError(msg)
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        files = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, n)]
        if files and not tls:
            msg = (
                f"{', '.join(files)} given but security_protocol is {self.security_protocol}; "
                "use SSL or SASL_SSL"
            )
            raise ValueError(msg)
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            msg = "ssl_certfile and ssl_keyfile go together (client certificate and its key)"
            raise ValueError(msg)
        if self.enable_idempotence and self.acks != "all":
            msg = f"enable_idempotence needs acks 'all' (got {self.acks!r})"
            raise ValueError(msg)
        shaping = [n for n in ("topic_config", "compact") if n in self.model_fields_set
                   and getattr(self, n)]
        if shaping and not self.create_topics:
            msg = (f"{' and '.join(shaping)} apply only to topics this sink creates; set "
                   "create_topics (a list of topics, or true)")
            raise ValueError(msg)
        policy = self.topic_config.get("cleanup.policy")
        if self.compact and policy is not None and "compact" not in policy.split(","):
            msg = (f"compact: true but topic_config sets cleanup.policy {policy!r}; remove "
                   "one of them (or use cleanup.policy: compact,delete)")
            raise ValueError(msg)
        return self

    @property
    def topic_configs(self) -> dict[str, str]:
        """The configs a created topic gets: ``topic_config``, plus
        ``cleanup.policy=compact`` for ``compact: true``."""
        configs = dict(self.topic_config)
        if self.compact:
            configs.setdefault("cleanup.policy", "compact")
        return configs
