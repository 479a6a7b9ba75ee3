"""The cluster admin's hook and notifier settings, and the routes' opt-in annotations (pure).

``HooksSettings`` is meant to be embedded in ``canaryd.settings.Settings`` as ``hooks``; every URL a
hook or notifier calls comes from here. A route only *names* hooks (``canaryd.io/hooks``) and
notifiers (``canaryd.io/notify``): ``parse_route_hooks`` / ``parse_route_notify`` accept names the
admin configured and nothing else, so no route can make canaryd send a request to an address of
its choosing (the SSRF hole of controllers that take webhook URLs from the rollout object).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from canaryd.core.hooks import NOTIFY_NONE, HookCatalog, route_hooks, route_notifiers
from canaryd.core.spec import HOOKS, NOTIFY, quote
from canaryd.core.state import Phase

HOOKS_ANNOTATION = HOOKS
NOTIFY_ANNOTATION = NOTIFY

HookKind = Literal["pre-rollout", "step", "confirm-step", "confirm-promotion", "post-rollout", "rollback"]
HOOK_KINDS: tuple[HookKind, ...] = get_args(HookKind)
NotifierType = Literal["webhook", "slack"]

# Hook and notifier names: DNS-1123 labels, so they sit in a comma-joined annotation and in metric
# labels as they are.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# RFC 9110 field-name (token).
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Set by canaryd on every call; an admin's value would silently fight ours.
RESERVED_HEADERS = frozenset(
    {"content-type", "user-agent", "idempotency-key", "host", "content-length", "transfer-encoding", "connection"}
)


def check_url(raw: str) -> str:
    """``raw`` if it is an absolute http(s) URL with a host and no credentials or fragment, else ``ValueError``.

    Also applied at call time to the contents of ``url_from_file``. Messages never repeat the URL
    (a Slack webhook URL is itself the secret).
    """
    url = raw.strip()
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, not {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise ValueError("URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("URL must not carry credentials; send them as a header (headers_from_files)")
    if parts.fragment:
        raise ValueError("URL must not have a #fragment")
    if port == 0:
        raise ValueError("port 0 is not a port to call")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError("URL contains whitespace or control characters")
    return url


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{kind} name {quote(name)} must be a DNS label (lower-case letters, digits, '-')")


class EndpointConfig(BaseModel):
    """What hooks and notifiers share: timeout, retries, headers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(default=10.0, ge=0.1, le=300.0)
    """Seconds one attempt may take (connect, send, answer). A timeout is not retried."""
    retries: int = Field(default=2, ge=0, le=10)
    """Further attempts after a connection error (refused, reset, DNS), with exponential backoff."""
    backoff_s: float = Field(default=0.5, ge=0.0, le=30.0)
    """Delay before the first retry; doubled for each further retry, at most 10s each."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers with plain values (nothing secret: settings are logged and dumped)."""
    headers_from_files: dict[str, str] = Field(default_factory=dict)
    """Header name -> file whose contents (stripped) are the value, e.g. a mounted Secret; read at
    every call, never logged."""

    @field_validator("headers", "headers_from_files")
    @classmethod
    def _header_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"header name {quote(name)} is not a valid HTTP field name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name} is set by canaryd and cannot be configured")
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name}: value contains a line break")
        return v

    @model_validator(mode="after")
    def _headers_disjoint(self) -> EndpointConfig:
        both = {n.lower() for n in self.headers} & {n.lower() for n in self.headers_from_files}
        if both:
            raise ValueError(f"headers set both inline and from a file: {', '.join(sorted(both))}")
        for name, path in self.headers_from_files.items():
            if not path.strip():
                raise ValueError(f"headers_from_files.{name}: empty file path")
        return self


