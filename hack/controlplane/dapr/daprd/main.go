// Command daprd is Dapr's runtime, built with Dapr's stable component set (the build tag
// `stablecomponents`) plus the SQLite name resolver, which the stable set lacks and which
// self-hosted service invocation between daprds on loopback needs. Dapr's full set
// (`allcomponents`) includes the Kitex binding, which does not build with current Go.
package main

import (
	"github.com/dapr/components-contrib/nameresolution/sqlite"
	"github.com/dapr/dapr/cmd/daprd/app"
	nameresolution "github.com/dapr/dapr/pkg/components/nameresolution"
)

func main() {
	nameresolution.DefaultRegistry.RegisterComponent(sqlite.NewResolver, "sqlite")
	app.Run()
}
