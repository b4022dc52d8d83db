# pinwarden: `make help` lists the targets.
SHELL   := /bin/bash
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
BIN     := bin/pinwarden
FUZZTIME ?= 10s

.PHONY: help build image test test-unit fuzz demo bench lint clean tools tools-demo

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

build: ## build the static binary bin/pinwarden
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/pinwarden

image: ## build the OCI image (static binary, CA certificates, non-root user) into bin/image (OCI layout) and print its digest
	CGO_ENABLED=0 GOOS=linux $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/image-pinwarden ./cmd/pinwarden
	cd deploy && $(GO) run ./cmd/mkimage -binary $(CURDIR)/bin/image-pinwarden -out $(CURDIR)/bin/image -version $(VERSION) -commit $(COMMIT)

test: build ## unit + integration + e2e tests with -race (real containerd 1.6 and 2.4, registries, cosign); needs root. bench/ runs under make bench
	PINWARDEN_BIN=$(CURDIR)/$(BIN) $(GO) test -race -count=1 -timeout 40m $$($(GO) list ./... | grep -v '/bench$$')
	cd deploy && PINWARDEN_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 20m ./...

test-unit: ## fast tests only (no containerd)
	$(GO) test -race -count=1 -short ./...

fuzz: ## run every fuzz target for FUZZTIME each
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; done

demo: ## run the agent for real: private containerd 1.6, local registry, signed/unsigned/drifted images (builds, timed)
	bash test/demo/demo.sh

bench: build ## run the benchmarks in bench/ and write bench/RESULTS.md
	bash bench/run.sh

lint: ## gofmt and go vet
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	cd deploy && $(GO) vet ./...

tools: ## install what the tests need (Debian packages and Go tools); run as root
	bash .ci/install.sh

tools-demo: ## install only what make demo needs (Debian containerd and docker-registry); run as root
	bash .ci/install.sh demo

clean: ## remove build output
	rm -rf bin
