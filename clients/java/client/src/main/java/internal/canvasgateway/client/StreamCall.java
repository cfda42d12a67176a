package internal.canvasgateway.client;

import internal.canvasgateway.v1.BatchResult;
import internal.canvasgateway.v1.Recipient;
import internal.canvasgateway.v1.RecipientChunk;
import internal.canvasgateway.v1.SendStreamRequest;
import internal.canvasgateway.v1.SendStreamResponse;
import internal.canvasgateway.v1.SendSummary;
import io.grpc.stub.ClientCallStreamObserver;
import io.grpc.stub.ClientResponseObserver;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.function.Consumer;

/**
 * One SendStream: writes the header, then the recipients in chunks, only while the stream is
 * ready (flow control), and hands each result to the caller as it arrives.
 *
 * <p>gRPC runs the on-ready handler and the response callbacks of one call one at a time, so the
 * fields need no lock; the caller reads them after {@link #await()}, whose latch orders those
 * writes before its reads.
 */
final class StreamCall implements ClientResponseObserver<SendStreamRequest, SendStreamResponse> {
  private final SendStreamRequest header;
  private final Iterator<Recipient> recipients;
  private final int chunkSize;
  private final Consumer<BatchResult> onResult;
  private final CountDownLatch done = new CountDownLatch(1);
  private ClientCallStreamObserver<SendStreamRequest> requests;
  private boolean headerSent;
  private boolean halfClosed;
  private boolean finished;
  private SendSummary summary;
  private Throwable failure;
  private RuntimeException sourceFailure;
  private RuntimeException handlerFailure;

  StreamCall(
      SendStreamRequest header,
      Iterator<Recipient> recipients,
      int chunkSize,
      Consumer<BatchResult> onResult) {
    this.header = header;
    this.recipients = recipients;
    this.chunkSize = chunkSize;
    this.onResult = onResult;
  }

  @Override
  public void beforeStart(ClientCallStreamObserver<SendStreamRequest> requestStream) {
    requests = requestStream;
    requestStream.setOnReadyHandler(this::write);
  }

  /**
   * Writes while the transport accepts more, then returns until the next on-ready call. A source
   * that fails ends the input there: what was read before it is sent, and the stream half-closed
   * so that it gets its results.
   */
  private void write() {
    while (!halfClosed && !finished && requests.isReady()) {
      if (!headerSent) {
        requests.onNext(header);
        headerSent = true;
        continue;
      }
      List<Recipient> chunk = new ArrayList<>();
      boolean ended;
      try {
        while (chunk.size() < chunkSize && recipients.hasNext()) {
          chunk.add(recipients.next());
        }
        ended = !recipients.hasNext();
      } catch (RuntimeException error) {
        sourceFailure = error;
        ended = true;
      }
      if (!chunk.isEmpty()) {
        requests.onNext(
            SendStreamRequest.newBuilder()
                .setChunk(RecipientChunk.newBuilder().addAllRecipients(chunk))
                .build());
      }
      if (ended) {
        requests.onCompleted();
        halfClosed = true;
      }
    }
  }

  @Override
  public void onNext(SendStreamResponse message) {
    if (handlerFailure != null) {
      return; // the call is being cancelled
    }
    switch (message.getPartCase()) {
      case RESULT -> {
        try {
          onResult.accept(message.getResult());
        } catch (RuntimeException error) {
          handlerFailure = error;
          requests.cancel("the result handler failed", error);
        }
      }
      case SUMMARY -> summary = message.getSummary();
      default -> {} // an empty message (README: How a stream ends), or a part not known yet
    }
  }

  @Override
  public void onError(Throwable error) {
    failure = error;
    finished = true;
    done.countDown();
  }

  @Override
  public void onCompleted() {
    finished = true;
    done.countDown();
  }

  /**
   * Waits for the stream to end, then returns its summary or throws what ended it: the result
   * handler's exception, the source's, or the call's failure.
   */
  SendSummary await() throws InterruptedException {
    try {
      done.await();
    } catch (InterruptedException interrupted) {
      requests.cancel("interrupted", interrupted);
      throw interrupted;
    }
    if (handlerFailure != null) {
      throw handlerFailure;
    }
    if (sourceFailure != null) {
      throw sourceFailure;
    }
    if (failure != null) {
      throw CanvasGatewayException.from(failure);
    }
    return summary;
  }
}
