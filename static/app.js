// The demo page: a chat over POST /v1/chat/completions, streamed with fetch + ReadableStream (the
// API's SSE is a POST, which EventSource cannot send). Every request sends the whole conversation.
// Model output is only ever inserted as text.
"use strict";

const $ = (id) => document.getElementById(id);
const messages = [];  // the conversation so far: {role, content}
let controller = null;

function show(id, value) { $(id).textContent = value; }

function setStatus(text, isError = false) {
  show("status", text);
  $("status").classList.toggle("error", isError);
}

function addTurn(role, text = "") {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  turn.textContent = text;  // never innerHTML: text stays text
  $("conversation").appendChild(turn);
  return turn;
}

function appendStep(turn, text, tokens, step) {
  const span = document.createElement("span");
  span.textContent = text;
  span.className = tokens > 1 ? `step s${step % 6}` : "step single";
  span.title = `decode step ${step}: ${tokens} token${tokens === 1 ? "" : "s"}`;
  turn.appendChild(span);
}

function request() {
  const system = $("system").value.trim();
  return {
    messages: system ? [{ role: "system", content: system }, ...messages] : [...messages],
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    speculative: $("speculative").checked,
    stream: true,
    stream_options: { include_usage: true },
    logprobs: true,  // each chunk then lists its tokens: how many one decode step produced
    top_logprobs: 0,
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

function busy(on) {
  $("send").disabled = on;
  $("regenerate").disabled = on || !messages.some((m) => m.role === "assistant");
  $("clear").disabled = on;
  $("stop").disabled = !on;
}

// Streams the assistant's answer to the conversation so far into a new turn; the answer (or as much
// of it as came before Stop) joins the conversation.
async function answer() {
  controller = new AbortController();
  busy(true);
  for (const id of ["tokens", "steps"]) show(id, "0");
  for (const id of ["rate", "per-step", "ttft"]) show(id, "–");
  setStatus("waiting for the server…");
  const turn = addTurn("assistant");
  const headers = { "content-type": "application/json" };
  if ($("api-key").value) headers.authorization = `Bearer ${$("api-key").value}`;
  const start = performance.now();
  let first = null, tokens = 0, steps = 0, text = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(request()), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    setStatus("streaming…");
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.metrics) {  // the usage chunk: the server's own figures (its steps include one that only ended the turn)
        show("steps", String(chunk.metrics.decode_steps));
        if (chunk.metrics.accepted_tokens_per_step != null) show("per-step", chunk.metrics.accepted_tokens_per_step.toFixed(2));
        if (chunk.metrics.ttft_ms != null) show("ttft", `${Math.round(chunk.metrics.ttft_ms)} ms`);
        continue;
      }
      for (const choice of chunk.choices || []) {
        const count = choice.logprobs ? choice.logprobs.content.length : 0;
        const delta = choice.delta.content || "";
        if (count === 0 && !delta) continue;
        const now = performance.now();
        if (first === null) {  // the prefill's token
          first = now;
          show("ttft", `${Math.round(now - start)} ms`);
        } else {
          steps += 1;
        }
        tokens += count;
        text += delta;
        appendStep(turn, delta, count, steps);
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
    if (text) {
      messages.push({ role: "assistant", content: text });
    } else {
      turn.remove();
    }
    controller = null;
    busy(false);
  }
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const content = $("message").value.trim();
  if (!content || controller) return;
  messages.push({ role: "user", content });
  addTurn("user", content);
  $("message").value = "";
  answer();
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("regenerate").addEventListener("click", () => {
  if (controller || messages.at(-1)?.role !== "assistant") return;
  messages.pop();
  $("conversation").lastElementChild.remove();
  answer();
});
$("clear").addEventListener("click", () => {
  messages.length = 0;
  $("conversation").replaceChildren();
  setStatus("");
  busy(false);
});
