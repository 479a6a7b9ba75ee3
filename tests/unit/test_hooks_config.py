"""Hook and notifier settings, the routes' opt-in annotations, and the payload shape (all pure)."""

from __future__ import annotations

import inspect
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from canaryd.core.errors import SpecError
from canaryd.core.state import Phase, RolloutState
from canaryd.hooks import (
    HOOK_KINDS,
    HOOKS_ANNOTATION,
    NOTIFY_ANNOTATION,
    HookResult,
    HookRunner,
    HooksSettings,
    Notifier,
    build_payload,
    hooks_for,
    notifiers_for,
    parse_route_hooks,
    parse_route_notify,
    payload_from_state,
    rollout_id,
    slack_message,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "hook-payload-schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
SLACK_VALIDATOR = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/slackMessage"})
NOW = datetime(2026, 12, 1, 10, 2, tzinfo=UTC)


def settings(**extra: Any) -> HooksSettings:
    return HooksSettings.model_validate(
        {
            "hooks": {
                "smoke-test": {"url": "https://smoke.tools.svc/check", "kinds": ["confirm-step", "confirm-promotion"]},
                "load": {"url": "http://loadgen.tools:8080/start", "kinds": ["pre-rollout", "step"], "method": "GET"},
            },
            "notifiers": {
                "team-a": {"type": "slack", "url_from_file": "/var/run/secrets/slack/url", "phases": ["Promoted"]},
                "audit": {"url": "https://audit.internal/canaryd"},
            },
            "default_notifiers": ["audit"],
            **extra,
        }
    )


def hook(**fields: Any) -> dict[str, Any]:
    return {"hooks": {"h": {"url": "https://h.example/x", "kinds": ["step"], **fields}}}


def notifier(**fields: Any) -> dict[str, Any]:
    return {"notifiers": {"n": fields}}


# --- settings -------------------------------------------------------------------------------------


def test_defaults_are_empty_and_hook_defaults_are_documented() -> None:
    s = HooksSettings()
    assert (s.hooks, s.notifiers, s.default_notifiers) == ({}, {}, [])
    h = HooksSettings.model_validate(hook()).hooks["h"]
    assert (h.method, h.timeout_s, h.retries, h.headers, h.headers_from_files) == ("POST", 10.0, 2, {}, {})
    n = HooksSettings.model_validate(notifier(url="https://n.example/")).notifiers["n"]
    assert (n.type, n.timeout_s, n.phases) == ("webhook", 10.0, list(Phase))


class _EmbeddingSettings(BaseSettings):
    """How canaryd.settings.Settings embeds it (same prefix and delimiter)."""

    model_config = SettingsConfigDict(env_prefix="CANARYD_", env_nested_delimiter="__", extra="ignore")
    hooks: HooksSettings = HooksSettings()


def test_embeds_in_settings_from_env_and_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _EmbeddingSettings().hooks == HooksSettings()
    monkeypatch.setenv("CANARYD_HOOKS__HOOKS", json.dumps({"smoke": {"url": "http://s.t/", "kinds": ["step"]}}))
    monkeypatch.setenv("CANARYD_HOOKS__DEFAULT_NOTIFIERS", "[]")
    assert _EmbeddingSettings().hooks.hooks["smoke"].url == "http://s.t/"
    monkeypatch.delenv("CANARYD_HOOKS__HOOKS")
    loaded = _EmbeddingSettings.model_validate(yaml.safe_load("hooks:\n  default_notifiers: []\n"))
    assert loaded.hooks == HooksSettings()


def _doc_yaml_blocks() -> list[Any]:
    text = (ROOT / "docs" / "hooks.md").read_text()
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_docs_examples_are_valid_settings() -> None:
    """Every YAML block of docs/hooks.md with a top-level ``hooks:`` mapping of settings validates."""
    checked = 0
    for doc in _doc_yaml_blocks():
        if isinstance(doc, dict) and isinstance(doc.get("hooks"), dict) and "hooks" in doc["hooks"]:
            HooksSettings.model_validate(doc["hooks"])
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h.example/x",
        "file:///etc/passwd",
        "gopher://h.example/",
        "javascript:alert(1)",
        "h.example/x",
        "http:///x",
        "https://user:pw@h.example/x",
        "https://h.example/x#frag",
        "http://h.example:99999/",
        "http://h.example/a b",
        "",
    ],
)
def test_hook_url_must_be_plain_http_or_https(url: str) -> None:
    with pytest.raises(ValidationError):
        HooksSettings.model_validate(hook(url=url))


