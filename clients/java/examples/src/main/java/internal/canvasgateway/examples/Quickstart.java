package internal.canvasgateway.examples;

import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import internal.canvasgateway.client.CanvasGatewayClient;
import internal.canvasgateway.client.CanvasGatewayException;
import internal.canvasgateway.client.SendSettings;
import internal.canvasgateway.v1.BatchResult;
import internal.canvasgateway.v1.CanvasTrigger;
import internal.canvasgateway.v1.Recipient;
import internal.canvasgateway.v1.SendResponse;
import internal.canvasgateway.v1.SendSummary;
import io.grpc.InsecureChannelCredentials;
import java.time.Duration;
import java.util.List;
import java.util.Optional;
import java.util.stream.IntStream;

/** clients/java/README.md's usage: a Send, then a SendStream. Args: [HOST:PORT]. */
public final class Quickstart {
  private Quickstart() {}

  public static void main(String[] args) {
    String target = args.length > 0 ? args[0] : "127.0.0.1:50051";
    String token = System.getenv("CANVAS_GATEWAY_TOKEN");
    // One client for the whole service (it is thread-safe); TlsChannelCredentials.create() in production.
    try (CanvasGatewayClient client =
        CanvasGatewayClient.newBuilder(target, token)
            .credentials(InsecureChannelCredentials.create())
            .build()) {
      Struct context =
          Struct.newBuilder()
              .putFields("campaign", Value.newBuilder().setStringValue("spring").build())
              .build();
      CanvasTrigger trigger =
          CanvasTrigger.newBuilder()
              .setCanvasId("my-canvas")
              .setContext(context)
              .addRecipients(Recipient.newBuilder().setExternalUserId("user-1"))
              .addRecipients(
                  Recipient.newBuilder().setEmail("ada@example.com").addPrioritization("identified"))
              .build();

      // Send: one result per batch of at most 50, in batch order. Run it again: replayed=true.
      SendSettings settings =
          SendSettings.DEFAULT
              .withIdempotencyKey("quickstart-order-1")
              .withDeadline(Duration.ofSeconds(30));
      SendResponse response = client.send(trigger, settings);
      for (BatchResult result : response.getResultsList()) {
        System.out.println(
            "send batch " + result.getBatchIndex() + ": " + result.getOutcome()
                + " dispatch_id=" + result.getBraze().getDispatchId()
                + " replayed=" + result.getReplayed());
      }

      // SendStream: the header's trigger, then recipients read lazily, 500 to a message; each
      // result as its batch completes (not in batch order), then the summary.
      CanvasTrigger header = trigger.toBuilder().clearRecipients().build();
      List<Recipient> many =
          IntStream.range(0, 120)
              .mapToObj(i -> Recipient.newBuilder().setExternalUserId("user-" + i).build())
              .toList();
      Optional<SendSummary> summary =
          client.sendStream(
              header,
              many,
              SendSettings.DEFAULT.withDeadline(Duration.ofMinutes(5)),
              result ->
                  System.out.println(
                      "stream batch " + result.getBatchIndex() + ": " + result.getOutcome()
                          + " recipients=" + result.getPositionsCount()));
      summary.ifPresent(s -> System.out.println("stream sent " + s.getRecipientsSent()));
    } catch (CanvasGatewayException error) {
      // The call failed as a whole: INVALID_ARGUMENT names the fields, and nothing was sent.
      System.err.println(error.code() + ": " + error.description());
      error.violations().forEach(v -> System.err.println(v.getField() + ": " + v.getDescription()));
      System.exit(1);
    }
  }
}
