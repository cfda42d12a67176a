package internal.canvasgateway.examples;

import internal.canvasgateway.client.CanvasGatewayClient;
import internal.canvasgateway.client.CanvasGatewayException;
import internal.canvasgateway.v1.Recipient;
import internal.canvasgateway.v1.SendSummary;
import java.util.List;
import java.util.Optional;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.stream.IntStream;

/**
 * send-stream: a SendStream of a header, then the recipients in chunks, written as fast as the
 * stream accepts them (the library writes only while the stream is ready); prints each result as
 * it arrives, then the summary.
 */
public final class SendStream {
  private SendStream() {}

  /** The recipients user-0 ... user-(n-1), made one at a time as the stream reads them. */
  private static Iterable<Recipient> recipients(Common.Options options) {
    return () ->
        IntStream.range(0, options.recipients())
            .mapToObj(i -> Common.recipients(1, i, options.contextKeys()).get(0))
            .iterator();
  }

  static int sendStream(Common.Options options) throws Exception {
    AtomicBoolean allSent = new AtomicBoolean(true);
    try (CanvasGatewayClient client = Common.connect(options)) {
      Optional<SendSummary> summary;
      try {
        summary =
            client.sendStream(
                Common.trigger(options.canvasId(), List.of(), options.contextKeys()),
                recipients(options),
                Common.settings(options),
                result -> {
                  if (!Common.sent(result)) {
                    allSent.set(false);
                  }
                  System.out.println(Common.resultLine(result));
                });
      } catch (CanvasGatewayException error) {
        return Common.reportError(error);
      }
      summary.ifPresent(s -> System.out.println(Common.summaryLine(s)));
      return Common.exitStatus(allSent.get());
    }
  }

  public static void main(String[] args) {
    Common.main(Common.SEND_STREAM, args, SendStream::sendStream);
  }
}
