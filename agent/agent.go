// Package agent assembles pinwarden's node agent: the runtime adapter, the
// inventory, the judge (policy, cache, verifier), the node loop, config
// reloading, Kubernetes reporting and the HTTP servers, all owned by one
// errgroup so that no goroutine outlives Run.
package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
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
	"github.com/pinwarden/pinwarden/agent/verdict"
	"github.com/pinwarden/pinwarden/agent/verify"
	"github.com/pinwarden/pinwarden/cri"
)

// The metrics count what the inventory and the cache report beyond their
// required observer methods.
var (
	_ inventory.RepairObserver = (*metrics.Metrics)(nil)
	_ cache.HitObserver        = (*metrics.Metrics)(nil)
	_ cache.CorruptObserver    = (*metrics.Metrics)(nil)
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
	return settingsFor(cfg)
}

// settingsFor compiles the policies of a loaded config and loads its pins.
func settingsFor(cfg *config.Config) (*Settings, error) {
	set, err := policy.Compile(cfg)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", cfg.Path, err)
	}
	p, err := pins.LoadFiles(cfg.Pins)
	if err != nil {
		return nil, err
	}
	return &Settings{Config: cfg, Policies: set, Pins: p}, nil
}

// startSettings loads what the agent starts with. A config that does not
// parse or validate is an error (exit 2). A config whose named files
// (keys, trusted root, docker config, pins) are missing or unusable is not:
// the agent starts with an Unavailable policy set, judges every image
// pending, and loads the files when they appear. unusable says why.
func startSettings(path string) (settings *Settings, unusable, err error) {
	cfg, err := config.LoadStatic(path)
	if err != nil {
		return nil, nil, err
	}
	if unusable = cfg.Validate(); unusable == nil { // now with the files
		settings, unusable = settingsFor(cfg)
		if unusable == nil {
			return settings, nil, nil
		}
	} else {
		unusable = fmt.Errorf("config %s: %w", path, unusable)
	}
	p, err := pins.LoadFiles(cfg.Pins)
	if err != nil {
		p = nil // pending anyway; the pins load with the rest
	}
	return &Settings{Config: cfg, Policies: policy.Unavailable(unusable), Pins: p}, unusable, nil
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

// Run runs the agent until ctx is done. A config that does not parse or
// validate is a ConfigError; one whose named files (keys, trusted root,
// docker config, pins) are missing or unusable is not: the agent starts,
// reports it, judges every image pending and loads them when they appear.
func Run(ctx context.Context, configPath, version string, logger *slog.Logger) error {
	s, unusable, err := startSettings(configPath)
	if err != nil {
		return ConfigError{err}
	}
	cfg := s.Config
	kube, err := kubeClient(cfg.Kubernetes)
	if err != nil {
		return ConfigError{err}
	}
	rt, err := cri.Dial(ctx, cfg.RuntimeEndpoint, cfg.ContainerdNamespace)
	if err != nil {
		return fmt.Errorf("runtime %s: %w", cfg.RuntimeEndpoint, err)
	}
	defer rt.Close()
	m := metrics.New(version, cfg.MaxProblemSeries)
	inv := inventory.New(rt, logger.With("component", "inventory"),
		inventory.WithResyncInterval(cfg.ResyncInterval.Duration), inventory.WithObserver(m))
	// The verifiers of this run (and of every reload) read pod pull secrets
	// through the one Kubernetes client, for the pods the inventory sees.
	var tune []func(*verify.Options)
	if kube != nil {
		ps := newPullSecrets(kube, inv, logger.With("component", "pullsecrets"))
		tune = append(tune, func(o *verify.Options) { o.PullSecrets = ps })
	}
	verifier, err := NewVerifier(cfg, logger.With("component", "verify"), tune...)
	if err != nil {
		// The docker config is missing or broken: no credentials until it
		// loads, and nothing is verified meanwhile.
		if unusable == nil {
			unusable = err
			s.Policies = policy.Unavailable(err)
		}
		anon := *cfg
		anon.Registries.DockerConfig = ""
		anon.Registries.CredentialProviderConfig, anon.Registries.CredentialProviderBinDir = "", ""
		if verifier, err = NewVerifier(&anon, logger.With("component", "verify"), tune...); err != nil {
			return ConfigError{err}
		}
	}
	if unusable == nil {
		m.ConfigReload(true)
	} // else a.refused reports it below

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
	if unusable == nil {
		vc.InvalidateExcept(fingerprints(s.Policies))
	} // else: nothing is judged from the cache until the files load

	creds := &liveCredentials{}
	creds.v.Store(verifier)
	j := judge.New(s.Policies, verifier,
		judge.WithCache(vc, cfg.Cache.VerifiedTTL.Duration, cfg.Cache.FailedTTL.Duration), judge.WithObserver(m))

	rep, err := newReporter(cfg, kube, logger.With("component", "report"), report.WithHoldObserver(m.QuarantineHeldBack))
	if err != nil {
		return ConfigError{err}
	}
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
			Credentials: creds, Observer: m}
		if rep != nil {
			popts.Events = rep
		}
		pf = prefetch.New(j, rt, logger.With("component", "prefetch"), popts)
		pf.SetPins(s.Pins)
	}

	a := &agent{log: logger, path: configPath, cur: s, judge: j, cache: vc, loop: lp, metrics: m, report: rep, prefetch: pf,
		creds: creds, verifierKey: verifierKey(cfg, unusable), tune: tune}
	if unusable != nil {
		a.refused(unusable)
	}
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

	creds *liveCredentials // the current verifier's credentials, for prefetch
	// tune is applied to every verifier built (pod pull secrets).
	tune []func(*verify.Options)
	// verifierKey identifies the registry settings and docker config content
	// the current verifier was built from; only the reload goroutine uses it.
	verifierKey string

	mu  sync.Mutex // guards cur and tried
	cur *Settings
	// tried is the last config that parsed, good or not: the files it names
	// are watched too, so that a missing key is picked up when it appears.
	tried *config.Config
}