class HookConfig(EndpointConfig):
    """A named hook: an HTTP endpoint the engine calls, and which it may gate a rollout on."""

    url: str
    """http(s) URL of the hook."""
    method: Literal["POST", "GET"] = "POST"
    """POST sends the JSON payload; GET sends none (a few fields go in the query string instead)."""
    kinds: list[HookKind] = Field(min_length=1)
    """The calls this hook takes: pre-rollout, step, confirm-step, confirm-promotion, post-rollout, rollback."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v)

    @field_validator("kinds")
    @classmethod
    def _kinds_unique(cls, v: list[HookKind]) -> list[HookKind]:
        return list(dict.fromkeys(v))


class NotifierConfig(EndpointConfig):
    """A named notifier: told about phase transitions, never consulted."""

    type: NotifierType = "webhook"
    """webhook = the Notification JSON payload as is; slack = a Slack incoming-webhook message."""
    url: str | None = None
    """http(s) URL; exactly one of url and url_from_file."""
    url_from_file: str | None = None
    """File holding the URL (a Slack webhook URL is a secret: mount it from a Secret); read at every call."""
    phases: list[Phase] = Field(default_factory=lambda: list(Phase))
    """Phases whose entry is notified; default every phase. (Not ``on``: YAML reads that key as true.)"""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v)

    @field_validator("phases")
    @classmethod
    def _phases_unique(cls, v: list[Phase]) -> list[Phase]:
        if not v:
            raise ValueError("name at least one phase (or remove the notifier)")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _one_url(self) -> NotifierConfig:
        if (self.url is None) == (self.url_from_file is None or not self.url_from_file.strip()):
            raise ValueError("set exactly one of url and url_from_file")
        return self


class HooksSettings(BaseModel):
    """``Settings.hooks``: named hooks, named notifiers, and the notifiers a route gets by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hooks: dict[str, HookConfig] = Field(default_factory=dict)
    """Named hooks; routes opt in by name with canaryd.io/hooks."""
    notifiers: dict[str, NotifierConfig] = Field(default_factory=dict)
    """Named notifiers; routes choose them by name with canaryd.io/notify."""
    default_notifiers: list[str] = Field(default_factory=list)
    """Notifiers of a route without canaryd.io/notify."""

    @model_validator(mode="after")
    def _names(self) -> HooksSettings:
        for name in self.hooks:
            _check_name("hook", name)
        for name in self.notifiers:
            _check_name("notifier", name)
            if name == NOTIFY_NONE:
                raise ValueError(f"notifier name {NOTIFY_NONE!r} is reserved (canaryd.io/notify: none opts out)")
        unknown = [n for n in self.default_notifiers if n not in self.notifiers]
        if unknown:
            raise ValueError(
                f"default_notifiers names unknown notifier(s) {', '.join(map(repr, unknown))}; "
                f"configured: {', '.join(sorted(self.notifiers)) or 'none configured'}"
            )
        return self


def catalog(settings: HooksSettings) -> HookCatalog:
    """What the pure core needs to know of the configured hooks and notifiers."""
    return HookCatalog(
        hooks={name: tuple(h.kinds) for name, h in settings.hooks.items()},
        notifiers=tuple(settings.notifiers),
        default_notifiers=tuple(settings.default_notifiers),
    )


def parse_route_hooks(annotations: Mapping[str, str], settings: HooksSettings) -> list[str]:
    """The hooks a route opted into with ``canaryd.io/hooks: a,b`` (in order, deduplicated); [] when absent.

    Raises ``SpecError(canaryd.io/hooks, ...)`` naming the known hooks for an unknown name or a URL
    (the rule is ``canaryd.core.hooks.route_hooks``, which admission uses too).
    """
    return list(route_hooks(annotations, catalog(settings)))


def parse_route_notify(annotations: Mapping[str, str], settings: HooksSettings) -> list[str] | None:
    """The notifiers a route chose with ``canaryd.io/notify``: None = absent (the cluster default), [] = none."""
    found = route_notifiers(annotations, catalog(settings))
    return None if found is None else list(found)


def hooks_for(settings: HooksSettings, names: Sequence[str], kind: HookKind) -> list[str]:
    """Of the route's ``names`` (from ``parse_route_hooks``), those configured to take ``kind``, in order."""
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}; kinds: {', '.join(HOOK_KINDS)}")
    return [n for n in names if n in settings.hooks and kind in settings.hooks[n].kinds]


def notifiers_for(settings: HooksSettings, names: Sequence[str] | None, phase: str) -> list[str]:
    """The notifiers that fire when a route with ``names`` (``None`` = the default) enters ``phase``."""
    chosen = settings.default_notifiers if names is None else names
    return [n for n in chosen if n in settings.notifiers and phase in settings.notifiers[n].phases]