@pytest.mark.parametrize("url", ["http://h.example/x", "https://h.example:8443/x?y=1", "http://10.0.0.7/"])
def test_hook_url_accepted(url: str) -> None:
    assert HooksSettings.model_validate(hook(url=url)).hooks["h"].url == url


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("method", "GET", True),
        ("method", "POST", True),
        ("method", "PUT", False),
        ("method", "DELETE", False),
        ("timeout_s", 0.1, True),
        ("timeout_s", 300, True),
        ("timeout_s", 0.09, False),
        ("timeout_s", 301, False),
        ("retries", 0, True),
        ("retries", 10, True),
        ("retries", -1, False),
        ("retries", 11, False),
        ("kinds", list(HOOK_KINDS), True),
        ("kinds", [], False),
        ("kinds", ["deploy"], False),
        ("headers", {"X-Team": "a"}, True),
        ("headers", {"Content-Type": "text/plain"}, False),
        ("headers", {"Idempotency-Key": "x"}, False),
        ("headers", {"X-Bad": "a\r\nX-Injected: 1"}, False),
        ("headers", {"Bad Name": "a"}, False),
        ("headers_from_files", {"Authorization": "/var/run/secrets/hook/token"}, True),
        ("headers_from_files", {"Authorization": " "}, False),
        ("timeout", 5, False),  # a typo is an error, not silently ignored
    ],
)
def test_hook_fields(field: str, value: Any, ok: bool) -> None:
    data = hook(**{field: value})
    if ok:
        HooksSettings.model_validate(data)
    else:
        with pytest.raises(ValidationError):
            HooksSettings.model_validate(data)


def test_kinds_are_required() -> None:
    with pytest.raises(ValidationError, match="kinds"):
        HooksSettings.model_validate({"hooks": {"h": {"url": "https://h.example/"}}})


def test_header_inline_and_from_file_conflict() -> None:
    with pytest.raises(ValidationError, match="both inline and from a file"):
        HooksSettings.model_validate(hook(headers={"X-Token": "a"}, headers_from_files={"x-token": "/f"}))


@pytest.mark.parametrize(
    ("fields", "ok"),
    [
        ({"url": "https://n.example/"}, True),
        ({"url_from_file": "/secret/url"}, True),
        ({"type": "slack", "url": "https://hooks.slack.example/services/x"}, True),
        ({"type": "teams", "url": "https://n.example/"}, False),
        ({}, False),
        ({"url": "https://n.example/", "url_from_file": "/secret/url"}, False),
        ({"url": "ftp://n.example/"}, False),
        ({"url": "https://n.example/", "phases": ["Promoted", "RolledBack", "Failed"]}, True),
        ({"url": "https://n.example/", "phases": ["Deployed"]}, False),
        ({"url": "https://n.example/", "phases": []}, False),
        ({"url": "https://n.example/", "timeout_s": 0}, False),
    ],
)
def test_notifier_fields(fields: dict[str, Any], ok: bool) -> None:
    if ok:
        HooksSettings.model_validate(notifier(**fields))
    else:
        with pytest.raises(ValidationError):
            HooksSettings.model_validate(notifier(**fields))


