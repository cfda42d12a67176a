package internal.canvasgateway.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Message;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
import io.grpc.Status;
import io.grpc.protobuf.StatusProto;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Optional;
import java.util.OptionalLong;

/**
 * A call the gateway (or gRPC) failed as a whole: its status code and description, and the
 * gateway's error details read out of the status.
 *
 * <ul>
 *   <li>{@code INVALID_ARGUMENT}: nothing was sent; {@link #violations()} names the fields (a
 *       {@code Send} refused as a whole, or a stream's invalid header).
 *   <li>{@code UNAUTHENTICATED}, {@code PERMISSION_DENIED}: the token was refused.
 *   <li>{@code UNAVAILABLE}: the gateway is unreachable or draining; a draining gateway ending a
 *       stream says where to resume ({@link #resumePosition()}), and every {@code UNAVAILABLE} it
 *       returns itself carries a {@link #retryDelay()} of 0 s.
 * </ul>
 *
 * <p>A batch that fails inside a call that succeeds is no exception: it is a {@code BatchResult}
 * with its own outcome and code.
 */
public final class CanvasGatewayException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  /** {@code google.rpc.ErrorInfo.domain} of the gateway's own error details. */
  public static final String ERROR_DOMAIN = "canvas-gateway.internal";

  /** {@code ErrorInfo.reason} of a stream ended because the gateway drains. */
  public static final String DRAINING = "DRAINING";

  private final Status.Code code;
  private final String description;
  private final transient List<BadRequest.FieldViolation> violations;
  private final transient ErrorInfo errorInfo;
  private final transient RetryInfo retryInfo;

  private CanvasGatewayException(
      Status status,
      List<BadRequest.FieldViolation> violations,
      ErrorInfo errorInfo,
      RetryInfo retryInfo,
      Throwable cause) {
    super(
        status.getCode().name()
            + (status.getDescription() == null ? "" : ": " + status.getDescription()),
        cause);
    this.code = status.getCode();
    this.description = status.getDescription() == null ? "" : status.getDescription();
    this.violations = List.copyOf(violations);
    this.errorInfo = errorInfo;
    this.retryInfo = retryInfo;
  }

  /**
   * The exception for a failed call: the status of {@code error} ({@code UNKNOWN} for a throwable
   * that carries none) and the details of its {@code grpc-status-details-bin} trailer. A detail
   * that does not parse is skipped.
   *
   * @param error what the call failed with, usually a {@code StatusRuntimeException}
   * @return the exception, with {@code error} as its cause
   */
  public static CanvasGatewayException from(Throwable error) {
    Status status = Status.fromThrowable(error);
    List<BadRequest.FieldViolation> violations = new ArrayList<>();
    ErrorInfo errorInfo = null;
    RetryInfo retryInfo = null;
    com.google.rpc.Status rich = StatusProto.fromThrowable(error);
    for (Any detail : rich == null ? List.<Any>of() : rich.getDetailsList()) {
      BadRequest badRequest = unpack(detail, BadRequest.class);
      if (badRequest != null) {
        violations.addAll(badRequest.getFieldViolationsList());
      }
      if (errorInfo == null) {
        errorInfo = unpack(detail, ErrorInfo.class);
      }
      if (retryInfo == null) {
        retryInfo = unpack(detail, RetryInfo.class);
      }
    }
    return new CanvasGatewayException(status, violations, errorInfo, retryInfo, error);
  }

  private static <T extends Message> T unpack(Any detail, Class<T> type) {
    if (!detail.is(type)) {
      return null;
    }
    try {
      return detail.unpack(type);
    } catch (InvalidProtocolBufferException unreadable) {
      return null;
    }
  }

  /**
   * The gRPC status code.
   *
   * @return the code, e.g. {@code INVALID_ARGUMENT}
   */
  public Status.Code code() {
    return code;
  }

  /**
   * The status message.
   *
   * @return the description, or {@code ""} when there is none
   */
  public String description() {
    return description;
  }

  /**
   * The google.rpc.BadRequest field violations of the status details, in order.
   *
   * @return the violations (their {@code field} in Braze's JSON names, e.g. {@code
   *     recipients[3].email}); empty if none
   */
  public List<BadRequest.FieldViolation> violations() {
    return violations;
  }

  /**
   * The first google.rpc.ErrorInfo of the status details.
   *
   * @return the ErrorInfo, or empty
   */
  public Optional<ErrorInfo> errorInfo() {
    return Optional.ofNullable(errorInfo);
  }

  /**
   * How long to wait before trying again, from the google.rpc.RetryInfo of the status details.
   *
   * @return the delay (0 s: retry now, on another replica), or empty when there is no RetryInfo
   */
  public Optional<Duration> retryDelay() {
    return Optional.ofNullable(retryInfo)
        .map(
            info ->
                Duration.ofSeconds(
                    info.getRetryDelay().getSeconds(), info.getRetryDelay().getNanos()));
  }

  /**
   * Where to resume a stream the gateway ended because it drains: the first position of the
   * stream it did not read (every earlier one has a result). Open a new stream and send again the
   * recipients from there, plus those whose result was NOT_ATTEMPTED.
   *
   * @return the position, or empty when this is not such an ending
   */
  public OptionalLong resumePosition() {
    if (code != Status.Code.UNAVAILABLE
        || errorInfo == null
        || !ERROR_DOMAIN.equals(errorInfo.getDomain())
        || !DRAINING.equals(errorInfo.getReason())) {
      return OptionalLong.empty();
    }
    String text = errorInfo.getMetadataOrDefault("resume_position", "");
    return text.matches("\\d{1,18}") ? OptionalLong.of(Long.parseLong(text)) : OptionalLong.empty();
  }
}
