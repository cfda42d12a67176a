// Package example holds what the two example programs share: flags, the channel and token, the
// request, and the output lines of clients/README.md.
package example

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	rpccode "google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	v1 "canvas-gateway.internal/clients/go/canvasgatewayv1"
)

// Exit statuses of clients/README.md.
const (
	ExitSent      = 0 // every result SENT
	ExitNotSent   = 1 // some result not SENT
	ExitUsage     = 2 // a bad flag, or no CANVAS_GATEWAY_TOKEN
	ExitRPCFailed = 3 // the RPC failed
)

// Options are the flags and the token.
type Options struct {
	Target     string
	TLS        bool
	CAFile     string
	CanvasID   string
	Recipients int
	ChunkSize  int
	BadEmail   bool
	// IdempotencyKey is SendOptions.idempotency_key; empty sends without one.
	IdempotencyKey string
	// ContextKeys more keys key-0 ... key-<N-1> in the top-level context and each recipient's.
	ContextKeys int
	Token       string
	RootCAs     *x509.CertPool // from CAFile; nil for the system's roots
}

// Parse reads the flags of `program` ("send-stream" or "send") and the token from
// CANVAS_GATEWAY_TOKEN; on a usage error it prints it and exits 2.
func Parse(program string, args []string) Options {
	var o Options
	set := flag.NewFlagSet(program, flag.ContinueOnError)
	set.SetOutput(os.Stderr)
	set.StringVar(&o.Target, "target", "127.0.0.1:50051", "the gateway, host:port")
	set.BoolVar(&o.TLS, "tls", false, "dial with TLS, trusting the system's roots")
	set.StringVar(&o.CAFile, "ca-file", "", "dial with TLS, trusting this CA (PEM)")
	set.StringVar(&o.CanvasID, "canvas-id", "canvas-gateway-demo", "the Canvas to trigger")
	defaultCount := 1000
	if program == "send" {
		defaultCount = 120
		set.BoolVar(&o.BadEmail, "bad-email", false, "add a recipient with an invalid email")
	} else {
		set.IntVar(&o.ChunkSize, "chunk-size", 500, "recipients per stream message")
	}
	set.IntVar(&o.Recipients, "recipients", defaultCount, "recipients user-0 ... user-<N-1>")
	set.StringVar(&o.IdempotencyKey, "idempotency-key", "",
		"send under this key: run again with it, kept results come back replayed and Braze is not called again")
	set.IntVar(&o.ContextKeys, "context-keys", 0,
		"add keys key-0 ... key-<N-1> to the top-level context and each recipient's (Go writes map entries in random order)")
	if err := set.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0) // -h, --help: asked for, not a usage error
		}
		os.Exit(ExitUsage)
	}
	usage := func(why string) {
		fmt.Fprintf(os.Stderr, "%s: %s\n", program, why)
		set.Usage()
		os.Exit(ExitUsage)
	}
	if set.NArg() > 0 {
		usage("unexpected arguments: " + strings.Join(set.Args(), " "))
	}
	if o.Recipients < 0 || (program == "send-stream" && o.ChunkSize < 1) {
		usage("--recipients must be >= 0 and --chunk-size >= 1")
	}
	if o.ContextKeys < 0 {
		usage("--context-keys must be >= 0")
	}
	o.TLS = o.TLS || o.CAFile != ""
	if o.CAFile != "" {
		// Read now, so a bad --ca-file is a usage error (2), not a failed RPC (3).
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			usage(err.Error())
		}
		o.RootCAs = x509.NewCertPool()
		if !o.RootCAs.AppendCertsFromPEM(pem) {
			usage(o.CAFile + " holds no PEM certificate")
		}
	}
	o.Token = os.Getenv("CANVAS_GATEWAY_TOKEN")
	if o.Token == "" {
		usage("set CANVAS_GATEWAY_TOKEN to the gateway's bearer token")
	}
	return o
}

// Connect returns the service's client on a new channel and a context that carries the token
// and ends on Ctrl-C or SIGTERM; call close when done.
func Connect(o Options) (ctx context.Context, client v1.CanvasGatewayServiceClient, close func(), err error) {
	conn, err := Dial(o)
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	return WithToken(ctx, o.Token), v1.NewCanvasGatewayServiceClient(conn), func() { stop(); conn.Close() }, nil
}

