//go:build tools

// Package kuberouter pins the NetworkPolicy enforcer of the local cluster (kube-router run as a
// firewall only); scripts/cluster/build.sh builds it.
package kuberouter

import _ "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"
