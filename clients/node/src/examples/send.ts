// send: one unary Send call with every recipient; prints the results in batch order.
import type { ServiceError } from "@grpc/grpc-js";
import { Recipient, SendRequest, type SendResponse } from "../gen/canvas_gateway/v1/canvas_gateway";
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

async function send(options: Options): Promise<number> {
  const people = recipients(options.recipients, 0, options.contextKeys);
  if (options.badEmail) {
    // An email recipient without `prioritization`: the gateway refuses the whole call.
    people.push(Recipient.create({ identifier: { $case: "email", value: "not-an-email" } }));
  }
  const request = SendRequest.create({ trigger: trigger(options.canvasId, people, options.contextKeys), options: sendOptions(options) });
  const client = dial(options);
  try {
    const response = await new Promise<SendResponse>((resolve, reject) => {
      client.send(request, authorization(options.token), (error: ServiceError | null, reply: SendResponse) =>
        error ? reject(error) : resolve(reply),
      );
    });
    for (const result of response.results) {
      console.log(resultLine(result));
    }
    if (response.summary) {
      console.log(summaryLine(response.summary));
    }
    return exitStatus(response.results);
  } catch (error) {
    return reportError(error as ServiceError);
  } finally {
    client.close();
  }
}

main("send", send);
