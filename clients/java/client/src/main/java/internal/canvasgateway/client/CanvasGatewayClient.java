package internal.canvasgateway.client;

import internal.canvasgateway.v1.BatchResult;
import internal.canvasgateway.v1.CanvasGatewayServiceGrpc;
import internal.canvasgateway.v1.CanvasTrigger;
import internal.canvasgateway.v1.Recipient;
import internal.canvasgateway.v1.SendOptions;
import internal.canvasgateway.v1.SendRequest;
import internal.canvasgateway.v1.SendResponse;
import internal.canvasgateway.v1.SendStreamRequest;
import internal.canvasgateway.v1.SendSummary;
import internal.canvasgateway.v1.StreamHeader;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientInterceptors;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.AbstractStub;
import io.grpc.stub.MetadataUtils;
import java.util.Objects;
import java.util.Optional;
import java.util.concurrent.TimeUnit;
import java.util.function.Consumer;

/**
 * A blocking client of one canvas gateway. It is thread-safe: make one for the whole service and
 * close it when the service stops.
 *
 * <pre>{@code
 * try (CanvasGatewayClient client =
 *     CanvasGatewayClient.newBuilder("canvas-gateway.internal:443", token)
 *         .credentials(TlsChannelCredentials.create())
 *         .build()) {
 *   SendResponse response = client.send(trigger, SendSettings.DEFAULT.withIdempotencyKey("order-1"));
 * }
 * }</pre>
 *
 * <p>The token goes as {@code authorization: Bearer <token>} metadata on every call; it is in no
 * {@code toString} and no exception message. A failed call throws {@link CanvasGatewayException}.
 */
public final class CanvasGatewayClient implements AutoCloseable {
  /** The "authorization" metadata key of the bearer token. */
  static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  private final String target;
  private final ManagedChannel owned; // null when the caller owns the channel
  private final Channel channel; // with the token on every call

  private CanvasGatewayClient(String target, ManagedChannel owned, Channel channel, String token) {
    checkToken(token);
    Metadata headers = new Metadata();
    headers.put(AUTHORIZATION, "Bearer " + token);
    this.target = target;
    this.owned = owned;
    this.channel =
        ClientInterceptors.intercept(channel, MetadataUtils.newAttachHeadersInterceptor(headers));
  }

  /**
   * A builder of a client that opens its own channel, and closes it in {@link #close()}.
   *
   * @param target a gRPC target, e.g. {@code "127.0.0.1:50051"} or {@code
   *     "dns:///canvas-gateway.internal:443"}
   * @param token the tenant's bearer token
   * @return the builder; plaintext unless given {@link Builder#credentials credentials}
   */
  public static Builder newBuilder(String target, String token) {
    return new Builder(target, token);
  }

  /**
   * A client on a channel the caller made and closes: {@link #close()} leaves it open.
   *
   * @param channel the channel to the gateway
   * @param token the tenant's bearer token
   * @return the client
   * @throws IllegalArgumentException if the token is empty or not printable ASCII without spaces
   */
  public static CanvasGatewayClient forChannel(Channel channel, String token) {
    Objects.requireNonNull(channel, "channel");
    return new CanvasGatewayClient(channel.authority(), null, channel, token);
  }

  /** Builds a {@link CanvasGatewayClient} that owns its channel. */
  public static final class Builder {
    private final String target;
    private final String token;
    private ChannelCredentials credentials = InsecureChannelCredentials.create();

    private Builder(String target, String token) {
      this.target = Objects.requireNonNull(target, "target");
      this.token = Objects.requireNonNull(token, "token");
    }

    /**
     * How the channel is secured.
     *
     * @param channelCredentials e.g. {@code TlsChannelCredentials.create()} (the system's roots),
     *     {@code TlsChannelCredentials.newBuilder().trustManager(caPem).build()} (one CA), or
     *     {@code InsecureChannelCredentials.create()} (the default: loopback, or behind a
     *     TLS-terminating mesh)
     * @return this builder
     */
    public Builder credentials(ChannelCredentials channelCredentials) {
      this.credentials = Objects.requireNonNull(channelCredentials, "channelCredentials");
      return this;
    }

    /**
     * Opens the channel (it connects on the first call) and makes the client.
     *
     * @return the client
     * @throws IllegalArgumentException if the token is empty or not printable ASCII without spaces
     */
    public CanvasGatewayClient build() {
      checkToken(token); // before a channel is opened for nothing
      ManagedChannel channel = Grpc.newChannelBuilder(target, credentials).build();
      return new CanvasGatewayClient(target, channel, channel, token);
    }
  }

  private static void checkToken(String token) {
    // The message never quotes the token: it is a secret even when malformed.
    if (token.isEmpty() || !token.chars().allMatch(c -> c > ' ' && c < 0x7f)) {
      throw new IllegalArgumentException(
          "token must be non-empty printable ASCII without whitespace");
    }
  }

