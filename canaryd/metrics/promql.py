"""Safe construction of PromQL text from values that come from annotations.

Policy: a value is *validated* (refused unless it is DNS-name-shaped) before it is placed in a
query, and then *escaped* for the context it lands in (a quoted string, a regex). Validation is
the real guard: the accepted alphabet ``[a-z0-9.-]`` holds no quote, backslash, brace or
backtick, so no annotation can close a string or a selector and inject PromQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from canaryd.errors import MetricsError

# DNS-1123 label (Service names, Dapr app-ids, namespaces).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
# DNS-1123 subdomain (object names such as an HTTPRoute's).
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_RE2_META = re.compile(r"([\\.+*?()|\[\]{}^$])")
_VARIABLE = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def safe_label(variable: str, value: object) -> str:
    """Return ``value`` if it is a DNS label, else raise ``MetricsError`` naming ``variable``."""
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise MetricsError(
            f"refusing {variable}={value!r} in a PromQL query: only lowercase letters, digits and "
            "'-' (a DNS label, at most 63 characters) are allowed"
        )
    return value


def safe_name(variable: str, value: object) -> str:
    """Like ``safe_label`` but also allows dots (DNS subdomain, e.g. an object name)."""
    if not isinstance(value, str) or not _DNS_SUBDOMAIN.match(value):
        raise MetricsError(
            f"refusing {variable}={value!r} in a PromQL query: only lowercase letters, digits, "
            "'-' and '.' (a DNS name) are allowed"
        )
    return value


def safe_port(variable: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise MetricsError(f"refusing {variable}={value!r} in a PromQL query: not a port number")
    return str(value)


def string_literal(value: str) -> str:
    """A PromQL double-quoted string holding ``value`` verbatim."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def regex_escape(value: str) -> str:
    """Escape RE2 metacharacters (Prometheus regexes are RE2, fully anchored)."""
    return _RE2_META.sub(r"\\\1", value)


def regex_union(patterns: Iterable[str]) -> str:
    """One RE2 alternation matching any of ``patterns`` (each kept as its own group)."""
    unique = list(dict.fromkeys(patterns))
    if not unique:
        raise MetricsError("internal: empty regex union")
    return "|".join(f"(?:{p})" for p in unique)


def duration(seconds: float) -> str:
    """A PromQL range duration; milliseconds keep sub-second windows exact."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise MetricsError(f"refusing window {seconds!r}: must be a positive number of seconds")
    ms = max(1, round(seconds * 1000))
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def variables_in(template: str) -> set[str]:
    return set(_VARIABLE.findall(template))


def render(template: str, values: Mapping[str, str | None], *, where: str) -> str:
    """Substitute ``{name}`` tokens; every value must already be validated by the caller.

    A token without a value (unknown, or e.g. ``{app_id}`` on a route without one) is an error
    naming the template (``where``), never left in the query.
    """

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        value = values.get(name)
        if value is None:
            if name in values:
                raise MetricsError(f"{where}: variable {{{name}}} has no value for this route")
            raise MetricsError(
                f"{where}: unknown variable {{{name}}}; known: " + ", ".join("{" + k + "}" for k in sorted(values))
            )
        return value

    return _VARIABLE.sub(sub, template)