def test_names_and_default_notifiers() -> None:
    with pytest.raises(ValidationError, match="DNS label"):
        HooksSettings.model_validate({"hooks": {"Smoke_Test": {"url": "https://h.example/", "kinds": ["step"]}}})
    with pytest.raises(ValidationError, match="reserved"):
        HooksSettings.model_validate({"notifiers": {"none": {"url": "https://n.example/"}}})
    with pytest.raises(ValidationError, match=r"default_notifiers names unknown notifier\(s\) 'team-b'"):
        HooksSettings.model_validate({"default_notifiers": ["team-b"]})


# --- the routes' annotations ----------------------------------------------------------------------


def test_parse_route_hooks() -> None:
    s = settings()
    assert parse_route_hooks({}, s) == []
    assert parse_route_hooks({HOOKS_ANNOTATION: ""}, s) == []
    assert parse_route_hooks({HOOKS_ANNOTATION: "smoke-test,load"}, s) == ["smoke-test", "load"]
    assert parse_route_hooks({HOOKS_ANNOTATION: " load , smoke-test,load,"}, s) == ["load", "smoke-test"]


def test_unknown_hook_names_the_annotation_and_the_known_hooks() -> None:
    with pytest.raises(SpecError) as e:
        parse_route_hooks({HOOKS_ANNOTATION: "smoke-test,lod"}, settings())
    assert e.value.annotation == HOOKS_ANNOTATION
    assert "unknown hook 'lod'" in e.value.message
    assert "load, smoke-test" in e.value.message
    assert str(e.value).startswith("canaryd.io/hooks: ")
    with pytest.raises(SpecError, match="none configured"):
        parse_route_hooks({HOOKS_ANNOTATION: "smoke-test"}, HooksSettings())


def test_parse_route_notify() -> None:
    s = settings()
    assert parse_route_notify({}, s) is None
    assert parse_route_notify({NOTIFY_ANNOTATION: "none"}, s) == []
    assert parse_route_notify({NOTIFY_ANNOTATION: " none "}, s) == []
    assert parse_route_notify({NOTIFY_ANNOTATION: "team-a"}, s) == ["team-a"]
    assert parse_route_notify({NOTIFY_ANNOTATION: "team-a,audit,team-a"}, s) == ["team-a", "audit"]


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("team-b", r"unknown notifier 'team-b'; configured notifiers: audit, team-a"),
        ("", r"empty; name notifiers, write none to opt out"),
        ("none,team-a", r"none opts out and cannot be combined"),
    ],
)
def test_bad_notify_annotation(value: str, expect: str) -> None:
    with pytest.raises(SpecError, match=expect) as e:
        parse_route_notify({NOTIFY_ANNOTATION: value}, settings())
    assert e.value.annotation == NOTIFY_ANNOTATION


@pytest.mark.parametrize(
    "value",
    [
        "https://evil.example/exfil",
        "http://169.254.169.254/latest/meta-data",
        "smoke-test,http://127.0.0.1:6443/",
        "//evil.example",
        "evil.example:80",
    ],
)
def test_routes_cannot_give_urls(value: str) -> None:
    for annotation, parse in ((HOOKS_ANNOTATION, parse_route_hooks), (NOTIFY_ANNOTATION, parse_route_notify)):
        with pytest.raises(SpecError, match="cannot give URLs") as e:
            parse({annotation: value}, settings())
        assert e.value.annotation == annotation


@given(st.text(max_size=80))
def test_any_annotation_value_yields_only_configured_names(value: str) -> None:
    s = settings()
    for annotation, parse, known in (
        (HOOKS_ANNOTATION, parse_route_hooks, s.hooks),
        (NOTIFY_ANNOTATION, parse_route_notify, s.notifiers),
    ):
        try:
            names = parse({annotation: value}, s)
        except SpecError as e:
            assert e.annotation == annotation
            continue
        assert set(names or []) <= set(known)


