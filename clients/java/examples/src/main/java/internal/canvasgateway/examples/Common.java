package internal.canvasgateway.examples;

import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import com.google.rpc.BadRequest;
import internal.canvasgateway.client.CanvasGatewayClient;
import internal.canvasgateway.client.CanvasGatewayException;
import internal.canvasgateway.client.SendSettings;
import internal.canvasgateway.v1.BatchResult;
import internal.canvasgateway.v1.CanvasTrigger;
import internal.canvasgateway.v1.Outcome;
import internal.canvasgateway.v1.Recipient;
import internal.canvasgateway.v1.SendSummary;
import io.grpc.ChannelCredentials;
import io.grpc.InsecureChannelCredentials;
import io.grpc.TlsChannelCredentials;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.regex.Pattern;

/**
 * What the two examples share: flags, the client (internal.canvasgateway:canvas-gateway-client), the
 * request, and the output lines of clients/README.md.
 */
final class Common {
  static final int EXIT_SENT = 0;
  static final int EXIT_NOT_SENT = 1;
  static final int EXIT_USAGE = 2;
  static final int EXIT_RPC_FAILED = 3;

  static final String SEND_STREAM = "send-stream";
  static final String SEND = "send";

  private static final Pattern DIGITS = Pattern.compile("\\d+");
  private static final Pattern LINE_BREAKS = Pattern.compile("\\s*[\\r\\n]+\\s*");

  private Common() {}

  /** The flags of clients/README.md and the token from CANVAS_GATEWAY_TOKEN. */
  record Options(
      String target,
      boolean tls,
      byte[] caCert, // the --ca-file PEM, or null
      String canvasId,
      int recipients,
      int chunkSize,
      boolean badEmail,
      String idempotencyKey, // SendOptions.idempotency_key; "" sends without one
      int contextKeys, // more keys key-0 ... key-<N-1> in the top-level context and each recipient's
      String token) {}

  /** A bad flag or a missing token: the program prints it and exits 2. */
  static final class UsageError extends Exception {
    private static final long serialVersionUID = 1L;

    UsageError(String message) {
      super(message);
    }
  }

  /** The body of an example: returns the exit status. */
  @FunctionalInterface
  interface Program {
    int run(Options options) throws Exception;
  }

  private static String usage(String program) {
    return SEND.equals(program)
        ? "usage: send [--target HOST:PORT] [--tls] [--ca-file PEM] [--canvas-id ID] [--recipients N] [--bad-email] [--idempotency-key KEY] [--context-keys N]"
        : "usage: send-stream [--target HOST:PORT] [--tls] [--ca-file PEM] [--canvas-id ID] [--recipients N] [--chunk-size N] [--idempotency-key KEY] [--context-keys N]";
  }

  private static int integer(String flag, String value, int fallback, int min) throws UsageError {
    if (value == null) {
      return fallback;
    }
    try {
      if (DIGITS.matcher(value).matches()) {
        int parsed = Integer.parseInt(value);
        if (parsed >= min) {
          return parsed;
        }
      }
    } catch (NumberFormatException tooLarge) {
      // reported below
    }
    throw new UsageError("--" + flag + " must be an integer >= " + min + ", not \"" + value + "\"");
  }

  /** Reads the flags (--flag value or --flag=value) and the token. */
  static Options parseOptions(String program, String[] args) throws UsageError {
    String target = "127.0.0.1:50051";
    boolean tls = false;
    String caFile = null;
    String canvasId = "canvas-gateway-demo";
    String recipients = null;
    String chunkSize = null;
    boolean badEmail = false;
    String idempotencyKey = "";
    String contextKeys = null;
    for (int i = 0; i < args.length; i++) {
      String arg = args[i];
      String name = arg;
      String inline = null;
      int equals = arg.indexOf('=');
      if (arg.startsWith("--") && equals > 0) {
        name = arg.substring(0, equals);
        inline = arg.substring(equals + 1);
      }
      switch (name) {
        case "--tls", "--bad-email" -> {
          if (inline != null) {
            throw new UsageError(name + " takes no value");
          }
          if (name.equals("--tls")) {
            tls = true;
          } else if (SEND.equals(program)) {
            badEmail = true;
          } else {
            throw new UsageError("--bad-email is a send flag");
          }
        }
        case "--target",
            "--ca-file",
            "--canvas-id",
            "--recipients",
            "--chunk-size",
            "--idempotency-key",
            "--context-keys" -> {
          String value = inline;
          if (value == null) {
            if (i + 1 >= args.length) {
              throw new UsageError(name + " needs a value");
            }
            value = args[++i];
          }
          switch (name) {
            case "--target" -> target = value;
            case "--ca-file" -> caFile = value;
            case "--canvas-id" -> canvasId = value;
            case "--recipients" -> recipients = value;
            case "--idempotency-key" -> idempotencyKey = value;
            case "--context-keys" -> contextKeys = value;
            default -> {
              if (SEND.equals(program)) {
                throw new UsageError("--chunk-size is a send-stream flag");
              }
              chunkSize = value;
            }
          }
        }
        default -> throw new UsageError("unknown argument " + arg);
      }
    }
    byte[] caCert = null;
    if (caFile != null) {
      try {
        caCert = Files.readAllBytes(Path.of(caFile));
      } catch (IOException | RuntimeException error) {
        throw new UsageError("--ca-file: cannot read " + caFile + ": " + error);
      }
    }
    String token = System.getenv("CANVAS_GATEWAY_TOKEN");
    if (token == null || token.isEmpty()) {
      throw new UsageError("set CANVAS_GATEWAY_TOKEN to the gateway's bearer token");
    }
    return new Options(
        target,
        tls || caCert != null,
        caCert,
        canvasId,
        integer("recipients", recipients, SEND.equals(program) ? 120 : 1000, 0),
        integer("chunk-size", chunkSize, 500, 1),
        badEmail,
        idempotencyKey,
        integer("context-keys", contextKeys, 0, 0),
        token);
  }

