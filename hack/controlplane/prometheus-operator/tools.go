//go:build tools

// Package tools keeps github.com/prometheus-operator/prometheus-operator in go.mod/go.sum so its
// module zip (and the ServiceMonitor / PrometheusRule CRD YAML inside it, under
// example/prometheus-operator-crd/) is verified by checksum when downloaded. versionutil is the
// module's package with the fewest dependencies; nothing is built from it.
package tools

import _ "github.com/prometheus-operator/prometheus-operator/pkg/versionutil"