def test_the_io_interface_takes_names_not_urls() -> None:
    """A hook is called by name and a notification goes to names: the URL comes only from settings."""
    assert list(inspect.signature(HookRunner.call).parameters) == ["self", "name", "kind", "payload"]
    assert list(inspect.signature(Notifier.notify).parameters) == ["self", "payload", "names"]


def test_hooks_for_and_notifiers_for() -> None:
    s = settings()
    names = ["smoke-test", "load"]
    assert hooks_for(s, names, "confirm-step") == ["smoke-test"]
    assert hooks_for(s, names, "step") == ["load"]
    assert hooks_for(s, names, "rollback") == []
    with pytest.raises(ValueError, match="unknown hook kind"):
        hooks_for(s, names, "deploy")  # type: ignore[arg-type]
    assert notifiers_for(s, None, "Promoted") == ["audit"]
    assert notifiers_for(s, [], "Promoted") == []
    assert notifiers_for(s, ["team-a", "audit"], "Promoted") == ["team-a", "audit"]
    assert notifiers_for(s, ["team-a", "audit"], "RolledBack") == ["audit"]


def test_hook_result_outcome_is_derived() -> None:
    assert HookResult(True, 200, "ok", 0.1).outcome == "ok"
    assert HookResult(False, 403, "no", 0.1).outcome == "refused"
    assert HookResult(False, None, "boom", 0.1).outcome == "error"
    assert HookResult(False, None, "timed out after 1s", 1.0, "timeout").outcome == "timeout"


# --- payload --------------------------------------------------------------------------------------


def state(**changes: Any) -> RolloutState:
    base = RolloutState(
        phase=Phase.PROGRESSING,
        canary="whoami-v2",
        stable="whoami-v1",
        steps=(5, 10, 25, 50, 100),
        step=1,
        canary_weight=10,
        started_at="2026-12-01T10:00:00.000Z",
        step_started_at="2026-12-01T10:01:00.000Z",
        updated_at="2026-12-01T10:01:00.000Z",
        message="step 2/5: whoami-v1 90 → whoami-v2 10",
    )
    return base.with_(**changes)


def test_payload_from_state_has_the_documented_shape() -> None:
    p = payload_from_state(
        kind="HookCall", name="smoke-test", type="confirm-step", namespace="shop", route="whoami", state=state(), at=NOW
    )
    VALIDATOR.validate(p)
    assert p == {
        "apiVersion": "canaryd.io/v1",
        "kind": "HookCall",
        "hook": "smoke-test",
        "type": "confirm-step",
        "namespace": "shop",
        "route": "whoami",
        "phase": "Progressing",
        "step": 2,
        "steps": [5, 10, 25, 50, 100],
        "canary": "whoami-v2",
        "stable": "whoami-v1",
        "weights": {"stable": 90, "canary": 10},
        "verdict": None,
        "reason": "step 2/5: whoami-v1 90 → whoami-v2 10",
        "rollout_id": rollout_id("shop", "whoami", "whoami-v2", "2026-12-01T10:00:00.000Z"),
        "at": "2026-12-01T10:02:00.000Z",
    }
    assert set(p) == set(SCHEMA["required"]) == set(SCHEMA["properties"])


@pytest.mark.parametrize("kind", HOOK_KINDS)
def test_every_hook_kind_validates(kind: str) -> None:
    p = payload_from_state(
        kind="HookCall", name="h", type=kind, namespace="shop", route="whoami", state=state(step=-1), at=NOW
    )
    assert p["step"] == 0
    VALIDATOR.validate(p)


@pytest.mark.parametrize("phase", list(Phase))
def test_notification_payload_validates(phase: Phase) -> None:
    p = payload_from_state(
        kind="Notification",
        type="transition",
        namespace="shop",
        route="whoami",
        state=state(phase=phase),
        at=NOW,
        verdict="fail",
        reason="canary success 91% < 99%",
    )
    VALIDATOR.validate(p)
    assert p["hook"] == ""  # the Notifier names each notifier
    VALIDATOR.validate({**p, "hook": "team-a"})


