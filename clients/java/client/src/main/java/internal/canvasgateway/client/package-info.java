/**
 * A small typed client of {@code canvas_gateway.v1.CanvasGatewayService}.
 *
 * <p>{@link internal.canvasgateway.client.CanvasGatewayClient} dials a gateway, sends the bearer
 * token on every call, and makes the two calls of the contract: {@code send} (unary, every result
 * in batch order) and {@code sendStream} (a header, then the recipients in chunks under flow
 * control, each result handed over as it arrives). {@link
 * internal.canvasgateway.client.SendSettings} carries what varies per call: the idempotency key,
 * validate-only, the deadline and the stream's chunk size. A failed call throws {@link
 * internal.canvasgateway.client.CanvasGatewayException}, with the gRPC status code and the
 * gateway's details (google.rpc.BadRequest field violations, ErrorInfo, RetryInfo) read out.
 *
 * <p>The messages and the grpc-java stub themselves are generated at build time from {@code
 * protos/} into package {@code internal.canvasgateway.v1}, in the same artifact.
 */
package internal.canvasgateway.client;
