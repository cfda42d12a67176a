package internal.canvasgateway.examples;

import internal.canvasgateway.v1.BatchResult;
import internal.canvasgateway.v1.CanvasGatewayServiceGrpc;
import internal.canvasgateway.v1.RecipientChunk;
import internal.canvasgateway.v1.SendOptions;
import internal.canvasgateway.v1.SendStreamRequest;
import internal.canvasgateway.v1.SendStreamResponse;
import internal.canvasgateway.v1.StreamHeader;
import io.grpc.ManagedChannel;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;

/**
 * send-stream: a SendStream of a header, then the recipients in chunks, written as fast as the
 * stream accepts them (flow control: only while isReady()); prints each result as it arrives,
 * then the summary.
 */
public final class SendStream {
  private SendStream() {}

  /** Writes the header and the chunks when the stream is ready; reads the results. */
  private static final class Exchange
      implements ClientResponseObserver<SendStreamRequest, SendStreamResponse> {
    private final Common.Options options;
    private final CountDownLatch done = new CountDownLatch(1);
    private final List<BatchResult> results = Collections.synchronizedList(new ArrayList<>());
    private volatile Throwable failure;
    private volatile boolean finished;
    private ClientCallStreamObserver<SendStreamRequest> requests;
    // Only touched by the on-ready handler, which gRPC never runs concurrently with itself.
    private boolean headerSent;
    private int next;
    private boolean halfClosed;

    Exchange(Common.Options options) {
      this.options = options;
    }

    @Override
    public void beforeStart(ClientCallStreamObserver<SendStreamRequest> requestStream) {
      requests = requestStream;
      requestStream.setOnReadyHandler(this::write);
    }

    /** Writes while the transport accepts more, then returns until the next on-ready call. */
    private void write() {
      while (!halfClosed && !finished && requests.isReady()) {
        if (!headerSent) {
          StreamHeader.Builder header =
              StreamHeader.newBuilder().setTrigger(Common.trigger(options.canvasId(), List.of(), options.contextKeys()));
          SendOptions sendOptions = Common.sendOptions(options);
          if (sendOptions != null) {
            header.setOptions(sendOptions);
          }
          requests.onNext(SendStreamRequest.newBuilder().setHeader(header).build());
          headerSent = true;
        } else if (next < options.recipients()) {
          int size = Math.min(options.chunkSize(), options.recipients() - next);
          RecipientChunk chunk =
              RecipientChunk.newBuilder()
                  .addAllRecipients(Common.recipients(size, next, options.contextKeys()))
                  .build();
          requests.onNext(SendStreamRequest.newBuilder().setChunk(chunk).build());
          next += size;
        } else {
          requests.onCompleted();
          halfClosed = true;
        }
      }
    }

    @Override
    public void onNext(SendStreamResponse message) {
      switch (message.getPartCase()) {
        case RESULT -> {
          results.add(message.getResult());
          System.out.println(Common.resultLine(message.getResult()));
        }
        case SUMMARY -> System.out.println(Common.summaryLine(message.getSummary()));
        default -> {} // a part this client does not know yet
      }
    }

    @Override
    public void onError(Throwable error) {
      // The gateway ended the stream (an invalid header, a draining gateway, a bad token).
      failure = error;
      finished = true;
      done.countDown();
    }

    @Override
    public void onCompleted() {
      finished = true;
      done.countDown();
    }
  }

  static int sendStream(Common.Options options) throws Exception {
    ManagedChannel channel = Common.dial(options);
    try {
      CanvasGatewayServiceGrpc.CanvasGatewayServiceStub stub =
          CanvasGatewayServiceGrpc.newStub(channel)
              .withInterceptors(Common.bearer(options.token()));
      Exchange exchange = new Exchange(options);
      stub.sendStream(exchange);
      exchange.done.await();
      if (exchange.failure != null) {
        return Common.reportError(exchange.failure);
      }
      synchronized (exchange.results) {
        return Common.exitStatus(exchange.results);
      }
    } finally {
      Common.close(channel);
    }
  }

  public static void main(String[] args) {
    Common.main(Common.SEND_STREAM, args, SendStream::sendStream);
  }
}
