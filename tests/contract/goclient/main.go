// Command goclient calls tether's control plane through the Go stubs published in
// github.com/linkerd/linkerd2-proxy-api (an implementation of the wire contract that tether does not
// share code with) and prints every message it decodes as one JSON line (protojson, proto field
// names). It exists to prove tether's API is the same contract on the wire.
//
//	goclient -addr 127.0.0.1:8086 -call get -path web.ns.svc.cluster.local:80 -n 1
//	goclient -addr ... -call profile|outbound|inbound|certify ...
//	goclient -call serve -listen 127.0.0.1:8086 -answers answers.json   (a fixed-answer server)
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pbdst "github.com/linkerd/linkerd2-proxy-api/go/destination"
	pbid "github.com/linkerd/linkerd2-proxy-api/go/identity"
	pbin "github.com/linkerd/linkerd2-proxy-api/go/inbound"
	pbnet "github.com/linkerd/linkerd2-proxy-api/go/net"
	pbout "github.com/linkerd/linkerd2-proxy-api/go/outbound"
)

var marshal = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: false}

func emit(m proto.Message) {
	b, err := marshal.Marshal(m)
	if err != nil {
		fail("encode: %v", err)
	}
	// protojson output is deliberately unstable in whitespace; re-encode it compactly.
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		fail("re-encode: %v", err)
	}
	out, _ := json.Marshal(v)
	fmt.Println(string(out))
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "goclient: "+format+"\n", args...)
	os.Exit(1)
}

func tcpAddr(hostport string) *pbnet.TcpAddress {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		fail("-target %q: %v", hostport, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		fail("-target %q: bad port", hostport)
	}
	ip := net.ParseIP(host).To4()
	if ip == nil {
		fail("-target %q: only IPv4 addresses are supported here", hostport)
	}
	v := uint32(ip[0])<<24 | uint32(ip[1])<<16 | uint32(ip[2])<<8 | uint32(ip[3])
	return &pbnet.TcpAddress{Ip: &pbnet.IPAddress{Ip: &pbnet.IPAddress_Ipv4{Ipv4: v}}, Port: uint32(p)}
}

type stream[T proto.Message] interface {
	Recv() (T, error)
}

// drain prints up to n messages of a server stream.
func drain[T proto.Message](s stream[T], n int) {
	for i := 0; i < n; i++ {
		m, err := s.Recv()
		if err != nil {
			fail("recv %d: %v", i, err)
		}
		emit(m)
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8086", "control-plane address")
	call := flag.String("call", "", "get | profile | outbound | inbound | certify | serve")
	path := flag.String("path", "", "authority for get/profile/outbound (host:port)")
	target := flag.String("target", "", "ip:port target for outbound (instead of -path)")
	workload := flag.String("workload", "", "workload for inbound (and source for outbound)")
	port := flag.Uint("port", 0, "port for inbound")
	identity := flag.String("identity", "", "identity name for certify")
	tokenFile := flag.String("token-file", "", "token for certify")
	spiffe := flag.String("spiffe", "", "certify: a URI SAN to put in the CSR as well (spiffe://td/ns/NS/sa/SA)")
	n := flag.Int("n", 1, "stream messages to print before exiting")
	timeout := flag.Duration("timeout", 10*time.Second, "overall deadline")
	listen := flag.String("listen", "127.0.0.1:0", "serve: listen address")
	answersFile := flag.String("answers", "", "serve: JSON file of fixed answers")
	flag.Parse()

	if *call == "serve" {
		serve(*listen, *answersFile)
		return
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail("dial %s: %v", *addr, err)
	}
	defer conn.Close()

	switch *call {
	case "get":
		s, err := pbdst.NewDestinationClient(conn).Get(ctx, &pbdst.GetDestination{Scheme: "k8s", Path: *path})
		if err != nil {
			fail("Get: %v", err)
		}
		drain(s, *n)
	case "profile":
		s, err := pbdst.NewDestinationClient(conn).GetProfile(ctx, &pbdst.GetDestination{Scheme: "k8s", Path: *path})
		if err != nil {
			fail("GetProfile: %v", err)
		}
		drain(s, *n)
	case "outbound":
		spec := &pbout.TrafficSpec{SourceWorkload: *workload}
		if *target != "" {
			spec.Target = &pbout.TrafficSpec_Addr{Addr: tcpAddr(*target)}
		} else {
			spec.Target = &pbout.TrafficSpec_Authority{Authority: *path}
		}
		s, err := pbout.NewOutboundPoliciesClient(conn).Watch(ctx, spec)
		if err != nil {
			fail("Watch: %v", err)
		}
		drain(s, *n)
	case "inbound":
		s, err := pbin.NewInboundServerPoliciesClient(conn).WatchPort(ctx, &pbin.PortSpec{Workload: *workload, Port: uint32(*port)})
		if err != nil {
			fail("WatchPort: %v", err)
		}
		drain(s, *n)
	case "certify":
		token, err := os.ReadFile(*tokenFile)
		if err != nil {
			fail("-token-file: %v", err)
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			fail("key: %v", err)
		}
		tmpl := &x509.CertificateRequest{Subject: pkix.Name{CommonName: *identity}, DNSNames: []string{*identity}}
		if *spiffe != "" {
			u, err := url.Parse(*spiffe)
			if err != nil {
				fail("-spiffe: %v", err)
			}
			tmpl.URIs = []*url.URL{u}
		}
		csr, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
		if err != nil {
			fail("csr: %v", err)
		}
		rsp, err := pbid.NewIdentityClient(conn).Certify(ctx, &pbid.CertifyRequest{
			Identity: *identity, Token: token, CertificateSigningRequest: csr,
		})
		if err != nil {
			fail("Certify: %v", err)
		}
		leaf, err := x509.ParseCertificate(rsp.LeafCertificate)
		if err != nil {
			fail("leaf: %v", err)
		}
		out, _ := json.Marshal(map[string]any{
			"leaf_dns_names":   leaf.DNSNames,
			"leaf_uris":        fmt.Sprint(leaf.URIs),
			"intermediates":    len(rsp.IntermediateCertificates),
			"valid_until_unix": rsp.ValidUntil.AsTime().Unix(),
			"leaf_not_after":   leaf.NotAfter.Unix(),
		})
		fmt.Println(string(out))
	default:
		fail("-call: want get, profile, outbound, inbound or certify, got %q", *call)
	}
}
