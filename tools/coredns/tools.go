//go:build tools

// Package tools records the commands this module builds so that go.sum covers them.
package tools

import (
	_ "github.com/coredns/coredns"
)
