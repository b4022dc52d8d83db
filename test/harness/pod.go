package harness

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The CRI labels kubelet puts on sandboxes and containers.
const (
	LabelPodName       = "io.kubernetes.pod.name"
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodUID        = "io.kubernetes.pod.uid"
	LabelContainerName = "io.kubernetes.container.name"
)

// pauseSource is the whole program of the sandbox and test images: it waits
// for SIGTERM (or SIGINT) and exits 0.
const pauseSource = `package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	<-c
}
`

// PauseBinary builds the static pause program into a temporary directory of
// t and returns its path (the Go build cache makes later builds cheap).
func PauseBinary(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range map[string]string{
		"main.go": pauseSource,
		"go.mod":  "module pinwarden.test/pause\n\ngo 1.22\n",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	bin := filepath.Join(dir, "pause")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOFLAGS=-mod=mod", "GOWORK=off")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build pause: %v\n%s", err, out)
	}
	return bin
}

// RunnableImage builds a linux/amd64 image whose entrypoint is the pause
// program (bin, from PauseBinary): a container of it runs until stopped.
// Every call returns a different image (a random label), so each has its own
// digest.
func RunnableImage(t testing.TB, bin string) v1.Image {
	t.Helper()
	prog, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "pause", Mode: 0o755, Size: int64(len(prog)), Typeflag: tar.TypeReg,
		ModTime: time.Unix(0, 0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(prog); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf.Bytes())), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	nonce := make([]byte, 8)
	_, _ = rand.Read(nonce)
	cf.Config.Entrypoint = []string{"/pause"}
	cf.Config.Labels = map[string]string{"pinwarden.test/nonce": hex.EncodeToString(nonce)}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// PushRunnableImage pushes a new RunnableImage to ref and returns its
// manifest digest.
func PushRunnableImage(t testing.TB, ref, pauseBin string) string {
	t.Helper()
	return PushImage(t, ref, RunnableImage(t, pauseBin))
}

// Pod is a pod sandbox with one running container, made by RunPod.
type Pod struct {
	Namespace, Name, UID string
	SandboxID            string
	ContainerID          string
	Image                string
}

// Pods runs real pods on one containerd through CRI, the way the kubelet
// does: sandbox (host network) and container, both with the kubelet's
// labels, and, when kube is set, a matching Pod object bound to node in the
// API server. The containerd must have been started WithSandboxImage (see
// PauseImage) and reach the images' registry.
type Pods struct {
	t       testing.TB
	kube    *Kube
	node    string
	logDir  string
	runtime runtimeapi.RuntimeServiceClient
	images  runtimeapi.ImageServiceClient
}

