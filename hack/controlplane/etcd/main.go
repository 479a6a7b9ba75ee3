// Command etcd is etcd's own server entry point, built from Go modules so the
// test control plane needs no download outside the Go module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
