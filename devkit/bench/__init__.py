"""Benchmarks for canaryd against real local servers (``python -m devkit.bench.run --smoke|--full``).

Owns: starting a devstack control plane, a Prometheus and a synthetic exporter, generating
routes/Services/EndpointSlices, running ``canaryd run`` as a subprocess and measuring it from
the outside (watch events, /proc, /metrics). Writes JSON to ``devkit/bench/results/``.

Must not: assert times (the full bench is never part of CI), talk to anything but 127.0.0.1,
or leave a process behind (every start is paired with a stop in ``finally``).
"""
