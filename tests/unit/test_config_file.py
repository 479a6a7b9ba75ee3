"""config/canaryd.yaml is the documented default settings file: it must load with the real
``Settings`` class, change nothing, name every field (no typos: unknown keys would be ignored
silently by the model) and carry a comment on every field."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from canaryd.core.spec import RolloutDefaults
from canaryd.settings import PrometheusSettings, Settings

CONFIG = Path(__file__).resolve().parents[2] / "config" / "canaryd.yaml"
# Fields left out of the file on purpose, each documented there in a comment.
COMMENTED_ONLY = {"identity"}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("CANARYD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOSTNAME", "canaryd-test-0")
    return monkeypatch


def _model_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _model_keys(ann, path + ".")
        else:
            keys.add(path)
    return keys


def _file_keys(data: dict[str, Any], nested: set[str], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, value in data.items():
        path = f"{prefix}{name}"
        if path in nested:
            assert isinstance(value, dict), f"{path} must be a mapping"
            keys |= _file_keys(value, nested, path + ".")
        else:
            keys.add(path)
    return keys


def test_file_loads_and_equals_defaults(clean_env: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    clean_env.setenv("CANARYD_CONFIG_FILE", str(CONFIG))
    loaded = Settings()
    assert loaded == defaults
    assert loaded.model_dump() == defaults.model_dump()


def test_file_names_every_field_and_nothing_else() -> None:
    data = yaml.safe_load(CONFIG.read_text())
    nested = {"defaults", "prometheus", "hooks"}
    in_file = _file_keys(data, nested)
    in_model = _model_keys(Settings)
    assert in_model - COMMENTED_ONLY - in_file == set(), "fields missing from config/canaryd.yaml"
    assert in_file - in_model == set(), "keys in config/canaryd.yaml that Settings does not know"
    assert in_file & COMMENTED_ONLY == set()
    # The nested models are the ones the file's sections mirror.
    assert Settings.model_fields["defaults"].annotation is RolloutDefaults
    assert Settings.model_fields["prometheus"].annotation is PrometheusSettings


def test_every_field_is_documented() -> None:
    lines = CONFIG.read_text().splitlines()
    key = re.compile(r"^(\s*)([a-z_]+):")
    for i, line in enumerate(lines):
        m = key.match(line)
        if not m:
            continue
        above = lines[i - 1].strip() if i else ""
        assert above.startswith("#"), f"line {i + 1} ({m.group(2)}) has no comment above it"
    text = CONFIG.read_text()
    for name in COMMENTED_ONLY:
        assert re.search(rf"^#\s*{name}:", text, re.M), f"{name} is not described in a comment"


def test_environment_wins_over_file_field_by_field(clean_env: pytest.MonkeyPatch) -> None:
    """The chart relies on this: the ConfigMap file plus a few CANARYD_* variables."""
    clean_env.setenv("CANARYD_CONFIG_FILE", str(CONFIG))
    clean_env.setenv("CANARYD_DEFAULTS__INTERVAL_S", "5")
    clean_env.setenv("CANARYD_PROMETHEUS__BEARER_TOKEN_FILE", "/var/run/secrets/prom/token")
    clean_env.setenv("CANARYD_NAMESPACES", '["shop","payments"]')
    clean_env.setenv("CANARYD_LEASE_NAMESPACE", "canaryd-system")
    s = Settings()
    assert s.defaults.interval_s == 5.0
    assert s.defaults.steps == RolloutDefaults().steps  # the rest of the section still from file
    assert s.prometheus.bearer_token_file == "/var/run/secrets/prom/token"
    assert s.prometheus.url == PrometheusSettings().url
    assert s.namespaces == ["shop", "payments"]
    assert s.lease_namespace == "canaryd-system"


def test_file_value_overrides_default(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = yaml.safe_load(CONFIG.read_text())
    data["defaults"]["interval_s"] = 30
    data["prometheus"]["url"] = "http://prom.example:9090"
    path = tmp_path / "canaryd.yaml"
    path.write_text(yaml.safe_dump(data))
    clean_env.setenv("CANARYD_CONFIG_FILE", str(path))
    s = Settings()
    assert s.defaults.interval_s == 30.0
    assert s.prometheus.url == "http://prom.example:9090"
