"""canaryd: a progressive-delivery canary controller for Gateway API (GAMMA) HTTPRoutes.

Layout (each module owns one thing):

- ``spec``      parses the user's ``canaryd.io/*`` annotations into a typed spec (pure).
- ``plan``      turns a spec into weights per step (pure).
- ``state``     the versioned JSON state annotation codec (pure).
- ``judge``     numbers in, verdict out (pure).
- ``decide``    the state machine as a pure function of spec, state, facts and ``now``.
- ``routes``    the route adapter: read and patch backendRef weights, nothing else.
- ``kube``      the only boundary to kubernetes_asyncio (clients, errors, events).
- ``metrics``   signals (envoy, dapr, custom) turned into numbers via Prometheus.
- ``engine``    owns time and I/O: watches routes, runs one task per rollout.
- ``cli``       the ``canaryd`` command.
- ``devstack``  the real local control plane for tests and the demo.
"""

__version__ = "0.1.0"
