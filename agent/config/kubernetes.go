package config

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseMaxUnavailable parses kubernetes.quarantineMaxUnavailable: "" (no
// guard: ok false), a count of nodes ("3", at least 1) or a percentage of
// the nodes ("10%", 1 to 100). value is the count or the percentage.
func ParseMaxUnavailable(s string) (value int, percent bool, err error) {
	if s == "" {
		return 0, false, nil
	}
	num, percent := strings.CutSuffix(s, "%")
	v, err := strconv.Atoi(num)
	if err != nil || strings.TrimSpace(num) != num || num == "" {
		return 0, false, fmt.Errorf("must be a count (\"3\") or a percentage (\"10%%\"), got %q", s)
	}
	switch {
	case percent && (v < 1 || v > 100):
		return 0, false, fmt.Errorf("percentage must be between 1%% and 100%%, got %q", s)
	case !percent && v < 1:
		return 0, false, fmt.Errorf("count must be at least 1, got %q", s)
	}
	return v, percent, nil
}

// MaxTainted is how many of total nodes may carry the quarantine taint under
// the guard spec (from ParseMaxUnavailable, already valid): a count as is, a
// percentage of total rounded up (like a Deployment's maxUnavailable, so 10%
// of 5 nodes is 1, not 0). ok is false when there is no guard.
func MaxTainted(spec string, total int) (limit int, ok bool) {
	v, percent, err := ParseMaxUnavailable(spec)
	if err != nil || spec == "" {
		return 0, false
	}
	if !percent {
		return v, true
	}
	return (v*total + 99) / 100, true
}
