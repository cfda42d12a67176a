// Command send makes one unary Send of all its recipients and prints each batch's result
// (clients/README.md). With --bad-email the gateway refuses the whole call with
// INVALID_ARGUMENT and google.rpc.BadRequest details, and nothing is sent.
package main

import (
	"context"
	"os"
	"time"

	v1 "canvas-gateway.internal/clients/go/canvasgatewayv1"
	"canvas-gateway.internal/clients/go/internal/example"
)

func main() {
	os.Exit(run(example.Parse("send", os.Args[1:])))
}

func run(o example.Options) int {
	ctx, client, closeClient, err := example.Connect(o)
	if err != nil {
		return example.ReportError(os.Stderr, err)
	}
	defer closeClient()

	people := example.Recipients(0, o.Recipients, o.ContextKeys)
	if o.BadEmail {
		people = append(people, &v1.Recipient{Identifier: &v1.Recipient_Email{Email: "not-an-email"}})
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	reply, err := client.Send(ctx, &v1.SendRequest{
		Trigger: example.Trigger(o.CanvasID, people, o.ContextKeys),
		Options: o.SendOptions(),
	})
	if err != nil {
		return example.ReportError(os.Stderr, err)
	}
	for _, result := range reply.GetResults() {
		example.PrintResult(os.Stdout, result)
	}
	example.PrintSummary(os.Stdout, reply.GetSummary())
	return example.ExitStatus(reply.GetResults())
}
