// Drives a server with the TypeScript SDK v1 client (@modelcontextprotocol/sdk,
// pinned in package.json), as an independent, strict client: it validates every
// tool result's structuredContent against the tool's declared outputSchema.
//
// usage: node ts_sdk_client.mjs CALLS_JSON (--http URL | --stdio COMMAND ARG...)
// CALLS_JSON is a list of {"name": tool, "arguments": {...}}. Prints one JSON
// line per call: {"ok": true, "isError", "text", "structuredContent"} or
// {"ok": false, "error": message} when the client threw.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [callsJson, mode, ...rest] = process.argv.slice(2);
const calls = JSON.parse(callsJson);
let transport;
if (mode === "--http") {
  transport = new StreamableHTTPClientTransport(new URL(rest[0]));
} else if (mode === "--stdio") {
  // The SDK passes only a few variables by default; the server needs ours.
  transport = new StdioClientTransport({ command: rest[0], args: rest.slice(1), env: process.env, stderr: "inherit" });
} else {
  console.error("usage: ts_sdk_client.mjs CALLS_JSON (--http URL | --stdio COMMAND ARG...)");
  process.exit(2);
}

const client = new Client({ name: "taskwarden-tests-ts-sdk-v1", version: "1.0.0" });
await client.connect(transport);
// listTools() caches each tool's output-schema validator, as real clients do.
await client.listTools();
for (const call of calls) {
  try {
    const result = await client.callTool(call);
    const text = (result.content ?? []).filter((c) => c.type === "text").map((c) => c.text).join("\n");
    console.log(JSON.stringify({ ok: true, isError: result.isError ?? false, text, structuredContent: result.structuredContent ?? null }));
  } catch (error) {
    console.log(JSON.stringify({ ok: false, error: String(error?.message ?? error) }));
  }
}
await client.close();
