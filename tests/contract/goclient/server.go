package main

// A fixed-answer Destination server for tether's proxy tests, built on the same published stubs:
//
//	goclient -call serve -listen 127.0.0.1:8086 -answers answers.json
//
// answers.json holds protojson messages by path:
//
//	{"get": {"web.ns.svc.cluster.local:80": [{"add": {...}}]},
//	 "profile": {"web.ns.svc.cluster.local:80": {"routes": [...]}},
//	 "outbound": {"web.ns.svc.cluster.local:80": {...}, "10.0.0.1:80": {...}},
//	 "inbound": {"{\"ns\":\"ns\",\"pod\":\"web-1\"}:8080": {...}}}
//
// Get streams the listed updates (a path not listed gets no_endpoints{exists:false}); GetProfile sends
// the profile (an empty one when not listed); OutboundPolicies.Watch (keyed by authority, or by
// "ip:port" for an address target) and InboundServerPolicies.WatchPort (keyed by "workload:port") send
// their policy, NOT_FOUND when not listed. Streams then stay open until the client leaves.
// Each call is logged to stderr as one JSON line, so a test can see what the proxy asked for.

import (
	"encoding/json"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	pbdst "github.com/linkerd/linkerd2-proxy-api/go/destination"
	pbin "github.com/linkerd/linkerd2-proxy-api/go/inbound"
	pbout "github.com/linkerd/linkerd2-proxy-api/go/outbound"
)

type answers struct {
	Get      map[string][]json.RawMessage `json:"get"`
	Profile  map[string]json.RawMessage   `json:"profile"`
	Outbound map[string]json.RawMessage   `json:"outbound"`
	Inbound  map[string]json.RawMessage   `json:"inbound"`
}

type fixedOutbound struct {
	pbout.UnimplementedOutboundPoliciesServer
	policies map[string]*pbout.OutboundPolicy
}

func outboundKey(spec *pbout.TrafficSpec) string {
	if a := spec.GetAddr(); a != nil {
		v := a.GetIp().GetIpv4()
		return fmt.Sprintf("%d.%d.%d.%d:%d", v>>24, (v>>16)&255, (v>>8)&255, v&255, a.GetPort())
	}
	return spec.GetAuthority()
}

func (s *fixedOutbound) Watch(spec *pbout.TrafficSpec, stream pbout.OutboundPolicies_WatchServer) error {
	key := outboundKey(spec)
	b, _ := json.Marshal(map[string]string{"rpc": "OutboundPolicies.Watch", "target": key})
	fmt.Fprintln(os.Stderr, string(b))
	p, ok := s.policies[key]
	if !ok {
		return status.Errorf(codes.NotFound, "no outbound policy for %s in the answers file", key)
	}
	if err := stream.Send(p); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

type fixedInbound struct {
	pbin.UnimplementedInboundServerPoliciesServer
	servers map[string]*pbin.Server
}

func (s *fixedInbound) WatchPort(spec *pbin.PortSpec, stream pbin.InboundServerPolicies_WatchPortServer) error {
	key := fmt.Sprintf("%s:%d", spec.GetWorkload(), spec.GetPort())
	b, _ := json.Marshal(map[string]string{"rpc": "InboundServerPolicies.WatchPort", "target": key})
	fmt.Fprintln(os.Stderr, string(b))
	srv, ok := s.servers[key]
	if !ok {
		return status.Errorf(codes.NotFound, "no inbound policy for %s in the answers file", key)
	}
	if err := stream.Send(srv); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

type fixedServer struct {
	pbdst.UnimplementedDestinationServer
	get     map[string][]*pbdst.Update
	profile map[string]*pbdst.DestinationProfile
}

func logCall(rpc string, req *pbdst.GetDestination) {
	b, _ := json.Marshal(map[string]string{"rpc": rpc, "path": req.GetPath(), "context_token": req.GetContextToken()})
	fmt.Fprintln(os.Stderr, string(b))
}

func (s *fixedServer) Get(req *pbdst.GetDestination, stream pbdst.Destination_GetServer) error {
	logCall("Get", req)
	updates, ok := s.get[req.GetPath()]
	if !ok {
		updates = []*pbdst.Update{{Update: &pbdst.Update_NoEndpoints{NoEndpoints: &pbdst.NoEndpoints{Exists: false}}}}
	}
	for _, u := range updates {
		if err := stream.Send(u); err != nil {
			return err
		}
	}
	<-stream.Context().Done()
	return nil
}

func (s *fixedServer) GetProfile(req *pbdst.GetDestination, stream pbdst.Destination_GetProfileServer) error {
	logCall("GetProfile", req)
	p, ok := s.profile[req.GetPath()]
	if !ok {
		p = &pbdst.DestinationProfile{}
	}
	if err := stream.Send(p); err != nil {
		return err
	}
	<-stream.Context().Done()
	return nil
}

func loadAnswers(path string) (*fixedServer, *fixedOutbound, *fixedInbound) {
	raw, err := os.ReadFile(path)
	if err != nil {
		fail("-answers: %v", err)
	}
	var a answers
	if err := json.Unmarshal(raw, &a); err != nil {
		fail("-answers %s: %v", path, err)
	}
	s := &fixedServer{get: map[string][]*pbdst.Update{}, profile: map[string]*pbdst.DestinationProfile{}}
	for p, list := range a.Get {
		for i, m := range list {
			u := &pbdst.Update{}
			if err := protojson.Unmarshal(m, u); err != nil {
				fail("-answers %s: get[%q][%d]: %v", path, p, i, err)
			}
			s.get[p] = append(s.get[p], u)
		}
	}
	for p, m := range a.Profile {
		prof := &pbdst.DestinationProfile{}
		if err := protojson.Unmarshal(m, prof); err != nil {
			fail("-answers %s: profile[%q]: %v", path, p, err)
		}
		s.profile[p] = prof
	}
	o := &fixedOutbound{policies: map[string]*pbout.OutboundPolicy{}}
	for k, m := range a.Outbound {
		pol := &pbout.OutboundPolicy{}
		if err := protojson.Unmarshal(m, pol); err != nil {
			fail("-answers %s: outbound[%q]: %v", path, k, err)
		}
		o.policies[k] = pol
	}
	in := &fixedInbound{servers: map[string]*pbin.Server{}}
	for k, m := range a.Inbound {
		srv := &pbin.Server{}
		if err := protojson.Unmarshal(m, srv); err != nil {
			fail("-answers %s: inbound[%q]: %v", path, k, err)
		}
		in.servers[k] = srv
	}
	return s, o, in
}

func serve(listen, answersPath string) {
	srv, outbound, inbound := loadAnswers(answersPath)
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		fail("-listen %s: %v", listen, err)
	}
	g := grpc.NewServer()
	pbdst.RegisterDestinationServer(g, srv)
	pbout.RegisterOutboundPoliciesServer(g, outbound)
	pbin.RegisterInboundServerPoliciesServer(g, inbound)
	fmt.Printf("{\"listening\": %q}\n", lis.Addr().String())
	if err := g.Serve(lis); err != nil {
		fail("serve: %v", err)
	}
}
