// The official Node `openai` SDK against the HTTP door: one tool round trip (the model
// calls the tool, the script answers it, the model finishes).
// Usage: node tests/openai_door_tools.mjs BASE_URL; prints one line per turn.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
const tools = [{
  type: "function",
  function: {
    name: "get_weather", description: "The weather in a city.",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
}];
const messages = [{ role: "user", content: "What is the weather in Paris?" }];

const first = await client.chat.completions.create({ model: "gemma3n:e2b", messages, tools });
const { message, finish_reason } = first.choices[0];
const [call] = message.tool_calls;
console.log(`call: ${call.function.name} ${call.function.arguments} [${finish_reason}]`);

messages.push(message, { role: "tool", tool_call_id: call.id, content: "sunny, 21C" });
const second = await client.chat.completions.create({ model: "gemma3n:e2b", messages, tools });
console.log(`answer: ${second.choices[0].message.content} [${second.choices[0].finish_reason}]`);
