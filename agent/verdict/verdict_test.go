package verdict

import "testing"

// TestSeverity: one order of verdicts, best to worst, used for the worst
// verdict over aliases, the status table and the metric series cap.
func TestSeverity(t *testing.T) {
	t.Parallel()
	order := []Verdict{Ignored, Verified, Pending, Unverified, Untrusted}
	for i := 1; i < len(order); i++ {
		if Severity(order[i-1]) >= Severity(order[i]) {
			t.Errorf("Severity(%s)=%d not below Severity(%s)=%d",
				order[i-1], Severity(order[i-1]), order[i], Severity(order[i]))
		}
	}
	// An unknown verdict is undecided: never as good as verified.
	if Severity("") != Severity(Pending) {
		t.Errorf("unknown verdict ranks %d, want pending's %d", Severity(""), Severity(Pending))
	}
}