// NewPods returns a pod runner on c; kube may be nil (no Pod objects).
func NewPods(t testing.TB, c *Containerd, kube *Kube, node string) *Pods {
	t.Helper()
	conn, err := grpc.NewClient(c.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &Pods{t: t, kube: kube, node: node, logDir: t.TempDir(),
		runtime: runtimeapi.NewRuntimeServiceClient(conn), images: runtimeapi.NewImageServiceClient(conn)}
}

// PauseImage pushes the pause program as the sandbox image to the registry
// at host (host:port) and returns its reference, for WithSandboxImage.
func PauseImage(t testing.TB, host, pauseBin string) string {
	t.Helper()
	ref := host + "/pinwarden-test/pause:1"
	PushImage(t, ref, RunnableImage(t, pauseBin))
	return ref
}

// PodOption configures RunPod.
type PodOption func(*podOptions)

type podOptions struct {
	auth        *runtimeapi.AuthConfig
	pullSecrets []corev1.LocalObjectReference
}

// WithPullSecret pulls the image with user and password, as the kubelet
// does with a pod's pull secret, and names the secret (see
// Kube.PullSecret) in the Pod object's spec.imagePullSecrets.
func WithPullSecret(secret, user, password string) PodOption {
	return func(o *podOptions) {
		o.auth = &runtimeapi.AuthConfig{Username: user, Password: password}
		o.pullSecrets = append(o.pullSecrets, corev1.LocalObjectReference{Name: secret})
	}
}

// RunPod pulls image, creates the Pod object (when the runner has a Kube),
// then runs the sandbox and a container "main" of image, and waits until
// CRI reports the container running. The pod is stopped and removed when
// the test ends.
func (p *Pods) RunPod(ctx context.Context, image, namespace, name string, opts ...PodOption) *Pod {
	p.t.Helper()
	var o podOptions
	for _, opt := range opts {
		opt(&o)
	}
	if _, err := p.images.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: image}, Auth: o.auth}); err != nil {
		p.t.Fatalf("pull %s: %v", image, err)
	}
	pod := &Pod{Namespace: namespace, Name: name, Image: image}
	if p.kube != nil {
		obj, err := p.kube.Client().CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace},
			Spec: corev1.PodSpec{
				NodeName:         p.node,
				HostNetwork:      true,
				Containers:       []corev1.Container{{Name: "main", Image: image}},
				ImagePullSecrets: o.pullSecrets,
			},
		}, metav1.CreateOptions{})
		if err != nil {
			p.t.Fatalf("create pod %s/%s: %v", namespace, name, err)
		}
		pod.UID = string(obj.UID)
	} else {
		pod.UID = namespace + "-" + name
	}
	labels := map[string]string{LabelPodName: name, LabelPodNamespace: namespace, LabelPodUID: pod.UID}
	nsOpts := &runtimeapi.NamespaceOption{Network: runtimeapi.NamespaceMode_NODE}
	sbCfg := &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: namespace, Uid: pod.UID},
		LogDirectory: filepath.Join(p.logDir, namespace+"_"+name),
		Labels:       labels,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{NamespaceOptions: nsOpts},
		},
	}
	sb, err := p.runtime.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: sbCfg})
	if err != nil {
		p.t.Fatalf("run sandbox %s/%s: %v", namespace, name, err)
	}
	pod.SandboxID = sb.GetPodSandboxId()
	p.t.Cleanup(func() { p.remove(pod) })
	ctLabels := map[string]string{LabelContainerName: "main"}
	for k, v := range labels {
		ctLabels[k] = v
	}
	ct, err := p.runtime.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{
		PodSandboxId: pod.SandboxID,
		Config: &runtimeapi.ContainerConfig{
			Metadata: &runtimeapi.ContainerMetadata{Name: "main"},
			Image:    &runtimeapi.ImageSpec{Image: image},
			Labels:   ctLabels,
			LogPath:  "main.log",
			Linux: &runtimeapi.LinuxContainerConfig{
				SecurityContext: &runtimeapi.LinuxContainerSecurityContext{NamespaceOptions: nsOpts},
			},
		},
		SandboxConfig: sbCfg,
	})
	if err != nil {
		p.t.Fatalf("create container in %s/%s: %v", namespace, name, err)
	}
	pod.ContainerID = ct.GetContainerId()
	if _, err := p.runtime.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: pod.ContainerID}); err != nil {
		p.t.Fatalf("start container in %s/%s: %v", namespace, name, err)
	}
	Eventually(p.t, 30*time.Second, "container running", func() (bool, string) {
		st, err := p.runtime.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: pod.ContainerID})
		if err != nil {
			return false, err.Error()
		}
		return st.GetStatus().GetState() == runtimeapi.ContainerState_CONTAINER_RUNNING, st.GetStatus().GetState().String()
	})
	return pod
}

// StopPod stops the pod's container (it exits on SIGTERM) and waits until CRI
// reports it exited; the sandbox stays until the test ends.
func (p *Pods) StopPod(ctx context.Context, pod *Pod) {
	p.t.Helper()
	if _, err := p.runtime.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: pod.ContainerID, Timeout: 10}); err != nil {
		p.t.Fatalf("stop container of %s/%s: %v", pod.Namespace, pod.Name, err)
	}
}

// remove tears the pod down, ignoring errors (the daemon may be gone).
func (p *Pods) remove(pod *Pod) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if pod.ContainerID != "" {
		_, _ = p.runtime.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: pod.ContainerID, Timeout: 5})
		_, _ = p.runtime.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: pod.ContainerID})
	}
	_, _ = p.runtime.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: pod.SandboxID})
	_, _ = p.runtime.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pod.SandboxID})
}

// String is namespace/name.
func (pod *Pod) String() string { return fmt.Sprintf("%s/%s", pod.Namespace, pod.Name) }
