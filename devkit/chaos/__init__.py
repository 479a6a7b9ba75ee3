"""The chaos suite: canaryd under seeded SIGKILLs of itself and everything it depends on.

``python -m devkit.chaos.run`` (``make chaos``) starts a private control plane, a Prometheus and the
synthetic exporter, rolls out many routes with two leader-elected ``canaryd run`` replicas while a
concurrent editor keeps changing the routes, kills the daemon, the kube-apiserver, etcd and
Prometheus at seeded random moments, and at the end checks every stored etcd revision of every
route (``devkit.chaos.invariants``). See docs/reliability.md.

Modules:
- ``scenario``: the seeded plan (which routes, which annotations, when each kill happens);
- ``processes``: the daemon replicas and a Prometheus that comes back on the same port;
- ``editor``: the concurrent editor and its record of every write it attempted;
- ``etcd_history``: every stored revision of a key, read from etcd's JSON gateway;
- ``invariants``: pure checks over those revisions;
- ``run``: the entry point.
"""
