package config

import "testing"

func TestMaxUnavailable(t *testing.T) {
	t.Parallel()
	tests := []struct {
		spec    string
		total   int
		limit   int
		guarded bool
		bad     bool
	}{
		{spec: "", total: 10},
		{spec: "3", total: 10, limit: 3, guarded: true},
		{spec: "3", total: 2, limit: 3, guarded: true},
		{spec: "10%", total: 5, limit: 1, guarded: true},
		{spec: "10%", total: 20, limit: 2, guarded: true},
		{spec: "25%", total: 10, limit: 3, guarded: true},
		{spec: "100%", total: 7, limit: 7, guarded: true},
		{spec: "0", bad: true},
		{spec: "0%", bad: true},
		{spec: "101%", bad: true},
		{spec: "-1", bad: true},
		{spec: "x", bad: true},
		{spec: "%", bad: true},
		{spec: " 3", bad: true},
		{spec: "3.5", bad: true},
	}
	for _, tt := range tests {
		_, _, err := ParseMaxUnavailable(tt.spec)
		if (err != nil) != tt.bad {
			t.Errorf("ParseMaxUnavailable(%q) error = %v, want error %v", tt.spec, err, tt.bad)
			continue
		}
		if tt.bad {
			c := Default()
			c.Kubernetes.QuarantineMaxUnavailable = tt.spec
			if err := c.Validate(); err == nil {
				t.Errorf("Validate accepts quarantineMaxUnavailable %q", tt.spec)
			}
			continue
		}
		limit, ok := MaxTainted(tt.spec, tt.total)
		if limit != tt.limit || ok != tt.guarded {
			t.Errorf("MaxTainted(%q, %d) = %d, %v; want %d, %v", tt.spec, tt.total, limit, ok, tt.limit, tt.guarded)
		}
	}
}
