package gen

import (
	"encoding/json"
	"fmt"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/common"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
	"github.com/grafana/grafana-foundation-sdk/go/stat"
	"github.com/grafana/grafana-foundation-sdk/go/table"
	"github.com/grafana/grafana-foundation-sdk/go/timeseries"
)

// ds is the Prometheus data source, chosen by the dashboard's variable.
var ds = common.DataSourceRef{Type: cog.ToPtr("prometheus"), Uid: cog.ToPtr("${datasource}")}

// sel is the label selector every panel applies: the nodes picked in the
// dashboard's node variable.
const sel = `node=~"$node"`

func query(expr, legend string) *prometheus.DataqueryBuilder {
	return prometheus.NewDataqueryBuilder().Datasource(ds).Expr(expr).LegendFormat(legend)
}

func series(title, desc, unit string, queries ...*prometheus.DataqueryBuilder) *timeseries.PanelBuilder {
	p := timeseries.NewPanelBuilder().Title(title).Description(desc).Datasource(ds).Unit(unit).Height(8).Span(12)
	for _, q := range queries {
		p = p.WithTarget(q)
	}
	return p
}

func tableOf(title, desc, expr string) *table.PanelBuilder {
	return table.NewPanelBuilder().Title(title).Description(desc).Datasource(ds).Height(8).Span(24).
		WithTarget(prometheus.NewDataqueryBuilder().Datasource(ds).Expr(expr).Instant().Format(prometheus.PromQueryFormatTable)).
		// Show the labels, not Prometheus' time and value columns.
		WithTransformation(dashboard.DataTransformerConfig{Id: "organize", Options: map[string]any{
			"excludeByName": map[string]bool{"Time": true, "Value": true},
		}})
}

func single(title, desc, expr string) *stat.PanelBuilder {
	return stat.NewPanelBuilder().Title(title).Description(desc).Datasource(ds).Height(4).Span(6).
		WithTarget(prometheus.NewDataqueryBuilder().Datasource(ds).Expr(expr).Instant())
}

