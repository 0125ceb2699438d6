#!/usr/bin/env node
// Calling agentloop from Node with @grpc/grpc-js and @grpc/proto-loader: the protos are
// loaded at run time from protos/ (no generated code), the health proto from the
// grpc-health-check package. It checks health, lists the server tools, calls Generate,
// reads StreamGenerate, embeds two texts with Embed, calls a JavaScript function the model asks
// for through Generate (function calling: the model's tool call, this process's result as a
// tool turn, the model's answer), runs StreamRunAgent with a tool written in JavaScript that
// the agent may call, and runs a background run (start, watch with resume, get, cancel).
//
//   node clients/node/example.js --address 127.0.0.1:50051 [--api-key KEY] [--timeout 300]
//                                [--session CONVERSATION_ID]
//
// --session sends the conversation affinity header `x-agentloop-session` on every call.
// grpc-js has no policy that hashes a header (its ring_hash lives in @grpc/grpc-js-xds and
// takes the hash only from an xDS route), so a Node caller gets affinity from whatever
// hashes the header in front of the replicas: Envoy or an Istio sidecar / gateway
// (k8s/affinity/), or an xDS control plane whose route hash_policy names the header.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const healthCheck = require('grpc-health-check');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
// keepCase keeps the proto's snake_case field names; oneofs adds a property naming the
// field a oneof holds (event.event === 'tool_call').
const LOAD_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };
// The same channel set-up as the Python client: round_robin over every address the name
// resolves to, and retries of UNAVAILABLE (a draining or restarting replica) with backoff.
const SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [{
    name: [{ service: 'agentloop.v1.AgentLoopService' }],
    retryPolicy: {
      maxAttempts: 4,
      initialBackoff: '0.1s',
      maxBackoff: '2s',
      backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE'],
    },
  }],
};

// A client tool: the server sends an AgentToolCall for it, this process runs it and answers
// with a ClientToolResult carrying the same call_id.
const CLIENT_TOOLS = {
  reverse_text: {
    description: 'Reverses a piece of text, character by character.',
    parameters: {
      type: 'object',
      properties: { text: { type: 'string', description: 'the text to reverse' } },
      required: ['text'],
    },
    run: ({ text }) => [...text].reverse().join(''),
  },
};

// Balancers that hash this header send every call of a conversation to one replica.
const SESSION_HEADER = 'x-agentloop-session';

function connect(address, apiKey, session) {
  const options = {
    'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
    'grpc.keepalive_time_ms': 60000,
  };
  const credentials = grpc.credentials.createInsecure();
  const agentloop = grpc.loadPackageDefinition(
    protoLoader.loadSync('agentloop/v1/agentloop.proto', { ...LOAD_OPTIONS, includeDirs: [PROTO_ROOT] }),
  ).agentloop.v1;
  const health = grpc.loadPackageDefinition(
    protoLoader.loadSync(healthCheck.protoPath, LOAD_OPTIONS),
  ).grpc.health.v1;
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.set('authorization', `Bearer ${apiKey}`);
  if (session) metadata.set(SESSION_HEADER, session);
  return {
    service: new agentloop.AgentLoopService(address, credentials, options),
    health: new health.Health(address, credentials, options),
    metadata,
  };
}

