package credprovider

import (
	"net"
	"net/url"
	"path/filepath"
	"strings"
)

// URLsMatch reports whether target (an image reference or registry host,
// without scheme) matches glob the way the kubelet matches matchImages and
// the keys of a plugin's auth map: the same number of dot-separated host
// parts, each matched with filepath.Match (so "*.example.com" matches one
// subdomain level only), the same port (none matches none), and glob's path
// a prefix of target's path.
func URLsMatch(glob, target string) bool {
	g, err := url.Parse("https://" + glob)
	if err != nil {
		return false
	}
	t, err := url.Parse("https://" + target)
	if err != nil {
		return false
	}
	gParts, gPort := splitHost(g.Host)
	tParts, tPort := splitHost(t.Host)
	if gPort != tPort || len(gParts) != len(tParts) {
		return false
	}
	if !strings.HasPrefix(t.Path, g.Path) {
		return false
	}
	for i, gp := range gParts {
		ok, err := filepath.Match(gp, tParts[i])
		if err != nil || !ok {
			return false
		}
	}
	return true
}

func splitHost(hostport string) ([]string, string) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		host, port = hostport, ""
	}
	return strings.Split(host, "."), port
}
