package internal.canvasgateway.examples;

import internal.canvasgateway.v1.BatchResult;
import internal.canvasgateway.v1.CanvasGatewayServiceGrpc;
import internal.canvasgateway.v1.Recipient;
import internal.canvasgateway.v1.SendOptions;
import internal.canvasgateway.v1.SendRequest;
import internal.canvasgateway.v1.SendResponse;
import io.grpc.ManagedChannel;
import io.grpc.StatusRuntimeException;
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
    SendRequest.Builder builder =
        SendRequest.newBuilder().setTrigger(Common.trigger(options.canvasId(), people, options.contextKeys()));
    SendOptions sendOptions = Common.sendOptions(options);
    if (sendOptions != null) {
      builder.setOptions(sendOptions);
    }
    SendRequest request = builder.build();
    ManagedChannel channel = Common.dial(options);
    try {
      CanvasGatewayServiceGrpc.CanvasGatewayServiceBlockingStub stub =
          CanvasGatewayServiceGrpc.newBlockingStub(channel)
              .withInterceptors(Common.bearer(options.token()));
      SendResponse response;
      try {
        response = stub.send(request);
      } catch (StatusRuntimeException error) {
        return Common.reportError(error);
      }
      for (BatchResult result : response.getResultsList()) {
        System.out.println(Common.resultLine(result));
      }
      if (response.hasSummary()) {
        System.out.println(Common.summaryLine(response.getSummary()));
      }
      return Common.exitStatus(response.getResultsList());
    } finally {
      Common.close(channel);
    }
  }

  public static void main(String[] args) {
    Common.main(Common.SEND, args, Send::send);
  }
}
