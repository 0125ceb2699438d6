// The official Node `openai` SDK against the HTTP door's /v1/responses: an agent run in the
// foreground, one streamed, one in the background resumed after a sequence number, one
// cancelled. Usage: node tests/openai_door_responses.mjs BASE_URL; one line per check.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
const model = "gemma3n:e2b";
const input = "What is 17*23? Use the calculator.";
const tools = [{ type: "function", name: "calculator" }];

const response = await client.responses.create({ model, input, tools });
console.log(`foreground: ${response.status} ${response.output.map((item) => item.type)} ` +
            `${response.output_text}`);

const stream = await client.responses.create({ model, input, tools, stream: true });
let text = "";
const numbers = [];
let last = "";
for await (const event of stream) {
  numbers.push(event.sequence_number);
  if (event.type === "response.output_text.delta") text += event.delta;
  last = event.type;
}
const ordered = numbers.every((number, index) => number === index);
console.log(`stream: ${text} [${last}, numbered in order: ${ordered}]`);

const started = await client.responses.create({ model, input, tools: [], background: true });
const resumed = await client.responses.retrieve(started.id, { stream: true, starting_after: 1 });
const after = [];
for await (const event of resumed) after.push(event.sequence_number);
const done = await client.responses.retrieve(started.id);
console.log(`background: ${started.background}, resumed at ${after[0]}, ${done.status} ` +
            `${done.output_text}`);

const hanging = await client.responses.create({ model, input, tools: [], background: true });
const cancelled = await client.responses.cancel(hanging.id);
console.log(`cancel: ${cancelled.status}`);
