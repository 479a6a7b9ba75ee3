"""Metrics providers: turn an ``AnalysisTarget`` into ``Observation``s by querying Prometheus.

Owns: PromQL construction and escaping (``promql``), the Prometheus HTTP client
(``prometheus``), one module per signal (``envoy``, ``dapr``, ``custom``) and the batching
``PrometheusAnalyzer`` (``analyzer``). Must not: decide verdicts (that is ``canaryd.core.judge``),
touch Kubernetes, or place an unvalidated annotation value in a query.
"""

from canaryd.metrics.analyzer import PrometheusAnalyzer
from canaryd.metrics.prometheus import PrometheusClient, Sample

__all__ = ["PrometheusAnalyzer", "PrometheusClient", "Sample"]
