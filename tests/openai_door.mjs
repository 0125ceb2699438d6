// The official Node `openai` SDK against the HTTP door: one chat completion, one stream
// with usage. Usage: node tests/openai_door.mjs BASE_URL; prints one line per check.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
const messages = [{ role: "user", content: "Hi" }];

const reply = await client.chat.completions.create({ model: "gemma3n:e2b", messages });
console.log(`chat: ${reply.choices[0].message.content} [${reply.choices[0].finish_reason}, ` +
            `${reply.usage.completion_tokens} tokens]`);

const stream = await client.chat.completions.create({
  model: "gemma3n:e2b", messages, stream: true, stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}
console.log(`stream: ${text} [${usage.completion_tokens} tokens]`);
