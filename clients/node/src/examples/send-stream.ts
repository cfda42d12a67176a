// send-stream: a SendStream of a header, then the recipients in chunks, written as fast as the
// stream accepts them; prints each result as it arrives, then the summary.
import { once } from "node:events";
import type { ServiceError, StatusObject } from "@grpc/grpc-js";
import {
  type BatchResult,
  RecipientChunk,
  type SendStreamResponse,
  StreamHeader,
} from "../gen/canvas_gateway/v1/canvas_gateway";
import {
  authorization,
  dial,
  exitStatus,
  main,
  type Options,
  recipients,
  reportError,
  resultLine,
  sendOptions,
  summaryLine,
  trigger,
} from "./common";

async function sendStream(options: Options): Promise<number> {
  const client = dial(options);
  const stream = client.sendStream(authorization(options.token));
  const results: BatchResult[] = [];
  let failure: ServiceError | undefined;

  // The RPC is over when the status has arrived and every message has been read ('end'), or
  // the status was an error.
  const statusReceived = new Promise<StatusObject>((resolve) => stream.once("status", resolve));
  const readDone = new Promise<void>((resolve) => {
    stream.on("data", (message: SendStreamResponse) => {
      if (message.part?.$case === "result") {
        results.push(message.part.value);
        console.log(resultLine(message.part.value));
      } else if (message.part?.$case === "summary") {
        console.log(summaryLine(message.part.value));
      }
    });
    stream.on("end", resolve);
    stream.on("error", (error: ServiceError) => {
      failure = error;
      resolve();
    });
  });

  // The header, then the chunks, waiting for 'drain' whenever write() returns false.
  try {
    const header = StreamHeader.create({ trigger: trigger(options.canvasId, [], options.contextKeys), options: sendOptions(options) });
    stream.write({ part: { $case: "header", value: header } });
    for (let start = 0; start < options.recipients; start += options.chunkSize) {
      const size = Math.min(options.chunkSize, options.recipients - start);
      const chunk = RecipientChunk.create({ recipients: recipients(size, start, options.contextKeys) });
      if (!stream.write({ part: { $case: "chunk", value: chunk } })) {
        await once(stream, "drain"); // rejects when the gateway ends the stream with an error
      }
    }
    stream.end();
  } catch {
    // The gateway ended the stream (an invalid header, a draining gateway): 'error' has it.
  }

  await Promise.all([statusReceived, readDone]);
  client.close();
  return failure ? reportError(failure) : exitStatus(results);
}

main("send-stream", sendStream);
