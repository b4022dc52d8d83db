# For people with Docker: docker build --build-arg VERSION=$(git describe --tags --always) \
#   --build-arg COMMIT=$(git rev-parse --short HEAD) -t pinwarden .
# Without Docker, `make image` builds the same image (static binary, CA
# certificates) with go-containerregistry into an OCI layout.
#
# The image's user is non-root (65532). The DaemonSet runs it as uid 0 only
# because containerd's socket is root:root 0660 on most nodes; it drops every
# capability, cannot escalate and has a read-only root filesystem
# (deploy/kubernetes/base/daemonset.yaml, docs/kubernetes.md).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" \
    -o /pinwarden ./cmd/pinwarden

FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=dev
ARG COMMIT=unknown
LABEL org.opencontainers.image.title="pinwarden" \
      org.opencontainers.image.source="https://github.com/pinwarden/pinwarden" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}"
COPY --from=build /pinwarden /pinwarden
USER 65532:65532
ENTRYPOINT ["/pinwarden"]
CMD ["agent", "--config", "/etc/pinwarden/config.yaml"]
