package config

import "testing"

// FuzzParse: Parse on arbitrary bytes (random YAML) must never panic, and
// whatever it accepts must pass Validate again.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"",
		"stateDir: /var/lib/pinwarden\n",
		"resyncInterval: 5m\ncache:\n  verifiedTTL: 24h\n  failedTTL: 10m\n",
		"unknownKey: 1\n",
		"resyncInterval: banana\n",
		"resyncInterval: 5\n",
		"cache: {verifiedTTL: null}\n",
		"policies:\n- name: deny-hub\n  images: [\"docker.io/**\"]\n  deny: true\n",
		"policies:\n- name: basics\n  images: [\"registry.k8s.io/pause\"]\n  ignore: true\n",
		"policies:\n- name: k\n  images: [\"reg.io/**\"]\n  keyless:\n  - issuer: https://x\n    subjectRegExp: \"(\"\n",
		"policies:\n- name: a\n  images: [\"Reg/**\"]\n  threshold: -1\n",
		"pins: [a.pins, \"\"]\nprefetch: {concurrency: 1000}\n",
		"registries: {insecure: [\"a b\", \"\"]}\n",
		"- just\n- a list\n",
		"a: &a [*a]\n",
		"{",
		"\x00\xff",
		"maxProblemSeries: 1e400\n",
	} {
		f.Add([]byte(s))
	}
	base := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse(b, base)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("accepted config fails Validate: %v", err)
		}
	})
}
