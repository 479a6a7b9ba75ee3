"""The real local stack (etcd, kube-apiserver, Gateway API CRDs, Prometheus) for tests and the demo."""
