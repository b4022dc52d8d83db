// Command credprovider is a kubelet image credential provider plugin for
// tests. It speaks the real exec protocol (credentialprovider.kubelet.k8s.io/v1:
// a CredentialProviderRequest on stdin, a CredentialProviderResponse on
// stdout) and is driven by the env that the CredentialProviderConfig gives it:
//
//	FAKE_CP_AUTH            JSON {"pattern": {"username": "u", "password": "p"}}
//	FAKE_CP_CACHE_KEY_TYPE  Image, Registry (default) or Global
//	FAKE_CP_CACHE_DURATION  Go duration; unset: no cacheDuration in the answer
//	FAKE_CP_LOG             file that gets one line per request (the request JSON)
//	FAKE_CP_FAIL            non-empty: exit 1 without an answer
//	FAKE_CP_API_VERSION     answer with this apiVersion instead of the request's
//
// Its arguments are appended to the log line, so tests can check args.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "fake credential provider:", err)
		os.Exit(1)
	}
}

func run() error {
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	var req struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Image      string `json:"image"`
	}
	if err := json.Unmarshal(in, &req); err != nil {
		return fmt.Errorf("request: %w", err)
	}
	if req.Kind != "CredentialProviderRequest" || req.Image == "" || !strings.HasPrefix(req.APIVersion, "credentialprovider.kubelet.k8s.io/") {
		return fmt.Errorf("bad request %s", in)
	}
	if p := os.Getenv("FAKE_CP_LOG"); p != "" {
		f, err := os.OpenFile(p, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		fmt.Fprintf(f, "%s %s\n", strings.TrimSpace(string(in)), strings.Join(os.Args[1:], " "))
		f.Close()
	}
	if os.Getenv("FAKE_CP_FAIL") != "" {
		return fmt.Errorf("asked to fail")
	}
	resp := map[string]any{
		"apiVersion":   req.APIVersion,
		"kind":         "CredentialProviderResponse",
		"cacheKeyType": "Registry",
	}
	if v := os.Getenv("FAKE_CP_API_VERSION"); v != "" {
		resp["apiVersion"] = v
	}
	if v := os.Getenv("FAKE_CP_CACHE_KEY_TYPE"); v != "" {
		resp["cacheKeyType"] = v
	}
	if v := os.Getenv("FAKE_CP_CACHE_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return err
		}
		resp["cacheDuration"] = d.String()
	}
	if v := os.Getenv("FAKE_CP_AUTH"); v != "" {
		var auth map[string]any
		if err := json.Unmarshal([]byte(v), &auth); err != nil {
			return fmt.Errorf("FAKE_CP_AUTH: %w", err)
		}
		resp["auth"] = auth
	}
	return json.NewEncoder(os.Stdout).Encode(resp)
}
