// Package agent assembles pinwarden's node agent: the runtime adapter, the
// inventory, the judge (policy, cache, verifier), the node loop, config
// reloading, Kubernetes reporting and the HTTP servers, all owned by one
// errgroup so that no goroutine outlives Run.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"

	"github.com/pinwarden/pinwarden/agent/cache"
	"github.com/pinwarden/pinwarden/agent/config"
	"github.com/pinwarden/pinwarden/agent/inventory"
	"github.com/pinwarden/pinwarden/agent/judge"
	"github.com/pinwarden/pinwarden/agent/loop"
	"github.com/pinwarden/pinwarden/agent/metrics"
	"github.com/pinwarden/pinwarden/agent/pins"
	"github.com/pinwarden/pinwarden/agent/policy"
	"github.com/pinwarden/pinwarden/agent/prefetch"
	"github.com/pinwarden/pinwarden/agent/reload"
	"github.com/pinwarden/pinwarden/agent/report"
	"github.com/pinwarden/pinwarden/agent/status"
	"github.com/pinwarden/pinwarden/agent/verify"
	"github.com/pinwarden/pinwarden/cri"
)

// ConfigError is a config or pin file that cannot be used at start-up.
type ConfigError struct{ Err error }

func (e ConfigError) Error() string { return e.Err.Error() }
func (e ConfigError) Unwrap() error { return e.Err }

// shutdownGrace bounds how long servers get to finish on shutdown.
const shutdownGrace = 3 * time.Second

// Settings are the parts of a loaded configuration that decide verdicts.
type Settings struct {
	Config   *config.Config
	Policies *policy.Set
	Pins     []pins.Pin
}

// LoadSettings loads the config file, compiles its policies and loads its
// pin files. Any error leaves nothing half-applied.
func LoadSettings(path string) (*Settings, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, err
	}
	set, err := policy.Compile(cfg)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	p, err := pins.LoadFiles(cfg.Pins)
	if err != nil {
		return nil, err
	}
	return &Settings{Config: cfg, Policies: set, Pins: p}, nil
}

// NewVerifier builds the registry verifier from the config; tune adjusts
// the options (e.g. the CLI lifts the per-host rate limit).
func NewVerifier(cfg *config.Config, logger *slog.Logger, tune ...func(*verify.Options)) (*verify.Verifier, error) {
	o := verify.Options{Registries: cfg.Registries, Logger: logger}
	for _, f := range tune {
		f(&o)
	}
	v, err := verify.New(o)
	if err != nil {
		return nil, fmt.Errorf("registry access: %w", err)
	}
	return v, nil
}

