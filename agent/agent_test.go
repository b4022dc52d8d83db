package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/pinwarden/pinwarden/agent/config"
)

// Of kubernetes.*, only enabled and kubeconfig need a restart: the reporter
// takes the others on reload (quarantineTaint: false lifts the taint live).
func TestKubernetesKeysLive(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		change func(*config.Kubernetes)
		want   []string
	}{
		{"enabled", func(k *config.Kubernetes) { k.Enabled = !k.Enabled }, []string{"kubernetes.enabled"}},
		{"kubeconfig", func(k *config.Kubernetes) { k.Kubeconfig = "/other" }, []string{"kubernetes.kubeconfig"}},
		{"events", func(k *config.Kubernetes) { k.Events = !k.Events }, nil},
		{"nodeCondition", func(k *config.Kubernetes) { k.NodeCondition = !k.NodeCondition }, nil},
		{"quarantineTaint", func(k *config.Kubernetes) { k.QuarantineTaint = !k.QuarantineTaint }, nil},
		{"quarantineMaxUnavailable", func(k *config.Kubernetes) { k.QuarantineMaxUnavailable = "10%" }, nil},
	}
	for _, tt := range tests {
		old, cur := config.Default(), config.Default()
		tt.change(&cur.Kubernetes)
		if got := restartOnly(old, cur); !slices.Equal(got, tt.want) {
			t.Errorf("%s: restartOnly = %q, want %q", tt.name, got, tt.want)
		}
	}
}

// TestRestartOnly changes every field of the config, one at a time, slices
// and structs included, and checks that exactly the settings read only at
// start-up are reported, and that nothing panics.
func TestRestartOnly(t *testing.T) {
	t.Parallel()
	restart := map[string]string{
		"RuntimeEndpoint": "runtimeEndpoint", "ContainerdNamespace": "containerdNamespace", "NodeName": "nodeName",
		"StateDir": "stateDir", "MetricsAddress": "metricsAddress", "StatusAddress": "statusAddress",
		"ResyncInterval": "resyncInterval", "MaxProblemSeries": "maxProblemSeries", "Cache": "cache",
		"Prefetch": "prefetch", "Kubernetes": "kubernetes.enabled", // the other kubernetes.* keys: TestKubernetesKeysLive
	}
	typ := reflect.TypeFor[config.Config]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		t.Run(f.Name, func(t *testing.T) {
			t.Parallel()
			old, cur := config.Default(), config.Default()
			change(reflect.ValueOf(cur).Elem().Field(i))
			if reflect.DeepEqual(old, cur) {
				t.Fatalf("test did not change %s", f.Name)
			}
			got := restartOnly(old, cur)
			var want []string
			if k, ok := restart[f.Name]; ok {
				want = []string{k}
			}
			if !slices.Equal(got, want) {
				t.Errorf("restartOnly = %q, want %q", got, want)
			}
		})
	}
	if differs([]string{"a"}, []string{"a"}) || !differs([]string{"a"}, []string{"b"}) ||
		differs(config.Registries{Insecure: []string{"x"}}, config.Registries{Insecure: []string{"x"}}) {
		t.Error("differs on slices")
	}
}

// change sets v to a different value: the first field of a struct, one more
// element of a slice.
func change(v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		v.SetString(v.String() + "x")
	case reflect.Int, reflect.Int64:
		if v.Type() == reflect.TypeFor[time.Duration]() {
			v.SetInt(v.Int() + int64(time.Second))
			return
		}
		v.SetInt(v.Int() + 1)
	case reflect.Float64:
		v.SetFloat(v.Float() + 1)
	case reflect.Bool:
		v.SetBool(!v.Bool())
	case reflect.Struct:
		change(v.Field(0))
	case reflect.Slice:
		v.Set(reflect.Append(v, reflect.New(v.Type().Elem()).Elem()))
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
	default:
		panic("change: kind " + v.Kind().String())
	}
}

// TestVerifierKey: a reload rebuilds the registry client exactly when the
// registries section or the docker config's content changed (a rotated pull
// secret), and always after a start without the files.
func TestVerifierKey(t *testing.T) {
	t.Parallel()
	dc := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(dc, []byte(`{"auths":{"reg.example":{"auth":"dTpw"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Registries.DockerConfig = dc
	k1 := verifierKey(cfg, nil)
	if k1 == "" || verifierKey(cfg, nil) != k1 {
		t.Fatal("key empty or unstable")
	}
	if verifierKey(cfg, errors.New("keys missing")) != "" {
		t.Error("a start without the files has a key")
	}
	if err := os.WriteFile(dc, []byte(`{"auths":{"reg.example":{"auth":"dTpx"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	k2 := verifierKey(cfg, nil)
	if k2 == k1 {
		t.Error("docker config rotation kept the key")
	}
	cfg.Registries.Insecure = []string{"reg.example"}
	if verifierKey(cfg, nil) == k2 {
		t.Error("registries change kept the key")
	}
}

// runAgent runs the agent in this process on the config at cfgPath until
// the test ends, then stops it and checks that Run returned nil.
func runAgent(t *testing.T, cfgPath string) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfgPath, "test", slog.New(slog.NewTextHandler(io.Discard, nil))) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
}
