"""The seeded plan of one chaos run: the routes (what each rolls out, how, and what it must end as) and
the kills (which component, when, for how long). Same seed, same plan; the moments things happen
inside the cluster still depend on the machine.

Routes come in three kinds:
- ``time``: ``analysis: none``, steps and interval drawn from the seed;
- ``envoy``: ``analysis: envoy`` against exporter series of a healthy canary (no errors), with
  ``max-errors`` and ``max-inconclusive`` of 1000 so a Prometheus outage holds instead of rolling back;
- ``bad``: the same analysis against a canary answering 30 % errors, ``failure-threshold`` 2: it
  cannot pass a round, so it must end RolledBack (after its first step), never Promoted.

Some routes start up front, the rest at random moments during the chaos window, so kills meet
rollouts at every stage.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal, cast

from canaryd.core import spec as ann
from canaryd.core.state import Phase
from canaryd.kube import GATEWAY_GROUP, GATEWAY_VERSION

Kind = Literal["time", "envoy", "bad"]
COMPONENTS = ("daemon", "kube-apiserver", "etcd", "prometheus")
NAMESPACE = "chaos"


@dataclass(frozen=True)
class RouteSpec:
    name: str
    kind: Kind
    annotations: dict[str, str]
    create_at: float  # seconds into the chaos window (0 = before it starts)
    scale: int  # the pair's weight total (100, or 1000 for per-mille routes)
    extra_rule: bool  # a second rule pinning a header to the stable (its weight is not canaryd's)

    @property
    def stable(self) -> str:
        return f"{self.name}-v1"

    @property
    def canary(self) -> str:
        return f"{self.name}-v2"

    @property
    def third(self) -> str:
        return f"{self.name}-v3"

    @property
    def final_phase(self) -> Phase:
        return Phase.ROLLED_BACK if self.kind == "bad" else Phase.PROMOTED

    @property
    def forbidden_phases(self) -> tuple[Phase, ...]:
        if self.kind == "bad":
            return (Phase.PROMOTED, Phase.FAILED, Phase.PAUSED)
        return (Phase.ROLLED_BACK, Phase.FAILED, Phase.PAUSED)

    def body(self) -> dict[str, Any]:
        rules: list[dict[str, Any]] = [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"set": [{"name": "x-route", "value": self.name}]},
                    }
                ],
                "backendRefs": [
                    {"group": "", "kind": "Service", "name": self.stable, "port": 80, "weight": self.scale},
                    {"group": "", "kind": "Service", "name": self.canary, "port": 80, "weight": 0},
                ],
            }
        ]
        if self.extra_rule:
            rules.append(
                {
                    "matches": [{"headers": [{"type": "Exact", "name": "x-pin", "value": "stable"}]}],
                    "backendRefs": [{"group": "", "kind": "Service", "name": self.stable, "port": 80, "weight": 1}],
                }
            )
        return {
            "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
            "kind": "HTTPRoute",
            "metadata": {
                "name": self.name,
                "labels": {"app": self.name, "chaos.example.com/kind": self.kind},
                "annotations": {**self.annotations, "example.com/owner": "chaos-suite"},
            },
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": self.name, "port": 80}], "rules": rules},
        }


@dataclass(frozen=True)
class Kill:
    at: float  # seconds into the chaos window
    component: str  # one of COMPONENTS
    down_s: float  # how long it stays dead before the restart
    target: str = ""  # daemon: "leader" or "standby"


@dataclass(frozen=True)
class Plan:
    seed: int
    routes: tuple[RouteSpec, ...]
    kills: tuple[Kill, ...]
    window_s: float


def _steps(rng: random.Random, lo: int, hi: int) -> str:
    k = rng.randint(lo, hi)
    return ",".join(str(v) for v in sorted(rng.sample(range(5, 100, 5), k))) + ",100"


def _route(rng: random.Random, i: int, kind: Kind, create_at: float) -> RouteSpec:
    name = f"r{i:02d}"
    a: dict[str, str] = {ann.CANARY: f"{name}-v2"}
    if rng.random() < 0.5:
        a[ann.STABLE] = f"{name}-v1"
    if kind == "time":
        a[ann.STEPS] = _steps(rng, 4, 8)
        a[ann.INTERVAL] = rng.choice(["5s", "6s", "8s", "10s"])
        a[ann.ANALYSIS] = "none"
    else:
        interval = rng.choice(["5s", "6s"])
        a.update(
            {
                ann.STEPS: _steps(rng, 2, 4) if kind == "envoy" else "10,50,100",
                ann.INTERVAL: interval,
                ann.ANALYSIS: "envoy",
                ann.ANALYSIS_WINDOW: interval,
                ann.MIN_REQUESTS: "20",
                ann.SUCCESS_RATE_MIN: "95",
                ann.FAILURE_THRESHOLD: "2" if kind == "bad" else "3",
                ann.MAX_ERRORS: "1000",
                ann.MAX_INCONCLUSIVE: "1000",
            }
        )
    return RouteSpec(
        name=name,
        kind=kind,
        annotations=a,
        create_at=create_at,
        scale=1000 if rng.random() < 0.2 else 100,
        extra_rule=rng.random() < 0.3,
    )


def make_plan(*, routes: int, seed: int, kills: int, window_s: float) -> Plan:
    rng = random.Random(seed)
    n_bad = max(1, routes // 10) if routes >= 5 else 0
    n_envoy = (routes * 3) // 10
    kinds = cast(list[Kind], ["bad"] * n_bad + ["envoy"] * n_envoy + ["time"] * (routes - n_bad - n_envoy))
    rng.shuffle(kinds)
    upfront = round(routes * 0.4)
    specs = []
    for i, kind in enumerate(kinds):
        at = 0.0 if i < upfront else round(rng.uniform(5, window_s * 0.7), 1)
        specs.append(_route(rng, i, kind, at))
    components = list(COMPONENTS)
    rng.shuffle(components)
    chosen = components[:kills] + [rng.choice(COMPONENTS) for _ in range(max(0, kills - len(COMPONENTS)))]
    rng.shuffle(chosen)
    times = sorted(round(rng.uniform(10, window_s), 1) for _ in chosen)
    plan_kills = tuple(
        Kill(
            at=t,
            component=c,
            down_s=round(rng.uniform(1.0, 5.0), 1),
            target=("leader" if rng.random() < 0.7 else "standby") if c == "daemon" else "",
        )
        for t, c in zip(times, chosen, strict=True)
    )
    return Plan(seed=seed, routes=tuple(specs), kills=plan_kills, window_s=window_s)
