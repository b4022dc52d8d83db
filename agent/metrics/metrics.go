// Package metrics defines every Prometheus metric pinwarden exports, on a
// registry of its own. Names and labels are part of the CONTRACT: dashboards
// and alert rules depend on them.
//
// Event-style metrics (counters, histograms) are updated by the components as
// things happen. State-style metrics (images by verdict, problems, tag
// digests, running containers) are computed from the last published node
// state at the first scrape that follows it, so an idle agent spends no CPU
// on them.
package metrics

import (
	"cmp"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/pinwarden/pinwarden/agent/nodestate"
	"github.com/pinwarden/pinwarden/agent/verdict"
)

const namespace = "pinwarden"

// Problem kinds, the values of the `problem` label: the problem verdicts,
// and drifted.
const (
	problemUnverified = string(verdict.Unverified)
	problemUntrusted  = string(verdict.Untrusted)
	problemPending    = string(verdict.Pending)
	problemDrifted    = "drifted"
)

// problem is one series of pinwarden_image_problems.
type problem struct {
	image   string // repo:tag or repo
	digest  string
	problem string // one of the Problem* constants
	reason  string
	running bool
}

// tagDigest is one series of pinwarden_tag_digest.
type tagDigest struct {
	image  string // repo:tag
	digest string
}

// view is the metrics' view of a node state.
type view struct {
	images   map[verdict.Verdict]int
	running  map[verdict.Verdict]int
	drifted  int // drifted pinned tags
	problems []problem
	tags     []tagDigest // pinned tags and tags of running images
}

// viewOf derives the state-style metrics from a node state: one verdict
// problem per problem image, one drift problem per drifted pinned tag.
func viewOf(s *nodestate.State) *view {
	v := &view{images: map[verdict.Verdict]int{}, running: map[verdict.Verdict]int{}}
	for i := range s.Images {
		im := &s.Images[i]
		running := im.Running > 0
		v.images[im.Result.Verdict]++
		v.running[im.Result.Verdict] += im.Running
		if im.Problem() {
			v.problems = append(v.problems, problem{image: im.Name, digest: im.Digest,
				problem: string(im.Result.Verdict), reason: im.Result.Reason, running: running})
		}
		for _, tag := range im.Tags {
			if running || im.Pinned(tag) {
				v.tags = append(v.tags, tagDigest{image: tag, digest: im.Digest})
			}
		}
		for _, p := range im.Pins {
			if p.Drifted(im.Digest) {
				v.drifted++
				v.problems = append(v.problems, problem{image: p.Tag, digest: im.Digest,
					problem: problemDrifted, reason: verdict.ReasonPinMismatch, running: running})
			}
		}
	}
	return v
}

// knownTopics bounds the topic label of pinwarden_runtime_events_total.
var knownTopics = map[string]bool{"/images/create": true, "/images/update": true, "/images/delete": true,
	"/tasks/start": true, "/tasks/exit": true, "/tasks/delete": true, "/containers/create": true, "/containers/delete": true}

// Metrics holds every metric. Create it with New; the zero value is unusable.
type Metrics struct {
	reg       *prometheus.Registry
	maxSeries int
	state     atomic.Pointer[published]

	runtimeUp        prometheus.Gauge
	runtimeEvents    *prometheus.CounterVec
	resyncs          prometheus.Counter
	lastResync       prometheus.Gauge
	verifications    *prometheus.CounterVec
	verifyDuration   prometheus.Histogram
	prefetch         *prometheus.CounterVec
	prefetchDuration prometheus.Histogram
	prefetchPending  prometheus.Gauge
	reloads          *prometheus.CounterVec
	lastReloadOK     prometheus.Gauge
	cacheWriteErrors prometheus.Counter
	cacheCorrupt     prometheus.Counter
	cacheLookups     *prometheus.CounterVec
	repairs          prometheus.Counter
	queueDropped     prometheus.Counter
	queueDepth       prometheus.Gauge
	quarantineHeld   prometheus.Gauge

	imagesDesc, problemsDesc, droppedDesc, driftedDesc, tagDesc, runningDesc *prometheus.Desc
}

