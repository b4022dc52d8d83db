// Command credhelper is a docker-credential-* helper for tests, speaking the
// docker-credential-helpers protocol (get/store/erase/list; the server URL or
// a JSON credential on stdin). Its store is the JSON file "store.json" beside
// the binary ({"server": {"Username": "u", "Secret": "s"}}), and every call
// appends "ACTION SERVER" to "calls.log" there, so tests can count calls.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

type cred struct {
	Username string `json:"Username"`
	Secret   string `json:"Secret"`
}

func main() {
	if err := run(); err != nil {
		fmt.Println(err.Error())
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) != 2 {
		return errors.New("usage: docker-credential-fake get|store|erase|list")
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	dir := filepath.Dir(exe)
	storePath := filepath.Join(dir, "store.json")
	store := map[string]cred{}
	if b, err := os.ReadFile(storePath); err == nil {
		if err := json.Unmarshal(b, &store); err != nil {
			return err
		}
	}
	in, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	server := strings.TrimSpace(string(in))
	if f, err := os.OpenFile(filepath.Join(dir, "calls.log"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600); err == nil {
		fmt.Fprintf(f, "%s %s\n", os.Args[1], server)
		f.Close()
	}
	switch os.Args[1] {
	case "get":
		c, ok := store[server]
		if !ok {
			return errors.New("credentials not found in native keychain")
		}
		return json.NewEncoder(os.Stdout).Encode(map[string]string{"ServerURL": server, "Username": c.Username, "Secret": c.Secret})
	case "list":
		out := map[string]string{}
		for k, c := range store {
			out[k] = c.Username
		}
		return json.NewEncoder(os.Stdout).Encode(out)
	default:
		return fmt.Errorf("%s: not supported by the fake", os.Args[1])
	}
}
