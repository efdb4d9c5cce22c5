// The demo page: one streaming completion at a time, read with fetch + ReadableStream (the API's SSE
// is a POST, which EventSource cannot send). Model output is only ever inserted as text.
"use strict";

const VICUNA = "A chat between a curious user and an artificial intelligence assistant. " +
  "The assistant gives helpful, detailed, and polite answers to the user's questions. USER: {prompt} ASSISTANT:";
const $ = (id) => document.getElementById(id);
let controller = null;

function show(id, value) { $(id).textContent = value; }

function setStatus(text, isError = false) {
  show("status", text);
  $("status").classList.toggle("error", isError);
}

function appendStep(text, tokens, step) {
  const span = document.createElement("span");
  span.textContent = text;  // never innerHTML: model output is text
  span.className = tokens > 1 ? `step s${step % 6}` : "step single";
  span.title = `decode step ${step}: ${tokens} token${tokens === 1 ? "" : "s"}`;
  $("output").appendChild(span);
}

function request() {
  const prompt = $("prompt").value;
  return {
    prompt: $("chat").checked ? VICUNA.replace("{prompt}", prompt) : prompt,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    speculative: $("speculative").checked,
    stream: true,
    stream_options: { include_usage: true },
    logprobs: 0,  // each chunk then lists its tokens: how many one decode step produced
  };
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// Yields the parsed JSON of each `data:` event until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;  // ":" lines are keep-alive pings
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function generate(event) {
  event.preventDefault();
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("output").replaceChildren();
  for (const id of ["tokens", "steps"]) show(id, "0");
  for (const id of ["rate", "per-step", "ttft"]) show(id, "–");
  setStatus("waiting for the server…");
  const body = request();
  const headers = { "content-type": "application/json" };
  if ($("api-key").value) headers.authorization = `Bearer ${$("api-key").value}`;
  const start = performance.now();
  let first = null, tokens = 0, steps = 0;
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    setStatus("streaming…");
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.metrics) {  // the usage chunk: the server's own figures
        if (chunk.metrics.accepted_tokens_per_step != null) show("per-step", chunk.metrics.accepted_tokens_per_step.toFixed(2));
        if (chunk.metrics.ttft_ms != null) show("ttft", `${Math.round(chunk.metrics.ttft_ms)} ms`);
        continue;
      }
      for (const choice of chunk.choices || []) {
        const count = choice.logprobs ? choice.logprobs.tokens.length : 0;
        if (count === 0 && !choice.text) continue;
        const now = performance.now();
        if (first === null) {  // the prefill's token
          first = now;
          show("ttft", `${Math.round(now - start)} ms`);
        } else {
          steps += 1;
        }
        tokens += count;
        appendStep(choice.text, count, steps);
        show("tokens", String(tokens));
        show("steps", String(steps));
        if (steps > 0) {
          show("per-step", ((tokens - 1) / steps).toFixed(2));
          show("rate", ((tokens - 1) / ((now - first) / 1000)).toFixed(1));
        }
      }
    }
    setStatus("done");
  } catch (err) {
    setStatus(err.name === "AbortError" ? "stopped" : `error: ${err.message}`, err.name !== "AbortError");
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