// Run runs the agent until ctx is done. A config that cannot be loaded is a
// ConfigError.
func Run(ctx context.Context, configPath, version string, logger *slog.Logger) error {
	s, err := LoadSettings(configPath)
	if err != nil {
		return ConfigError{err}
	}
	cfg := s.Config
	m := metrics.New(version, cfg.MaxProblemSeries)
	m.ConfigReload(true)

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		logger.Warn("state directory unusable; verdicts are kept in memory only", "dir", cfg.StateDir, "err", err)
	}
	vc, err := cache.Open(ctx, cache.PathIn(cfg.StateDir), cache.WithLogger(logger.With("component", "cache")), cache.WithObserver(m))
	if err != nil {
		return fmt.Errorf("open verdict cache: %w", err)
	}
	defer func() {
		if err := vc.Close(); err != nil {
			logger.Warn("closing verdict cache", "err", err)
		}
	}()
	vc.InvalidateExcept(fingerprints(s.Policies))

	verifier, err := NewVerifier(cfg, logger.With("component", "verify"))
	if err != nil {
		return ConfigError{err}
	}
	j := judge.New(s.Policies, verifier,
		judge.WithCache(vc, cfg.Cache.VerifiedTTL.Duration, cfg.Cache.FailedTTL.Duration), judge.WithObserver(m))

	rt, err := cri.Dial(ctx, cfg.RuntimeEndpoint, cfg.ContainerdNamespace)
	if err != nil {
		return fmt.Errorf("runtime %s: %w", cfg.RuntimeEndpoint, err)
	}
	defer rt.Close()

	rep, err := newReporter(cfg, logger.With("component", "report"), report.WithHoldObserver(m.QuarantineHeldBack))
	if err != nil {
		return ConfigError{err}
	}
	inv := inventory.New(rt, logger.With("component", "inventory"),
		inventory.WithResyncInterval(cfg.ResyncInterval.Duration), inventory.WithObserver(m))
	lopts := loop.Options{OnDropped: m.QueueDropped,
		VerifiedTTL: cfg.Cache.VerifiedTTL.Duration, FailedTTL: cfg.Cache.FailedTTL.Duration}
	if rep != nil {
		lopts.Reporter = rep
	}
	lp := loop.New(inv, j, m, logger.With("component", "loop"), lopts)
	lp.SetPins(s.Pins)
	var pf *prefetch.Prefetcher
	if cfg.Prefetch.Enabled {
		popts := prefetch.Options{Concurrency: cfg.Prefetch.Concurrency, PinGC: cfg.Prefetch.PinGC,
			Credentials: verifier, Observer: m}
		if rep != nil {
			popts.Events = rep
		}
		pf = prefetch.New(j, rt, logger.With("component", "prefetch"), popts)
		pf.SetPins(s.Pins)
	}

	a := &agent{log: logger, path: configPath, cur: s, judge: j, cache: vc, loop: lp, metrics: m, report: rep, prefetch: pf}
	watcher, err := reload.New(a.watchedFiles(), 300*time.Millisecond, logger.With("component", "reload"), a.reload)
	if err != nil {
		return fmt.Errorf("watch config: %w", err)
	}
	a.watcher = watcher

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return inv.Run(ctx) })
	g.Go(func() error { return lp.Run(ctx) })
	g.Go(func() error { return watcher.Run(ctx) })
	g.Go(func() error { return forward(ctx, inv, lp) })
	if rep != nil {
		g.Go(func() error { return rep.Run(ctx) })
	}
	if pf != nil {
		g.Go(func() error { return pf.Run(ctx) })
	}
	serve(ctx, g, logger, cfg.MetricsAddress, probes(m, inv))
	serve(ctx, g, logger, cfg.StatusAddress, status.Handler(lp))
	logger.Info("agent started", "version", version, "runtime", cfg.RuntimeEndpoint, "policies", len(cfg.Policies),
		"pins", len(s.Pins), "metrics", cfg.MetricsAddress, "status", cfg.StatusAddress)
	err = g.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	logger.Info("agent stopped")
	return err
}

// forward turns inventory changes into loop work: changed digests are
// judged, a completed relist re-queues every digest (cache hits are cheap).
func forward(ctx context.Context, inv *inventory.Inventory, lp *loop.Loop) error {
	changes := inv.Subscribe()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ch, ok := <-changes:
			if !ok {
				return nil
			}
			if ch.Resync {
				lp.Resync()
			} else {
				lp.Changed(ch.Digests...)
			}
		}
	}
}

// agent holds what a reload swaps.
type agent struct {
	log     *slog.Logger
	path    string
	judge   *judge.Judge
	cache   *cache.Cache
	loop    *loop.Loop
	metrics *metrics.Metrics
	watcher *reload.Watcher
	report  *report.Reporter // nil when Kubernetes reporting is off
	// prefetch is nil when prefetch.enabled is false.
	prefetch *prefetch.Prefetcher

	mu  sync.Mutex // guards cur
	cur *Settings
}

func (a *agent) watchedFiles() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string{a.path}, a.cur.Config.Pins...)
}

