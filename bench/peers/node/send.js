'use strict';
// The peers benchmark's Node peer: the npm package braze-api used as its README shows
// (`new Braze(apiUrl, apiKey)`, then one awaited call per request), here
// `braze.canvas.trigger.send(body)`, which POSTs one body to {apiUrl}/canvas/trigger/send with
// `Authorization: Bearer {apiKey}`. Splitting recipients into calls of at most 50 is the user's
// job, so this loop does it, one call at a time, as the README's `await` does.
//
//   node send.js URL API_KEY N CANVAS_ID CONTEXT_JSON
//
// Prints {"sent": <recipients in calls answered 2xx with a dispatch_id>}; any other answer
// makes braze-api throw, and the script exits 1.
const { Braze } = require('braze-api');

async function main() {
  const [url, key, count, canvasId, contextJson] = process.argv.slice(2);
  const n = Number(count);
  const context = JSON.parse(contextJson);
  const braze = new Braze(url, key);
  let sent = 0;
  for (let start = 0; start < n; start += 50) {
    const recipients = [];
    for (let i = start; i < Math.min(start + 50, n); i++) {
      recipients.push({ external_user_id: `user-${i}`, context: { order: i } });
    }
    const reply = await braze.canvas.trigger.send({ canvas_id: canvasId, context, recipients });
    if (reply.dispatch_id) {
      sent += recipients.length;
    }
  }
  console.log(JSON.stringify({ sent }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