  private <S extends AbstractStub<S>> S withDeadline(S stub, SendSettings settings) {
    return settings.deadline() == null
        ? stub
        : stub.withDeadlineAfter(settings.deadline().toNanos(), TimeUnit.NANOSECONDS);
  }

  /**
   * {@link #send(CanvasTrigger, SendSettings)} with {@link SendSettings#DEFAULT}.
   *
   * @param trigger the Canvas, its context and every recipient
   * @return the results, one per batch of at most 50 recipients in batch order, and the summary
   * @throws CanvasGatewayException if the call failed
   */
  public SendResponse send(CanvasTrigger trigger) {
    return send(trigger, SendSettings.DEFAULT);
  }

  /**
   * One unary Send with every recipient (up to the gateway's cap: 10,000 by default). Positions
   * in the results index the trigger's recipients.
   *
   * @param trigger the Canvas, its context and every recipient
   * @param settings the idempotency key, validate-only and deadline ({@code chunkSize} is unused)
   * @return the results, one per batch of at most 50 recipients in batch order, and the summary
   * @throws CanvasGatewayException if the call failed; {@code INVALID_ARGUMENT} sent nothing and
   *     names the fields in {@link CanvasGatewayException#violations()}
   */
  public SendResponse send(CanvasTrigger trigger, SendSettings settings) {
    SendRequest.Builder request = SendRequest.newBuilder().setTrigger(trigger);
    SendOptions options = settings.options();
    if (!options.equals(SendOptions.getDefaultInstance())) {
      request.setOptions(options);
    }
    try {
      return withDeadline(CanvasGatewayServiceGrpc.newBlockingStub(channel), settings)
          .send(request.build());
    } catch (StatusRuntimeException error) {
      throw CanvasGatewayException.from(error);
    }
  }

  /**
   * One SendStream: a header with {@code header} (the Canvas, its context, and recipients if it
   * has any), then {@code recipients} in chunks of {@code settings.chunkSize()}, written only as
   * fast as the stream accepts them. Blocks until the stream ends.
   *
   * <p>Each result is handed to {@code onResult} as its batch completes (not in batch order;
   * positions count the header's recipients first, then {@code recipients}), on a gRPC thread,
   * one at a time; the next result is not read until it returns. {@code recipients} is read on a
   * gRPC thread too, lazily, one chunk at a time, so memory stays flat.
   *
   * @param header the trigger of the stream's header
   * @param recipients the recipients after the header's, read once
   * @param settings the idempotency key, validate-only, deadline and chunk size
   * @param onResult what to do with each result
   * @return the gateway's summary, or empty when the stream ended without one
   * @throws CanvasGatewayException if the stream failed (an invalid header, a refused token, a
   *     draining gateway: see {@link CanvasGatewayException#resumePosition()}), or was interrupted
   *     ({@code CANCELLED}, with the thread's interrupt flag set again)
   * @throws RuntimeException what {@code onResult} threw (the stream is cancelled), or what
   *     reading {@code recipients} threw (after the recipients read before it were sent and had
   *     their results)
   */
  public Optional<SendSummary> sendStream(
      CanvasTrigger header,
      Iterable<Recipient> recipients,
      SendSettings settings,
      Consumer<BatchResult> onResult) {
    StreamHeader.Builder streamHeader = StreamHeader.newBuilder().setTrigger(header);
    SendOptions options = settings.options();
    if (!options.equals(SendOptions.getDefaultInstance())) {
      streamHeader.setOptions(options);
    }
    StreamCall call =
        new StreamCall(
            SendStreamRequest.newBuilder().setHeader(streamHeader).build(),
            recipients.iterator(),
            settings.chunkSize(),
            Objects.requireNonNull(onResult, "onResult"));
    withDeadline(CanvasGatewayServiceGrpc.newStub(channel), settings).sendStream(call);
    try {
      return Optional.ofNullable(call.await());
    } catch (InterruptedException interrupted) {
      Thread.currentThread().interrupt();
      throw CanvasGatewayException.from(
          Status.CANCELLED.withDescription("interrupted").withCause(interrupted).asException());
    }
  }

  /**
   * Closes the channel this client opened (not one given to {@link #forChannel}): calls under way
   * have up to 5 seconds to finish, then are cancelled.
   */
  @Override
  public void close() {
    if (owned == null) {
      return;
    }
    owned.shutdown();
    try {
      if (!owned.awaitTermination(5, TimeUnit.SECONDS)) {
        owned.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
      }
    } catch (InterruptedException interrupted) {
      owned.shutdownNow();
      Thread.currentThread().interrupt();
    }
  }

  /** The target, and no token. */
  @Override
  public String toString() {
    return "CanvasGatewayClient(target=" + target + ")";
  }
}
