//go:build tools

// Package tools pins the binary canaryd's devstack builds from this module.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
