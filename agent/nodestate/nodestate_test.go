package nodestate

import "testing"

func TestDriftAndPins(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		pins       []TagPin
		drifted    bool
		pinned     string
		pinnedTags []string
	}{
		{"no pins", nil, false, "", nil},
		{"pinned here", []TagPin{{"r/a:1", "d1"}}, false, "d1", []string{"r/a:1"}},
		{"pinned elsewhere", []TagPin{{"r/a:1", "d2"}}, true, "d2", []string{"r/a:1"}},
		{"one of two drifted", []TagPin{{"r/a:1", "d1"}, {"r/a:2", "d3"}}, true, "d3", []string{"r/a:1", "r/a:2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			im := Image{Digest: "d1", Tags: []string{"r/a:1", "r/a:2", "r/a:3"}, Pins: tt.pins}
			if im.Drifted() != tt.drifted || im.PinnedDigest() != tt.pinned {
				t.Errorf("Drifted %v PinnedDigest %q, want %v %q", im.Drifted(), im.PinnedDigest(), tt.drifted, tt.pinned)
			}
			for _, tag := range im.Tags {
				want := false
				for _, p := range tt.pinnedTags {
					want = want || p == tag
				}
				if im.Pinned(tag) != want {
					t.Errorf("Pinned(%s) = %v, want %v", tag, im.Pinned(tag), want)
				}
			}
		})
	}
}