  /** A client of the gateway: plaintext, or TLS trusting the system's roots or the CA file. */
  static CanvasGatewayClient connect(Options options) throws IOException {
    ChannelCredentials credentials;
    if (options.caCert() != null) {
      credentials =
          TlsChannelCredentials.newBuilder()
              .trustManager(new ByteArrayInputStream(options.caCert()))
              .build();
    } else if (options.tls()) {
      credentials = TlsChannelCredentials.create();
    } else {
      credentials = InsecureChannelCredentials.create();
    }
    return CanvasGatewayClient.newBuilder(options.target(), options.token())
        .credentials(credentials)
        .build();
  }

  /**
   * {@code count} recipients user-i from i = {@code from}, each with the context {"index": i} and
   * {@code keys} more keys (--context-keys).
   */
  static List<Recipient> recipients(int count, int from, int keys) {
    List<Recipient> people = new ArrayList<>(count);
    for (int i = from; i < from + count; i++) {
      people.add(
          Recipient.newBuilder()
              .setExternalUserId("user-" + i)
              .setContext(contextOf("index", Value.newBuilder().setNumberValue(i).build(), keys))
              .build());
    }
    return people;
  }

  /** The Canvas, the top-level context (with {@code keys} more keys) and the recipients given. */
  static CanvasTrigger trigger(String canvasId, List<Recipient> people, int keys) {
    return CanvasTrigger.newBuilder()
        .setCanvasId(canvasId)
        .setContext(contextOf("campaign", Value.newBuilder().setStringValue("example").build(), keys))
        .addAllRecipients(people)
        .build();
  }

  /**
   * {name: value} and {@code keys} more keys key-j: j, put in a random order: Java's protobuf
   * writes a Struct's entries in the order they were put, and a repeat is the same request with
   * its map in another order (as grpc-go writes maps).
   */
  private static Struct contextOf(String name, Value value, int keys) {
    List<String> names = new ArrayList<>(List.of(name));
    for (int j = 0; j < keys; j++) {
      names.add("key-" + j);
    }
    Collections.shuffle(names);
    Struct.Builder struct = Struct.newBuilder();
    for (String key : names) {
      struct.putFields(
          key,
          key.equals(name)
              ? value
              : Value.newBuilder().setNumberValue(Integer.parseInt(key.substring(4))).build());
    }
    return struct.build();
  }

  /** The settings of the call: the idempotency key, if any, and the stream's chunk size. */
  static SendSettings settings(Options options) {
    return SendSettings.DEFAULT
        .withIdempotencyKey(options.idempotencyKey())
        .withChunkSize(options.chunkSize());
  }

  private static String orDash(String value) {
    return value.isEmpty() ? "-" : value;
  }

  /**
   * One {@code result ...} line, ending {@code replayed=true} when the result was kept from an
   * earlier call under the same idempotency key.
   */
  static String resultLine(BatchResult result) {
    String line =
        String.join(
            " ",
            "result",
            "batch=" + result.getBatchIndex(),
            "outcome=" + result.getOutcome().name(),
            "code=" + result.getCode().name(),
            "recipients=" + result.getPositionsCount(),
            "first="
                + (result.getPositionsCount() > 0 ? Long.toString(result.getPositions(0)) : "-"),
            "dispatch_id=" + orDash(result.getBraze().getDispatchId()));
    return result.getReplayed() ? line + " replayed=true" : line;
  }

  static String summaryLine(SendSummary summary) {
    return String.join(
        " ",
        "summary",
        "recipients=" + summary.getRecipients(),
        "batches=" + summary.getBatches(),
        "sent=" + summary.getRecipientsSent(),
        "request_id=" + orDash(summary.getRequestId()));
  }

  /** 0 when every result is SENT (or there is none), else 1. */
  static int exitStatus(boolean allSent) {
    return allSent ? EXIT_SENT : EXIT_NOT_SENT;
  }

  /** Whether a result is SENT. */
  static boolean sent(BatchResult result) {
    return result.getOutcome() == Outcome.OUTCOME_SENT;
  }

  /** Prints a failed RPC and its google.rpc.BadRequest field violations to stderr; returns 3. */
  static int reportError(CanvasGatewayException error) {
    String message = LINE_BREAKS.matcher(error.description()).replaceAll(" ").trim();
    System.err.println("error code=" + error.code().name() + " message=" + message);
    for (BadRequest.FieldViolation violation : error.violations()) {
      System.err.println(
          "violation field=" + violation.getField() + " description=" + violation.getDescription());
    }
    return EXIT_RPC_FAILED;
  }

  /** Runs an example: a usage error exits 2, anything else with what {@code body} returns. */
  static void main(String program, String[] args, Program body) {
    int code;
    try {
      code = body.run(parseOptions(program, args));
    } catch (UsageError error) {
      System.err.println(program + ": " + error.getMessage());
      System.err.println(usage(program));
      code = EXIT_USAGE;
    } catch (Exception error) {
      System.err.println(program + ": " + error);
      code = EXIT_RPC_FAILED;
    }
    System.out.flush();
    System.err.flush();
    System.exit(code);
  }
}
