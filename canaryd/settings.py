"""Daemon settings: environment (``CANARYD_*``), an optional YAML file, then defaults.

Cluster-wide rollout defaults are ``canaryd.core.spec.RolloutDefaults``; a route's annotations override them.
The file named by ``CANARYD_CONFIG_FILE`` (see ``config/canaryd.yaml``) is read first and the
environment wins over it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from canaryd.core.shards import MAX_SHARDS
from canaryd.core.spec import RolloutDefaults
from canaryd.hooks.config import HooksSettings


class PrometheusSettings(BaseModel):
    url: str = "http://prometheus-server.monitoring:9090"
    bearer_token_file: str | None = None
    bearer_token: str | None = None
    basic_auth_user: str | None = None
    basic_auth_password_file: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = 10.0
    max_concurrency: int = 4
    envoy_cluster_pattern: str = "^{namespace}[/_]{parent}[/_]{namespace}[:_]{service}[:_]{port}$"
    """Regex matched against ``envoy_cluster_name``; ``{namespace}``/``{service}``/``{port}``/``{parent}``
    are substituted (escaped). Cilium names GAMMA clusters ``<ns>/<parent>/<ns>:<svc>:<port>`` (``_`` for
    ``:`` in stats); pinned to the GAMMA parent so the same backend under a north-south Gateway
    (``<ns>/cilium-gateway-<gw>/...``) or an ext_authz cluster is not counted."""
    envoy_cluster_label: str = "envoy_cluster_name"
    custom_templates_file: str | None = None
    batch_window_s: float = 0.05
    """How long the analyzer waits to coalesce concurrent analyses into one query per metric."""
    batch_max_targets: int = 2000
    """Most routes in one batched query (keeps the regex union, and the URL, bounded)."""
    answer_ttl_s: float = 1.0
    """Seconds a batched answer (envoy, dapr) is shared: a later batch with the same window whose
    namespaces (envoy) or app-ids (dapr) it covers reuses it, in flight or answered, instead of
    querying again. Capped at a tenth of the window; 0 = every batch queries."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CANARYD_", env_nested_delimiter="__", extra="ignore")

    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to watch; empty = all namespaces."""
    label_selector: str | None = None
    max_concurrent_rollouts: int = 1000
    leader_election: bool = True
    lease_name: str = "canaryd-leader"
    lease_namespace: str = "default"
    lease_duration_s: float = 15.0
    lease_renew_s: float = 5.0
    shards: int = Field(default=1, ge=1, le=MAX_SHARDS)
    """Split the routes into this many shards, each driven by whoever holds its Lease
    (``<lease_name>-shard-<i>``; with 1, the one Lease ``lease_name``). Every replica must use the
    same number (docs/architecture.md, "Shards")."""
    identity: str = Field(default_factory=lambda: os.environ.get("HOSTNAME", "") or f"canaryd-{os.getpid()}")
    http_port: int = 8080
    http_host: str = "0.0.0.0"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    kubeconfig: str | None = None
    context: str | None = None
    field_manager: str = "canaryd"
    defaults: RolloutDefaults = Field(default_factory=RolloutDefaults)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    hooks: HooksSettings = Field(default_factory=HooksSettings)
    """Named hooks (gates and triggers) and notifiers routes may opt into by name (docs/hooks.md)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlFileSource(settings_cls))


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads ``CANARYD_CONFIG_FILE`` (YAML) when set."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("CANARYD_CONFIG_FILE")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return data
