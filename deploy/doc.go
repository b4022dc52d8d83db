// Package deploy holds pinwarden's deployment files (Kubernetes manifests,
// Dockerfile, Prometheus alert rules); its tests check them.
package deploy