// watchedFiles is the config file and every file named by the current and
// the last tried config.
func (a *agent) watchedFiles() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	files := append([]string{a.path}, a.cur.Config.Files()...)
	if a.tried != nil {
		files = append(files, a.tried.Files()...)
	}
	return files
}

// refused reports a config that cannot be used: log, metric, ConfigInvalid.
func (a *agent) refused(err error) {
	a.metrics.ConfigReload(false)
	a.mu.Lock()
	waiting := a.cur.Policies.Err() != nil
	a.mu.Unlock()
	msg := "config refused, the last good config and pins stay in force"
	if waiting {
		msg = "config unusable, every image stays pending until it loads"
	}
	a.log.Error(msg, "err", err)
	if a.report != nil {
		a.report.Event(corev1.EventTypeWarning, verdict.EventConfigInvalid, msg+": "+err.Error())
	}
}

// reload loads the config and the files it names again. A broken file is
// refused whole: the last good settings stay in force.
func (a *agent) reload() {
	defer func() {
		if err := a.watcher.Set(a.watchedFiles()); err != nil {
			a.log.Warn("watching the files named by the config", "err", err)
		}
	}()
	if cfg, err := config.LoadStatic(a.path); err == nil {
		a.mu.Lock()
		a.tried = cfg
		a.mu.Unlock()
	}
	s, err := LoadSettings(a.path)
	if err != nil {
		a.refused(err)
		return
	}
	if key := verifierKey(s.Config, nil); key != a.verifierKey {
		v, err := NewVerifier(s.Config, a.log.With("component", "verify"), a.tune...)
		if err != nil {
			a.refused(err)
			return
		}
		a.judge.SetVerifier(v)
		a.creds.v.Store(v)
		a.verifierKey = key
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
	a.loop.Rejudge()
	a.log.Info("config reloaded", "policies", len(s.Config.Policies), "pins", len(s.Pins), "invalidatedVerdicts", dropped)
}

// liveCredentials answers with the credentials of the current verifier,
// which a reload replaces when the docker config changes.
type liveCredentials struct {
	v atomic.Pointer[verify.Verifier]
}

// Credentials implements prefetch.Credentials.
func (c *liveCredentials) Credentials(host string) (authn.AuthConfig, bool) {
	return c.v.Load().Credentials(host)
}

// verifierKey identifies what a verifier is built from: the registry
// settings and the content of the docker config and the credential provider
// config ("" when one cannot be read).
func verifierKey(cfg *config.Config, unusable error) string {
	if unusable != nil {
		return "" // built without the files: any loadable config differs
	}
	b, _ := json.Marshal(cfg.Registries) // plain struct: cannot fail
	h := sha256.Sum256(b)
	key := hex.EncodeToString(h[:])
	for _, f := range []string{cfg.Registries.DockerConfig, cfg.Registries.CredentialProviderConfig} {
		if f == "" {
			continue
		}
		fh, err := config.FileHash(f)
		if err != nil {
			return ""
		}
		key += "/" + fh
	}
	return key
}

// restartOnly lists the keys that changed but are only read at start-up.
// Values are compared deeply: some are slices or structs holding slices.
func restartOnly(old, cur *config.Config) []string {
	var keys []string
	check := func(name string, a, b any) {
		if differs(a, b) {
			keys = append(keys, name)
		}
	}
	check("runtimeEndpoint", old.RuntimeEndpoint, cur.RuntimeEndpoint)
	check("nodeName", old.NodeName, cur.NodeName)
	check("containerdNamespace", old.ContainerdNamespace, cur.ContainerdNamespace)
	check("stateDir", old.StateDir, cur.StateDir)
	check("metricsAddress", old.MetricsAddress, cur.MetricsAddress)
	check("statusAddress", old.StatusAddress, cur.StatusAddress)
	check("resyncInterval", old.ResyncInterval, cur.ResyncInterval)
	check("maxProblemSeries", old.MaxProblemSeries, cur.MaxProblemSeries)
	check("cache", old.Cache, cur.Cache)
	check("prefetch", old.Prefetch, cur.Prefetch)
	// registries (and the docker config's content) take effect on reload:
	// the verifier is rebuilt. kubernetes.* too, but for these two.
	check("kubernetes.enabled", old.Kubernetes.Enabled, cur.Kubernetes.Enabled)
	check("kubernetes.kubeconfig", old.Kubernetes.Kubeconfig, cur.Kubernetes.Kubeconfig)
	return keys
}

// differs compares two config values of any type, slices and structs
// holding slices included (== on those panics).
func differs(a, b any) bool { return !reflect.DeepEqual(a, b) }

// probes serves /metrics, /healthz (the agent itself answers) and /readyz
// (after the first full list, and not while the runtime has been unreachable
// for longer than runtimeDownGrace; see readiness).
func probes(m *metrics.Metrics, rt runtimeState) http.Handler {
	ready := &readiness{rt: rt, grace: runtimeDownGrace}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.Registry(), promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready.check(time.Now()); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
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