// New registers every metric on a fresh registry. maxProblemSeries caps
// pinwarden_image_problems and pinwarden_tag_digest.
func New(version string, maxProblemSeries int) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), maxSeries: maxProblemSeries}
	f := func(name string) string { return prometheus.BuildFQName(namespace, "", name) }
	m.runtimeUp = prometheus.NewGauge(prometheus.GaugeOpts{Name: f("runtime_up"),
		Help: "1 while the container runtime's CRI and event stream are connected."})
	m.runtimeEvents = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("runtime_events_total"),
		Help: "Runtime image, task and container events received, by topic."}, []string{"topic"})
	m.resyncs = prometheus.NewCounter(prometheus.CounterOpts{Name: f("resyncs_total"),
		Help: "Full relists of the runtime's images and containers."})
	m.lastResync = prometheus.NewGauge(prometheus.GaugeOpts{Name: f("last_resync_timestamp_seconds"),
		Help: "Unix time of the last successful full relist."})
	m.verifications = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("verifications_total"),
		Help: "Verifications of image digests, by result and by where the answer came from."}, []string{"result", "source"})
	m.verifyDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: f("verification_duration_seconds"),
		Help:    "Time to verify one image digest against the registry.",
		Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}})
	m.prefetch = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("prefetch_total"),
		Help: "Prefetch outcomes of pinned digests."}, []string{"result"})
	m.prefetchDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: f("prefetch_duration_seconds"),
		Help:    "Time to verify and pull one pinned digest.",
		Buckets: []float64{.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300}})
	m.prefetchPending = prometheus.NewGauge(prometheus.GaugeOpts{Name: f("prefetch_pending"),
		Help: "Pinned digests not yet on the node."})
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("config_reloads_total"),
		Help: "Reloads of the config and pin files, by result."}, []string{"result"})
	m.lastReloadOK = prometheus.NewGauge(prometheus.GaugeOpts{Name: f("config_last_reload_success"),
		Help: "1 if the last reload of the config and pin files succeeded."})
	m.cacheWriteErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: f("cache_write_errors_total"),
		Help: "Failed writes to the on-disk verdict cache (verdicts are still kept in memory)."})
	m.cacheCorrupt = prometheus.NewCounter(prometheus.CounterOpts{Name: f("cache_corrupt_total"),
		Help: "Cache files found corrupt, moved aside and rebuilt."})
	m.cacheLookups = prometheus.NewCounterVec(prometheus.CounterOpts{Name: f("cache_lookups_total"),
		Help: "Lookups of the verdict cache, by result: hit (a current verdict) or miss."}, []string{"result"})
	m.repairs = prometheus.NewCounter(prometheus.CounterOpts{Name: f("inventory_repairs_total"),
		Help: "Image digests a periodic relist found changed although no runtime event said so (lost events)."})
	m.queueDropped = prometheus.NewCounter(prometheus.CounterOpts{Name: f("queue_dropped_total"),
		Help: "Digests dropped because the verification queue was full (the next relist re-queues them)."})
	m.quarantineHeld = prometheus.NewGauge(prometheus.GaugeOpts{Name: f("quarantine_held_back"),
		Help: "1 while kubernetes.quarantineMaxUnavailable keeps the quarantine taint off this node."})
	m.queueDepth = prometheus.NewGauge(prometheus.GaugeOpts{Name: f("queue_depth"),
		Help: "Digests waiting for verification."})
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: f("build_info"),
		Help: "Build information; always 1."}, []string{"version", "goversion"})
	buildInfo.WithLabelValues(version, runtime.Version()).Set(1)

	m.imagesDesc = prometheus.NewDesc(f("images"), "Image digests on the node, by verdict.", []string{"verdict"}, nil)
	m.problemsDesc = prometheus.NewDesc(f("image_problems"), "1 per problem image (unverified, untrusted, drifted or pending).",
		[]string{"image", "digest", "problem", "reason", "running"}, nil)
	m.droppedDesc = prometheus.NewDesc(f("image_problems_dropped"), "Problem series not exported because of maxProblemSeries.", nil, nil)
	m.driftedDesc = prometheus.NewDesc(f("drifted_images"), "Pinned tags on the node that point at another digest than their pin.", nil, nil)
	m.tagDesc = prometheus.NewDesc(f("tag_digest"), "1 per pinned or running tag, labelled with the digest it points at on this node.",
		[]string{"image", "digest"}, nil)
	m.runningDesc = prometheus.NewDesc(f("running_containers"), "Running containers, by the verdict of their image.", []string{"verdict"}, nil)

	for _, v := range []string{"/images/create", "/images/update", "/images/delete"} {
		m.runtimeEvents.WithLabelValues(v)
	}
	for _, r := range []string{"verified", "unverified", "untrusted", "error"} {
		for _, s := range []string{"cache", "registry"} {
			m.verifications.WithLabelValues(r, s)
		}
	}
	for _, r := range []string{"pulled", "present", "rejected", "failed"} {
		m.prefetch.WithLabelValues(r)
	}
	for _, r := range []string{"success", "failure"} {
		m.reloads.WithLabelValues(r)
	}
	for _, r := range []string{"hit", "miss"} {
		m.cacheLookups.WithLabelValues(r)
	}
	m.reg.MustRegister(m.runtimeUp, m.runtimeEvents, m.resyncs, m.lastResync, m.verifications, m.verifyDuration,
		m.prefetch, m.prefetchDuration, m.prefetchPending, m.reloads, m.lastReloadOK, m.cacheWriteErrors, m.cacheCorrupt,
		m.cacheLookups, m.repairs, m.queueDropped, m.queueDepth, m.quarantineHeld, buildInfo, stateCollector{m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.Publish(&nodestate.State{})
	return m
}

// published is a published node state whose metrics view is derived, and
// its problem series capped, once, at the first scrape that needs them:
// sorting 10,000 pending problems on every scrape costs more than the scrape.
type published struct {
	state   *nodestate.State
	once    sync.Once
	view    *view // problems capped at maxSeries
	dropped int
}

func (p *published) get(maxSeries int) (*view, int) {
	p.once.Do(func() {
		p.view = viewOf(p.state)
		if n := len(p.view.problems); n > maxSeries {
			p.view.problems = capProblems(p.view.problems, maxSeries)
			p.dropped = n - maxSeries
		}
	})
	return p.view, p.dropped
}

// Registry is the registry to serve on /metrics.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Publish replaces the node state that the state-style metrics are computed
// from. The state must not be modified afterwards.
func (m *Metrics) Publish(s *nodestate.State) { m.state.Store(&published{state: s}) }

// RuntimeUp records whether the runtime is connected.
func (m *Metrics) RuntimeUp(up bool) { m.runtimeUp.Set(b2f(up)) }

// RuntimeEvent counts one runtime event. Unknown topics are counted as "other".
func (m *Metrics) RuntimeEvent(topic string) {
	if !knownTopics[topic] {
		topic = "other"
	}
	m.runtimeEvents.WithLabelValues(topic).Inc()
}

// Resynced records a completed full relist.
func (m *Metrics) Resynced(at time.Time) {
	m.resyncs.Inc()
	m.lastResync.Set(float64(at.UnixNano()) / 1e9)
}

// Verification counts one verification outcome. result is verified,
// unverified, untrusted or error (pending); source is cache or registry.
// A zero duration is not observed (cache hits).
func (m *Metrics) Verification(r verdict.Result, took time.Duration) {
	result := "error"
	switch r.Verdict {
	case verdict.Verified, verdict.Unverified, verdict.Untrusted:
		result = string(r.Verdict)
	case verdict.Ignored:
		return
	}
	source := string(r.Source)
	if source != string(verdict.SourceCache) {
		source = string(verdict.SourceRegistry)
	}
	m.verifications.WithLabelValues(result, source).Inc()
	if source == string(verdict.SourceRegistry) && took > 0 {
		m.verifyDuration.Observe(took.Seconds())
	}
}

// Prefetch counts one prefetch outcome: pulled, present, rejected or failed.
func (m *Metrics) Prefetch(result string, took time.Duration) {
	m.prefetch.WithLabelValues(result).Inc()
	if took > 0 {
		m.prefetchDuration.Observe(took.Seconds())
	}
}

// PrefetchPending sets the number of pinned digests not yet on the node.
func (m *Metrics) PrefetchPending(n int) { m.prefetchPending.Set(float64(n)) }

// ConfigReload records a reload of the config and pin files.
func (m *Metrics) ConfigReload(ok bool) {
	if ok {
		m.reloads.WithLabelValues("success").Inc()
	} else {
		m.reloads.WithLabelValues("failure").Inc()
	}
	m.lastReloadOK.Set(b2f(ok))
}

// CacheWriteError counts a failed write to the on-disk cache.
func (m *Metrics) CacheWriteError() { m.cacheWriteErrors.Inc() }

// CacheCorrupt counts a corrupt cache file moved aside.
func (m *Metrics) CacheCorrupt() { m.cacheCorrupt.Inc() }

// CacheHit counts a lookup that the verdict cache answered.
func (m *Metrics) CacheHit() { m.cacheLookups.WithLabelValues("hit").Inc() }

// CacheMiss counts a lookup that the verdict cache could not answer.
func (m *Metrics) CacheMiss() { m.cacheLookups.WithLabelValues("miss").Inc() }

// RelistRepaired counts digests that a periodic relist found changed
// although no event said so.
func (m *Metrics) RelistRepaired(digests int) { m.repairs.Add(float64(digests)) }

// QuarantineHeldBack records whether the blast-radius guard holds the
// quarantine taint back.
func (m *Metrics) QuarantineHeldBack(held bool) { m.quarantineHeld.Set(b2f(held)) }

// QueueDropped counts a digest dropped from a full queue.
func (m *Metrics) QueueDropped() { m.queueDropped.Inc() }

// QueueDepth sets the number of digests waiting for verification.
func (m *Metrics) QueueDepth(n int) { m.queueDepth.Set(float64(n)) }

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// stateCollector exports the state-style metrics from the published State.
type stateCollector struct{ m *Metrics }

func (c stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.m.imagesDesc, c.m.problemsDesc, c.m.droppedDesc, c.m.driftedDesc, c.m.tagDesc, c.m.runningDesc} {
		ch <- d
	}
}

