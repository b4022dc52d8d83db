// Package bench holds pinwarden's end-to-end benchmarks: the real binary
// against a private containerd, loopback registries and the cosign CLI. The
// tests run only with PINWARDEN_BENCH=1 (bench/run.sh sets it and writes
// bench/RESULTS.md); without it they skip, so `go test ./...` stays fast.
package bench
