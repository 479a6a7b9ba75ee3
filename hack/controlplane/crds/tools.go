//go:build tools

// Package tools keeps sigs.k8s.io/gateway-api in go.mod/go.sum so its module
// zip (and the CRD YAML inside it) is verified by checksum when downloaded.
package tools

import _ "sigs.k8s.io/gateway-api/apis/v1"
