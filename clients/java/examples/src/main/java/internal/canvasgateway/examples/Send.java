package internal.canvasgateway.examples;

import internal.canvasgateway.client.CanvasGatewayClient;
import internal.canvasgateway.client.CanvasGatewayException;
import internal.canvasgateway.v1.BatchResult;
import internal.canvasgateway.v1.Recipient;
import internal.canvasgateway.v1.SendResponse;
import java.util.List;

/** send: one unary Send call with every recipient; prints the results in batch order. */
public final class Send {
  private Send() {}

  static int send(Common.Options options) throws Exception {
    List<Recipient> people = Common.recipients(options.recipients(), 0, options.contextKeys());
    if (options.badEmail()) {
      // An email recipient without `prioritization`: the gateway refuses the whole call.
      people.add(Recipient.newBuilder().setEmail("not-an-email").build());
    }
    try (CanvasGatewayClient client = Common.connect(options)) {
      SendResponse response;
      try {
        response =
            client.send(
                Common.trigger(options.canvasId(), people, options.contextKeys()),
                Common.settings(options));
      } catch (CanvasGatewayException error) {
        return Common.reportError(error);
      }
      for (BatchResult result : response.getResultsList()) {
        System.out.println(Common.resultLine(result));
      }
      if (response.hasSummary()) {
        System.out.println(Common.summaryLine(response.getSummary()));
      }
      return Common.exitStatus(response.getResultsList().stream().allMatch(Common::sent));
    }
  }

  public static void main(String[] args) {
    Common.main(Common.SEND, args, Send::send);
  }
}