// reload loads the config and pins again. A broken file is refused whole:
// the last good settings stay in force.
func (a *agent) reload() {
	s, err := LoadSettings(a.path)
	if err != nil {
		a.metrics.ConfigReload(false)
		a.log.Error("config reload refused; the last good config and pins stay in force", "err", err)
		if a.report != nil {
			a.report.Event(corev1.EventTypeWarning, report.ReasonConfigInvalid,
				"config reload refused, the last good config stays in force: "+err.Error())
		}
		return
	}
	a.mu.Lock()
	old := a.cur
	a.cur = s
	a.mu.Unlock()
	a.metrics.ConfigReload(true)
	if a.report != nil {
		// kubernetes.* except enabled and kubeconfig take effect now:
		// quarantineTaint false lifts the taint within seconds.
		a.report.SetOptions(report.FromConfig(s.Config.Kubernetes)...)
	}
	for _, k := range restartOnly(old.Config, s.Config) {
		a.log.Warn("config key changed; it takes effect after a restart", "key", k)
	}
	fps := fingerprints(s.Policies)
	a.judge.SetPolicies(s.Policies)
	dropped := a.cache.InvalidateExcept(fps)
	a.loop.SetPins(s.Pins)
	if a.prefetch != nil {
		a.prefetch.SetPins(s.Pins)
	}
	// Re-judge every digest, not only those judged under a vanished
	// fingerprint: a new policy can take over a repository whose old policy
	// still exists. Unchanged policies answer from the cache.
	a.loop.Rejudge(nil)
	if err := a.watcher.Set(a.watchedFiles()); err != nil {
		a.log.Warn("watching the new pin files", "err", err)
	}
	a.log.Info("config reloaded", "policies", len(s.Config.Policies), "pins", len(s.Pins), "invalidatedVerdicts", dropped)
}

// restartOnly lists the keys that changed but are only read at start-up.
func restartOnly(old, cur *config.Config) []string {
	var keys []string
	check := func(name string, a, b any) {
		if a != b {
			keys = append(keys, name)
		}
	}
	check("runtimeEndpoint", old.RuntimeEndpoint, cur.RuntimeEndpoint)
	check("containerdNamespace", old.ContainerdNamespace, cur.ContainerdNamespace)
	check("stateDir", old.StateDir, cur.StateDir)
	check("metricsAddress", old.MetricsAddress, cur.MetricsAddress)
	check("statusAddress", old.StatusAddress, cur.StatusAddress)
	check("resyncInterval", old.ResyncInterval, cur.ResyncInterval)
	check("maxProblemSeries", old.MaxProblemSeries, cur.MaxProblemSeries)
	check("cache", old.Cache, cur.Cache)
	check("prefetch", old.Prefetch, cur.Prefetch)
	check("registries.dockerConfig", old.Registries.DockerConfig, cur.Registries.DockerConfig)
	check("registries.requestsPerSecond", old.Registries.RequestsPerSecond, cur.Registries.RequestsPerSecond)
	check("registries.burst", old.Registries.Burst, cur.Registries.Burst)
	if !slices.Equal(old.Registries.Insecure, cur.Registries.Insecure) {
		keys = append(keys, "registries.insecure")
	}
	check("kubernetes.enabled", old.Kubernetes.Enabled, cur.Kubernetes.Enabled)
	check("kubernetes.kubeconfig", old.Kubernetes.Kubeconfig, cur.Kubernetes.Kubeconfig)
	return keys
}

// probes serves /metrics, /healthz and /readyz (ready after the first full list).
func probes(m *metrics.Metrics, inv *inventory.Inventory) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.Registry(), promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !inv.Ready() {
			http.Error(w, "waiting for the first full list of the runtime", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// serve runs an HTTP server in g with a partner that shuts it down when ctx
// is done. An empty address disables the server.
func serve(ctx context.Context, g *errgroup.Group, logger *slog.Logger, addr string, h http.Handler) {
	if addr == "" {
		return
	}
	srv := &http.Server{Addr: addr, Handler: h, ReadHeaderTimeout: 5 * time.Second,
		BaseContext: func(net.Listener) context.Context { return ctx }}
	g.Go(func() error {
		err := srv.ListenAndServe()
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("serve %s: %w", addr, err)
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownGrace)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			logger.Warn("server shutdown", "addr", addr, "err", err)
		}
		return nil
	})
}

// fingerprints is the set of current policy fingerprints.
func fingerprints(set *policy.Set) map[string]bool {
	out := map[string]bool{}
	for _, p := range set.Policies {
		out[p.Fingerprint] = true
	}
	return out
}
