//go:build tools

// Package tools pins Dapr Sentry, built from this module as-is.
package tools

import _ "github.com/dapr/dapr/cmd/sentry"
