//go:build tools

// Package tools keeps github.com/cilium/cilium in go.mod/go.sum so its module zip (and the
// CRD YAML inside it) is verified by checksum when downloaded.
package tools

import _ "github.com/cilium/cilium/pkg/k8s/apis/cilium.io/client"
