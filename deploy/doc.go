// Package deploy holds pinwarden's deployment files (kustomize base and
// overlays, alert rules, Grafana dashboard, image build); its tests check
// them. It is a module of its own so that the kustomize, Prometheus and
// Grafana libraries its tests use stay out of the agent's module.
package deploy

//go:generate go run ./cmd/deploygen .
