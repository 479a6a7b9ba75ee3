"""A local stand-in for a cluster's workloads and GAMMA data plane, for demos and tests.

Owns: ``whoami`` (a traefik/whoami look-alike with error and latency injection), ``dataplane``
(reads HTTPRoutes, Gateways, EndpointSlices and Pods from a real apiserver and proxies by weight,
exposing Cilium-Envoy's and, imitated, Dapr's metrics; its pure parts are ``routing``,
``gateway`` and ``envoy_stats``, its local stand-ins for Pods ``podrunner``) and ``loadgen``
(fixed-rate load, answers counted per backend).

Must not: import anything from the controller (engine, judge, router adapters) — the demo
plays the cluster, canaryd must not be able to cheat by sharing state with it — nor send
traffic anywhere but 127.0.0.1.
"""