// A unary call as a promise.
function unary(client, method, request, metadata, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function seconds(duration) {
  return duration ? Number(duration.seconds) + duration.nanos / 1e9 : 0;
}

async function streamGenerate(client, request, metadata, deadline) {
  const call = client.StreamGenerate(request, metadata, { deadline });
  let last = null;
  for await (const message of call) {
    process.stdout.write(message.text);
    last = message;
  }
  return last;
}

// StreamRunAgent: start the run, print each event, answer client tool calls.
function runAgent(client, start, metadata, deadline) {
  return new Promise((resolve, reject) => {
    const call = client.StreamRunAgent(metadata, { deadline });
    let finished = null;
    call.on('data', (message) => {
      const event = message[message.event];
      switch (message.event) {
        case 'step_started':
          console.log(`agent: step ${event.step}`);
          break;
        case 'thought':
          console.log(`agent: thought: ${event.thought}`);
          break;
        case 'tool_call':
          console.log(`agent: call ${event.tool} ${event.arguments_json}${event.client_tool ? ' (client tool)' : ''}`);
          if (event.client_tool) call.write({ tool_result: runClientTool(event) });
          break;
        case 'tool_result':
          console.log(`agent: ${event.is_error ? 'error' : 'result'}: ${event.observation}`);
          break;
        case 'finished':
          finished = event;
          console.log(`agent: ${event.stop_reason} ${event.final_answer}`);
          call.end();
          break;
        default:
          break;
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve(finished));
    call.write({ start });
  });
}

// A background run: StartAgentRun returns at once with the run's id; WatchAgentRun follows
// it from the last sequence number seen (again after a dropped stream: nothing is missed or
// repeated) until run_ended; GetAgentRun reads it; CancelAgentRun stops one (idempotent).
async function backgroundRun(client, goal, metadata, deadline) {
  const { run } = await unary(client, 'StartAgentRun', { run: { goal, tools: ['calculator'] } },
    metadata, deadline());
  console.log(`run: started, ${run.status}`);
  let seen = 0;
  let ended = null;
  while (!ended) {
    try {
      const call = client.WatchAgentRun({ run_id: run.id, after_sequence: seen }, metadata,
        { deadline: deadline() });
      for await (const message of call) {
        seen = Number(message.sequence);
        if (message.event === 'run_ended') ended = message.run_ended;
      }
    } catch (error) {
      if (error.code !== grpc.status.UNAVAILABLE) throw error;
    }
  }
  console.log(`run: ${ended.status} after ${seen} events`);
  const { run: done } = await unary(client, 'GetAgentRun', { run_id: run.id }, metadata, deadline());
  console.log(`run: answer ${done.final_answer} in ${done.steps.length} steps`);
  const { run: again } = await unary(client, 'CancelAgentRun', { run_id: run.id }, metadata,
    deadline());
  console.log(`run: cancelled after its end, still ${again.status}`);
  return done;
}

// Function calling through Generate: the model answers with tool calls, this process runs
// them and sends each result back as a ROLE_TOOL turn carrying the call's id, until the
// model answers with text (at most `rounds` times).
async function callFunctions(client, prompt, metadata, deadline, rounds = 3) {
  const tools = Object.entries(CLIENT_TOOLS).map(([name, tool]) => ({
    name, description: tool.description, parameters_json_schema: JSON.stringify(tool.parameters),
  }));
  const messages = [{ role: 'ROLE_USER', content: prompt }];
  for (let round = 0; round < rounds; round += 1) {
    const reply = await unary(client, 'Generate', { messages, tools }, metadata, deadline());
    if (reply.finish_reason !== 'FINISH_REASON_TOOL_CALLS') return reply;
    messages.push({ role: 'ROLE_ASSISTANT', content: reply.text, tool_calls: reply.tool_calls });
    for (const call of reply.tool_calls) {
      console.log(`functions: call ${call.name} ${call.arguments_json}`);
      const result = runClientTool({ call_id: call.id, tool: call.name, arguments_json: call.arguments_json });
      messages.push({ role: 'ROLE_TOOL', tool_call_id: call.id, content: result.output ?? result.error });
    }
  }
  throw new Error('the model kept calling functions');
}

function runClientTool(call) {
  const tool = CLIENT_TOOLS[call.tool];
  try {
    if (!tool) throw new Error(`no client tool named ${call.tool}`);
    const output = tool.run(JSON.parse(call.arguments_json || '{}'));
    return { call_id: call.call_id, output: typeof output === 'string' ? output : JSON.stringify(output) };
  } catch (error) {
    return { call_id: call.call_id, error: String(error.message || error) };
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      address: { type: 'string', default: process.env.AGENTLOOP_ADDRESS || '127.0.0.1:50051' },
      'api-key': { type: 'string', default: process.env.AGENTLOOP_API_KEY || '' },
      timeout: { type: 'string', default: '300' },
      prompt: { type: 'string', default: 'Write one sentence about the sea.' },
      goal: { type: 'string', default: 'Reverse the text "agentloop" with the reverse_text tool.' },
      session: { type: 'string', default: '' },
    },
  });
  const { service, health, metadata } = connect(values.address, values['api-key'], values.session);
  const deadline = () => Date.now() + Number(values.timeout) * 1000;
  try {
    const status = await unary(health, 'Check', { service: 'readiness' }, metadata, deadline());
    console.log(`health: ${status.status}`);

    const { tools } = await unary(service, 'ListTools', {}, metadata, deadline());
    console.log(`tools: ${tools.map((tool) => tool.name).join(', ')}`);

    const reply = await unary(service, 'Generate', { prompt: values.prompt, options: { max_tokens: 64 } },
      metadata, deadline());
    console.log(`generate: ${reply.text} [${reply.finish_reason}, ${reply.usage.output_tokens} tokens]`);

    process.stdout.write('stream: ');
    const last = await streamGenerate(service, { prompt: values.prompt, options: { max_tokens: 64 } },
      metadata, deadline());
    console.log(` [${last.finish_reason}, first token after ${seconds(last.timings.time_to_first_token).toFixed(3)}s]`);

    // Embed: one vector per text, in order (`values` is a packed float array on the wire).
    const embedded = await unary(service, 'Embed', { texts: ['a cat sat on the mat', 'a kitten sat on the rug'] },
      metadata, deadline());
    const [cat, kitten] = embedded.embeddings.map((embedding) => embedding.values);
    const cosine = cat.reduce((sum, value, index) => sum + value * kitten[index], 0);
    console.log(`embed: ${embedded.embeddings.length} vectors of ${embedded.dimensions} dimensions, `
      + `${embedded.usage.input_tokens} tokens, cosine ${cosine.toFixed(2)}`);

    const answer = await callFunctions(service, 'Reverse the text "gRPC" with reverse_text.', metadata,
      deadline);
    console.log(`functions: answer ${answer.text} [${answer.finish_reason}]`);

    const clientTools = Object.entries(CLIENT_TOOLS).map(([name, tool]) => ({
      name, description: tool.description, parameters_json_schema: JSON.stringify(tool.parameters),
    }));
    const finished = await runAgent(service, { goal: values.goal, client_tools: clientTools }, metadata,
      deadline());
    const background = await backgroundRun(service, 'What is 17*23? Use the calculator.', metadata,
      deadline);
    return finished && finished.stop_reason === 'AGENT_STOP_REASON_FINAL_ANSWER'
      && background.status === 'AGENT_RUN_STATUS_COMPLETED' ? 0 : 1;
  } catch (error) {
    const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) || error.code;
    console.error(`example.js: ${code}: ${error.details || error.message}`);
    return 1;
  } finally {
    service.close();
    health.close();
  }
}

main().then((code) => { process.exitCode = code; });