// Dial opens a channel: plaintext, or TLS trusting the system's roots or --ca-file.
func Dial(o Options) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if o.TLS {
		// RootCAs nil trusts the system's roots.
		creds = credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: o.RootCAs})
	}
	return grpc.NewClient(o.Target, grpc.WithTransportCredentials(creds))
}

// WithToken returns a context whose calls carry `authorization: Bearer <token>`.
func WithToken(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

// Recipients returns `count` recipients user-<i> from i = `from`, each with the context {"index": i}
// and `keys` more keys (--context-keys).
func Recipients(from, count, keys int) []*v1.Recipient {
	people := make([]*v1.Recipient, count)
	for k := range people {
		i := from + k
		people[k] = &v1.Recipient{
			Identifier: &v1.Recipient_ExternalUserId{ExternalUserId: fmt.Sprintf("user-%d", i)},
			Context:    contextOf("index", structpb.NewNumberValue(float64(i)), keys),
		}
	}
	return people
}

// Trigger is the Canvas, the top-level context (with `keys` more keys) and the recipients given.
func Trigger(canvasID string, people []*v1.Recipient, keys int) *v1.CanvasTrigger {
	return &v1.CanvasTrigger{
		CanvasId:   canvasID,
		Context:    contextOf("campaign", structpb.NewStringValue("example"), keys),
		Recipients: people,
	}
}

// contextOf is {name: value} and `keys` more keys key-<j>: j. A Go map: its entries go on the wire in
// an order of their own each time, so a repeat is the same request in another order.
func contextOf(name string, value *structpb.Value, keys int) *structpb.Struct {
	fields := map[string]*structpb.Value{name: value}
	for j := range keys {
		fields[fmt.Sprintf("key-%d", j)] = structpb.NewNumberValue(float64(j))
	}
	return &structpb.Struct{Fields: fields}
}

// SendOptions is the request's SendOptions: the idempotency key, if any.
func (o Options) SendOptions() *v1.SendOptions {
	if o.IdempotencyKey == "" {
		return nil
	}
	return &v1.SendOptions{IdempotencyKey: o.IdempotencyKey}
}

// PrintResult prints one `result ...` line, ending ` replayed=true` when the result was kept
// from an earlier call under the same idempotency key.
func PrintResult(w io.Writer, r *v1.BatchResult) {
	first, dispatchID := "-", r.GetBraze().GetDispatchId()
	if len(r.GetPositions()) > 0 {
		first = fmt.Sprint(r.GetPositions()[0])
	}
	if dispatchID == "" {
		dispatchID = "-"
	}
	replayed := ""
	if r.GetReplayed() {
		replayed = " replayed=true"
	}
	fmt.Fprintf(w, "result batch=%d outcome=%s code=%s recipients=%d first=%s dispatch_id=%s%s\n",
		r.GetBatchIndex(), r.GetOutcome(), r.GetCode(), len(r.GetPositions()), first, dispatchID, replayed)
}

// PrintSummary prints the `summary ...` line.
func PrintSummary(w io.Writer, s *v1.SendSummary) {
	requestID := s.GetRequestId()
	if requestID == "" {
		requestID = "-"
	}
	fmt.Fprintf(w, "summary recipients=%d batches=%d sent=%d request_id=%s\n",
		s.GetRecipients(), s.GetBatches(), s.GetRecipientsSent(), requestID)
}

// ExitStatus is ExitSent when every result is SENT, else ExitNotSent.
func ExitStatus(results []*v1.BatchResult) int {
	for _, r := range results {
		if r.GetOutcome() != v1.Outcome_OUTCOME_SENT {
			return ExitNotSent
		}
	}
	return ExitSent
}

// ReportError prints a failed RPC and its google.rpc.BadRequest field violations to stderr and
// returns ExitRPCFailed.
func ReportError(w io.Writer, err error) int {
	st := status.Convert(err)
	// google.rpc.Code names the gRPC codes the way every language prints them: INVALID_ARGUMENT.
	fmt.Fprintf(w, "error code=%s message=%s\n", rpccode.Code(st.Code()), strings.Join(strings.Fields(st.Message()), " "))
	for _, detail := range st.Details() {
		if badRequest, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range badRequest.GetFieldViolations() {
				fmt.Fprintf(w, "violation field=%s description=%s\n", v.GetField(), v.GetDescription())
			}
		}
	}
	return ExitRPCFailed
}
