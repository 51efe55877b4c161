// grpc_resolver dials etcd:///<target> with etcd's own gRPC resolver and a
// chosen balancer, the way a gRPC-go client of a registrar-registered service
// does, and prints every address update the balancer accepted: one JSON line
// {"addresses":[{"addr":...,"metadata":...}],"t_us":...} per update, flushed,
// t_us being the wall clock in microseconds when the balancer had it. The
// first line, {"watching":"<target>"}, says the resolver's watch is in place.
//
// Built by tests/test_interop_grpc.py against Debian's packaged sources
// (golang-etcd-server-dev 3.4.23, golang-google-grpc-dev 1.33.3):
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go build -o grpc_resolver main.go
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/clientv3"
	etcdresolver "go.etcd.io/etcd/clientv3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/resolver"
)

var out = struct {
	sync.Mutex
	enc *json.Encoder
}{enc: json.NewEncoder(os.Stdout)}

// emit writes one JSON line, stamped; stdout is unbuffered, so each line is
// flushed.
func emit(v map[string]interface{}) {
	v["t_us"] = time.Now().UnixMicro()
	out.Lock()
	defer out.Unlock()
	if err := out.enc.Encode(v); err != nil {
		fmt.Fprintln(os.Stderr, "grpc_resolver: cannot encode an update:", err)
	}
}

type address struct {
	Addr     string      `json:"addr"`
	Metadata interface{} `json:"metadata"`
}

// printingConn sits between etcd's resolver and gRPC's ClientConn: it passes
// every state on, then prints it, so a printed update is one the balancer
// took without panicking.
type printingConn struct {
	resolver.ClientConn
}

func (c printingConn) UpdateState(s resolver.State) {
	c.ClientConn.UpdateState(s)
	addrs := make([]address, 0, len(s.Addresses))
	for _, a := range s.Addresses {
		addrs = append(addrs, address{a.Addr, a.Metadata})
	}
	emit(map[string]interface{}{"addresses": addrs})
}

func (c printingConn) ReportError(err error) {
	c.ClientConn.ReportError(err)
	emit(map[string]interface{}{"error": err.Error()})
}

type printingBuilder struct {
	resolver.Builder
}

func (b printingBuilder) Build(t resolver.Target, cc resolver.ClientConn,
	opts resolver.BuildOptions) (resolver.Resolver, error) {
	r, err := b.Builder.Build(t, printingConn{cc}, opts)
	if err == nil {
		emit(map[string]interface{}{"watching": t.Endpoint})
	}
	return r, err
}

func main() {
	endpoints := flag.String("endpoints", "http://127.0.0.1:2379", "etcd client URLs, comma-separated")
	target := flag.String("target", "services/web", "dialled as etcd:///<target>")
	policy := flag.String("balancer", "pick_first", "pick_first or round_robin")
	flag.Parse()

	cli, err := clientv3.New(clientv3.Config{
		Endpoints: strings.Split(*endpoints, ","), DialTimeout: 5 * time.Second})
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpc_resolver: etcd client:", err)
		os.Exit(2)
	}
	defer cli.Close()
	builder, err := etcdresolver.NewBuilder(cli)
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpc_resolver: resolver:", err)
		os.Exit(2)
	}
	conn, err := grpc.Dial("etcd:///"+*target,
		grpc.WithResolvers(printingBuilder{builder}),
		grpc.WithInsecure(),
		grpc.WithDefaultServiceConfig(fmt.Sprintf(`{"loadBalancingPolicy":%q}`, *policy)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "grpc_resolver: dial:", err)
		os.Exit(2)
	}
	defer conn.Close()
	select {} // until killed
}
