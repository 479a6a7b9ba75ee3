//go:build tools

// Package tools pins the binary canaryd's bench against Flagger builds from this module.
package tools

import _ "github.com/fluxcd/flagger/cmd/flagger"