// Dashboard renders pinwarden's Grafana dashboard as indented JSON.
func Dashboard() ([]byte, error) {
	b := dashboard.NewDashboardBuilder("pinwarden").
		Uid("pinwarden").
		Description("Image verdicts, problems and the agent's health on every node (pinwarden's metrics).").
		Tags([]string{"pinwarden", "supply-chain"}).
		Refresh("1m").
		Time("now-6h", "now").
		Timezone(common.TimeZoneBrowser).
		WithVariable(dashboard.NewDatasourceVariableBuilder("datasource").Label("Data source").Type("prometheus")).
		WithVariable(dashboard.NewQueryVariableBuilder("node").Label("Node").
			Datasource(ds).
			Query(dashboard.StringOrMap{String: cog.ToPtr("label_values(pinwarden_build_info, node)")}).
			Refresh(dashboard.VariableRefreshOnTimeRangeChanged).
			Multi(true).IncludeAll(true).AllValue(".*")).
		WithRow(dashboard.NewRowBuilder("Now")).
		WithPanel(single("Running untrusted or unverified",
			"Running containers whose image is unverified or untrusted.",
			`sum(pinwarden_running_containers{`+sel+`, verdict=~"unverified|untrusted"}) or vector(0)`)).
		WithPanel(single("Drifted pinned tags", "Pinned tags that point at another digest than their pin.",
			`sum(pinwarden_drifted_images{`+sel+`}) or vector(0)`)).
		WithPanel(single("Tags split across the fleet", "Tags seen at more than one digest across the nodes.",
			`count(count by (image) (count by (image, digest) (pinwarden_tag_digest)) > 1) or vector(0)`)).
		WithPanel(single("Runtime unreachable", "Nodes whose agent cannot reach the container runtime.",
			`count(pinwarden_runtime_up{`+sel+`} == 0) or vector(0)`)).
		WithPanel(tableOf("Problem images",
			"One row per problem image and node: unverified, untrusted, drifted or pending, with the reason.",
			`max by (node, image, digest, problem, reason, running) (pinwarden_image_problems{`+sel+`})`)).
		WithPanel(tableOf("Tags at several digests",
			"Tags that point at different digests on different nodes (fleet divergence).",
			`count by (image, digest) (pinwarden_tag_digest) and on (image) (count by (image) (count by (image, digest) (pinwarden_tag_digest)) > 1)`)).
		WithRow(dashboard.NewRowBuilder("Verdicts")).
		WithPanel(series("Image verdicts per node", "Image digests on each node, by verdict.", "short",
			query(`sum by (node, verdict) (pinwarden_images{`+sel+`})`, "{{node}} {{verdict}}"))).
		WithPanel(series("Running containers by verdict", "Running containers, by the verdict of their image.", "short",
			query(`sum by (verdict) (pinwarden_running_containers{`+sel+`})`, "{{verdict}}"))).
		WithPanel(series("Verifications by result", "Verifications per second, by result and by where the answer came from.", "ops",
			query(`sum by (result, source) (rate(pinwarden_verifications_total{`+sel+`}[$__rate_interval]))`, "{{result}} ({{source}})"))).
		WithPanel(series("Pull to verdict: registry verification latency",
			"Time to verify one digest against the registry, the part of pull-to-verdict that is not a cache hit.", "s",
			query(`histogram_quantile(0.5, sum by (le) (rate(pinwarden_verification_duration_seconds_bucket{`+sel+`}[$__rate_interval])))`, "p50"),
			query(`histogram_quantile(0.99, sum by (le) (rate(pinwarden_verification_duration_seconds_bucket{`+sel+`}[$__rate_interval])))`, "p99"))).
		WithRow(dashboard.NewRowBuilder("Prefetch")).
		WithPanel(series("Prefetch outcomes", "Pinned digests prefetched per second, by outcome.", "ops",
			query(`sum by (result) (rate(pinwarden_prefetch_total{`+sel+`}[$__rate_interval]))`, "{{result}}"))).
		WithPanel(series("Prefetch pending and duration", "Pinned digests not yet on the node; p99 time to verify and pull one.", "short",
			query(`sum by (node) (pinwarden_prefetch_pending{`+sel+`})`, "{{node}} pending"),
			query(`histogram_quantile(0.99, sum by (le) (rate(pinwarden_prefetch_duration_seconds_bucket{`+sel+`}[$__rate_interval])))`, "p99 seconds"))).
		WithRow(dashboard.NewRowBuilder("Agent health")).
		WithPanel(series("Runtime up", "1 while the agent is connected to the container runtime.", "short",
			query(`min by (node) (pinwarden_runtime_up{`+sel+`})`, "{{node}}")).Min(0).Max(1)).
		WithPanel(series("Config reloads", "Reloads of the config and pin files, by result; a failure keeps the last good config.", "short",
			query(`sum by (node, result) (increase(pinwarden_config_reloads_total{`+sel+`}[$__rate_interval]))`, "{{node}} {{result}}"),
			query(`min by (node) (pinwarden_config_last_reload_success{`+sel+`})`, "{{node}} last reload ok"))).
		WithPanel(series("Dropped series and work", "Problem series not exported (maxProblemSeries) and digests dropped from the full verification queue.", "short",
			query(`sum by (node) (pinwarden_image_problems_dropped{`+sel+`})`, "{{node}} problem series dropped"),
			query(`sum by (node) (increase(pinwarden_queue_dropped_total{`+sel+`}[$__rate_interval]))`, "{{node}} queue drops"))).
		WithPanel(series("Verification queue and resyncs", "Digests waiting for verification; full relists of the runtime.", "short",
			query(`sum by (node) (pinwarden_queue_depth{`+sel+`})`, "{{node}} queued"),
			query(`sum by (node) (increase(pinwarden_resyncs_total{`+sel+`}[$__rate_interval]))`, "{{node}} resyncs"))).
		WithPanel(series("Agent memory", "Resident memory of each agent (the DaemonSet limit is 160 MiB).", "bytes",
			query(`max by (node) (process_resident_memory_bytes{job="pinwarden", `+sel+`})`, "{{node}}")))
	d, err := b.Build()
	if err != nil {
		return nil, fmt.Errorf("build dashboard: %w", err)
	}
	out, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("render dashboard: %w", err)
	}
	return append(out, '\n'), nil
}
