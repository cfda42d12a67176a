// Command send-stream streams its recipients to the gateway in chunks and prints each batch's
// result as it arrives, then the summary (clients/README.md). Sending and receiving run side by
// side, so a slow reader never blocks the writer's flow control or the other way round.
package main

import (
	"context"
	"errors"
	"io"
	"os"

	v1 "canvas-gateway.internal/clients/go/canvasgatewayv1"
	"canvas-gateway.internal/clients/go/internal/example"
)

func main() {
	os.Exit(run(example.Parse("send-stream", os.Args[1:])))
}

func run(o example.Options) int {
	ctx, client, closeClient, err := example.Connect(o)
	if err != nil {
		return example.ReportError(os.Stderr, err)
	}
	defer closeClient()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.SendStream(ctx)
	if err != nil {
		return example.ReportError(os.Stderr, err)
	}

	// The header first (canvas and shared context), then the recipients in chunks.
	go func() {
		header := &v1.SendStreamRequest{Part: &v1.SendStreamRequest_Header{
			Header: &v1.StreamHeader{Trigger: example.Trigger(o.CanvasID, nil, o.ContextKeys), Options: o.SendOptions()},
		}}
		if stream.Send(header) != nil {
			return // the stream failed: Recv reports why
		}
		for from := 0; from < o.Recipients; from += o.ChunkSize {
			chunk := &v1.SendStreamRequest{Part: &v1.SendStreamRequest_Chunk{
				Chunk: &v1.RecipientChunk{Recipients: example.Recipients(from, min(o.ChunkSize, o.Recipients-from), o.ContextKeys)},
			}}
			if stream.Send(chunk) != nil {
				return
			}
		}
		_ = stream.CloseSend()
	}()

	var results []*v1.BatchResult
	for {
		response, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return example.ExitStatus(results)
		}
		if err != nil {
			// A draining gateway ends with UNAVAILABLE, a google.rpc.ErrorInfo (reason DRAINING)
			// whose metadata "resume_position" says where to resume, and a RetryInfo.
			return example.ReportError(os.Stderr, err)
		}
		switch part := response.GetPart().(type) {
		case *v1.SendStreamResponse_Result:
			results = append(results, part.Result)
			example.PrintResult(os.Stdout, part.Result)
		case *v1.SendStreamResponse_Summary:
			example.PrintSummary(os.Stdout, part.Summary)
		}
	}
}
