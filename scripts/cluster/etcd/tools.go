//go:build tools

// Package etcd pins the etcd server that the local cluster runs; scripts/cluster/build.sh builds it.
package etcd

import _ "go.etcd.io/etcd/server/v3"
