# Static binary on distroless. The agent runs as root only because the CRI
# socket (/run/containerd/containerd.sock) is root-owned on the node; it drops
# every capability, cannot escalate and has a read-only root filesystem.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /pinwarden ./cmd/pinwarden

FROM gcr.io/distroless/static-debian12
COPY --from=build /pinwarden /pinwarden
USER 0:0
ENTRYPOINT ["/pinwarden"]
CMD ["agent", "--config", "/etc/pinwarden/config.yaml"]
