package internal.canvasgateway.client;

import internal.canvasgateway.v1.SendOptions;
import java.time.Duration;
import java.util.Objects;

/**
 * What varies from one call to the next: an immutable value, so one can be kept as a constant
 * and varied with the {@code with...} methods.
 *
 * <pre>{@code
 * SendSettings settings = SendSettings.DEFAULT
 *     .withIdempotencyKey("order-2026-11-29.a")
 *     .withDeadline(Duration.ofSeconds(30));
 * }</pre>
 *
 * @param idempotencyKey {@code SendOptions.idempotency_key} (1 to 128 of {@code [A-Za-z0-9._:-]},
 *     scoped to your tenant), or {@code ""} for none. With a key the gateway keeps each batch's
 *     final result: the same request sent again with the same key sends nothing twice, and the
 *     results it kept come back with {@code replayed} true.
 * @param validateOnly {@code SendOptions.validate_only}: the gateway validates and sends nothing
 * @param deadline the call's deadline, from when it starts, or {@code null} for none
 * @param chunkSize recipients per stream message ({@code sendStream} only): hundreds per message
 *     keep the gateway's CPU cost low
 */
public record SendSettings(
    String idempotencyKey, boolean validateOnly, Duration deadline, int chunkSize) {

  /** The default chunk size: 500 recipients per stream message. */
  public static final int DEFAULT_CHUNK_SIZE = 500;

  /** No idempotency key, not validate-only, no deadline, chunks of 500. */
  public static final SendSettings DEFAULT =
      new SendSettings("", false, null, DEFAULT_CHUNK_SIZE);

  /**
   * Checks the values.
   *
   * @param idempotencyKey the idempotency key, or {@code ""} for none
   * @param validateOnly whether the gateway only validates
   * @param deadline the call's deadline, or {@code null} for none
   * @param chunkSize recipients per stream message
   * @throws NullPointerException if {@code idempotencyKey} is null
   * @throws IllegalArgumentException if {@code deadline} is not positive or {@code chunkSize} is
   *     below 1
   */
  public SendSettings {
    Objects.requireNonNull(idempotencyKey, "idempotencyKey (\"\" for none)");
    if (deadline != null && (deadline.isNegative() || deadline.isZero())) {
      throw new IllegalArgumentException("deadline must be positive, not " + deadline);
    }
    if (chunkSize < 1) {
      throw new IllegalArgumentException("chunkSize must be at least 1, not " + chunkSize);
    }
  }

  /**
   * These settings with another idempotency key.
   *
   * @param key the key, or {@code ""} for none
   * @return the new settings
   */
  public SendSettings withIdempotencyKey(String key) {
    return new SendSettings(key, validateOnly, deadline, chunkSize);
  }

  /**
   * These settings with validate-only on or off.
   *
   * @param on whether the gateway only validates
   * @return the new settings
   */
  public SendSettings withValidateOnly(boolean on) {
    return new SendSettings(idempotencyKey, on, deadline, chunkSize);
  }

  /**
   * These settings with another deadline.
   *
   * @param timeout the deadline from the call's start, or {@code null} for none
   * @return the new settings
   */
  public SendSettings withDeadline(Duration timeout) {
    return new SendSettings(idempotencyKey, validateOnly, timeout, chunkSize);
  }

  /**
   * These settings with another chunk size.
   *
   * @param size recipients per stream message, at least 1
   * @return the new settings
   */
  public SendSettings withChunkSize(int size) {
    return new SendSettings(idempotencyKey, validateOnly, deadline, size);
  }

  /** The request's {@code SendOptions}; the default instance when there is nothing to send. */
  SendOptions options() {
    return SendOptions.newBuilder()
        .setIdempotencyKey(idempotencyKey)
        .setValidateOnly(validateOnly)
        .build();
  }
}