func (c stateCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.m
	v, dropped := m.state.Load().get(m.maxSeries)
	for _, vd := range verdict.All {
		ch <- prometheus.MustNewConstMetric(m.imagesDesc, prometheus.GaugeValue, float64(v.images[vd]), string(vd))
		ch <- prometheus.MustNewConstMetric(m.runningDesc, prometheus.GaugeValue, float64(v.running[vd]), string(vd))
	}
	ch <- prometheus.MustNewConstMetric(m.driftedDesc, prometheus.GaugeValue, float64(v.drifted))

	for _, p := range v.problems {
		ch <- prometheus.MustNewConstMetric(m.problemsDesc, prometheus.GaugeValue, 1,
			p.image, p.digest, p.problem, p.reason, boolLabel(p.running))
	}
	ch <- prometheus.MustNewConstMetric(m.droppedDesc, prometheus.GaugeValue, float64(dropped))

	tags := v.tags
	if len(tags) > m.maxSeries {
		tags = tags[:m.maxSeries]
	}
	for _, t := range tags {
		ch <- prometheus.MustNewConstMetric(m.tagDesc, prometheus.GaugeValue, 1, t.image, t.digest)
	}
}

// capProblems keeps the n most important problems: running before not
// running, then drifted before the verdict problems, worst verdict first
// (untrusted, unverified, pending), then by image.
func capProblems(ps []problem, n int) []problem {
	out := slices.Clone(ps)
	slices.SortStableFunc(out, func(a, b problem) int {
		return cmp.Or(
			-cmp.Compare(boolInt(a.running), boolInt(b.running)),
			-cmp.Compare(problemSeverity(a.problem), problemSeverity(b.problem)),
			strings.Compare(a.image, b.image))
	})
	return slices.Clone(out[:n]) // not the whole sorted copy
}

// problemSeverity ranks a problem kind: drifted above every verdict, the
// verdicts by verdict.Severity.
func problemSeverity(p string) int {
	if p == problemDrifted {
		return math.MaxInt
	}
	return verdict.Severity(verdict.Verdict(p))
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

func boolLabel(b bool) string {
	if b {
		return "true"
	}
	return "false"
}
