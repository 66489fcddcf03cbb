package main

// A fixed-answer Destination server for tether's proxy tests, built on the same published stubs:
//
//	goclient -call serve -listen 127.0.0.1:8086 -answers answers.json
//
// answers.json holds protojson messages by path:
//
//	{"get": {"web.ns.svc.cluster.local:80": [{"add": {...}}]},
//	 "profile": {"web.ns.svc.cluster.local:80": {"routes": [...]}}}
//
// Get streams the listed updates (a path not listed gets no_endpoints{exists:false}); GetProfile sends
// the profile (an empty one when not listed). Both streams then stay open until the client leaves.
// Each call is logged to stderr as one JSON line, so a test can see what the proxy asked for.

import (
	"encoding/json"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	pbdst "github.com/linkerd/linkerd2-proxy-api/go/destination"
)

type answers struct {
	Get     map[string][]json.RawMessage `json:"get"`
	Profile map[string]json.RawMessage   `json:"profile"`
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

func loadAnswers(path string) *fixedServer {
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
	return s
}

func serve(listen, answersPath string) {
	srv := loadAnswers(answersPath)
	lis, err := net.Listen("tcp", listen)
	if err != nil {
		fail("-listen %s: %v", listen, err)
	}
	g := grpc.NewServer()
	pbdst.RegisterDestinationServer(g, srv)
	fmt.Printf("{\"listening\": %q}\n", lis.Addr().String())
	if err := g.Serve(lis); err != nil {
		fail("serve: %v", err)
	}
}