@pytest.mark.parametrize(
    "broken",
    [
        {"type": "transition"},  # a HookCall has a hook kind
        {"kind": "Notification", "type": "step"},
        {"verdict": "maybe"},
        {"weights": {"stable": 90}},
        {"at": "2026-12-01 10:02"},
        {"extra": 1},
    ],
)
def test_schema_refuses_off_shape_payloads(broken: dict[str, Any]) -> None:
    p = build_payload(
        kind="HookCall",
        name="h",
        type="step",
        namespace="shop",
        route="whoami",
        phase="Progressing",
        step=1,
        steps=[50, 100],
        canary="b",
        stable="a",
        canary_weight=50,
        rollout_id=rollout_id("shop", "whoami", "b", "t"),
        at=NOW,
    )
    VALIDATOR.validate(p)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate({**p, **broken})


def test_build_payload_refuses_a_weight_outside_percent() -> None:
    with pytest.raises(ValueError, match="percentage"):
        build_payload(
            kind="HookCall",
            name="h",
            type="step",
            namespace="n",
            route="r",
            phase="Progressing",
            step=1,
            steps=[100],
            canary="c",
            stable="s",
            canary_weight=101,
            rollout_id="x",
            at=NOW,
        )


def test_rollout_id_is_stable_and_per_rollout() -> None:
    a = rollout_id("shop", "whoami", "whoami-v2", "2026-12-01T10:00:00.000Z")
    assert a == rollout_id("shop", "whoami", "whoami-v2", "2026-12-01T10:00:00.000Z")
    assert re.fullmatch(r"[0-9a-f]{24}", a)
    assert a != rollout_id("shop", "whoami", "whoami-v2", "2026-12-01T11:00:00.000Z")
    assert a != rollout_id("shop", "whoami", "whoami-v3", "2026-12-01T10:00:00.000Z")
    # A separator inside a name cannot make two rollouts collide.
    assert rollout_id("a", "bc", "d", "t") != rollout_id("ab", "c", "d", "t")


def test_slack_message_shape_and_escaping() -> None:
    p = payload_from_state(
        kind="Notification",
        name="team-a",
        type="transition",
        namespace="shop",
        route="whoami",
        state=state(phase=Phase.ROLLED_BACK, message="<!channel> & <https://x|y>"),
        at=NOW,
        verdict="fail",
    )
    m = slack_message(p)
    SLACK_VALIDATOR.validate(m)
    assert set(m) == {"text", "blocks"}
    assert "shop/whoami: RolledBack" in m["text"]
    rendered = json.dumps(m["blocks"])
    assert "<!channel>" not in rendered and "&lt;!channel&gt; &amp; &lt;https://x|y&gt;" in rendered
    assert "<!channel>" not in m["text"] and "&lt;!channel&gt;" in m["text"]
    assert p["rollout_id"] in rendered
    # A long reason stays within Slack's limits.
    SLACK_VALIDATOR.validate(slack_message({**p, "reason": "x" * 10_000}))


def test_docs_json_examples_match_the_code() -> None:
    """docs/hooks.md's payload example is valid, and its Slack example is what slack_message renders."""
    text = (ROOT / "docs" / "hooks.md").read_text()
    call, slack = (json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S))
    VALIDATOR.validate(call)
    notification = build_payload(
        kind="Notification",
        name="team-a",
        type="transition",
        namespace="shop",
        route="whoami",
        phase="RolledBack",
        step=2,
        steps=[5, 10, 25, 50, 100],
        canary="whoami-v2",
        stable="whoami-v1",
        canary_weight=0,
        rollout_id=call["rollout_id"],
        at=datetime(2026, 12, 1, 10, 4, tzinfo=UTC),
        verdict="fail",
        reason="canary success 91.0% < 99.0%",
    )
    assert slack == slack_message(notification)
