// The chat page: streams answers from /v1/chat/completions, keeps the conversation, shows each answer's speed,
// tau (tokens per target pass) and cached prompt tokens, and draws every verification round's draft tree with
// the path the target accepted. The trees come from the server's stream extension ("draft_trees": true).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // OpenAI-shaped messages of this chat
let rounds = [];          // the current answer's rounds: {round, tokens, parents, path, copied}
let controller = null;    // aborts the running request

function add(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

// -- the draft tree

const SVG = "http://www.w3.org/2000/svg";

function label(text) {
  const shown = text.replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5").replace(/ /g, "\u00b7");
  return shown.length > 9 ? shown.slice(0, 8) + "\u2026" : shown || "\u2205";
}

function element(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  parent.appendChild(el);
  return el;
}

// Depth from the left, one row per leaf (children in the drafter's order, best first), a parent on its first
// child's row.
function layout(parents) {
  const n = parents.length, children = Array.from({length: n}, () => []), depth = new Array(n).fill(0);
  for (let i = 1; i < n; i++) { children[parents[i]].push(i); depth[i] = depth[parents[i]] + 1; }
  const row = new Array(n).fill(0);
  let next = 0;
  const visit = (i) => {  // parents precede children, so an explicit stack is not needed for these sizes
    if (!children[i].length) { row[i] = next++; return; }
    children[i].forEach(visit);
    row[i] = row[children[i][0]];
  };
  visit(0);
  return {depth, row, rows: next};
}

function drawRound(r) {
  const box = $("tree");
  box.textContent = "";
  if (!r) return;
  $("round-label").textContent = `round ${r.round}: ${r.tokens.length} nodes, ${r.path.length - 1} accepted`;
  const {depth, row, rows} = layout(r.parents);
  const W = 74, H = 24, w = 62, h = 18, pad = 4;
  const svg = element("svg", {width: (Math.max(...depth) + 1) * W + pad * 2, height: rows * H + pad * 2,
                              "data-round": r.round, "data-nodes": r.tokens.length,
                              "data-accepted": r.path.length - 1}, box);
  const onPath = new Set(r.path);
  const x = (i) => pad + depth[i] * W, y = (i) => pad + row[i] * H;
  for (let i = 1; i < r.parents.length; i++) {
    const p = r.parents[i];
    element("path", {d: `M${x(p) + w},${y(p) + h / 2} C${x(p) + w + 8},${y(p) + h / 2} ${x(i) - 8},${y(i) + h / 2}` +
                        ` ${x(i)},${y(i) + h / 2}`,
                     class: "edge" + (onPath.has(i) && onPath.has(p) ? " accepted" : "")}, svg);
  }
  const copiedFrom = r.tokens.length - (r.copied || 0);
  r.tokens.forEach((token, i) => {
    const cls = ["node", i === 0 ? "root" : "", onPath.has(i) && i > 0 ? "accepted" : "",
                 i >= copiedFrom ? "copied" : ""].filter(Boolean).join(" ");
    const g = element("g", {class: cls, transform: `translate(${x(i)},${y(i)})`}, svg);
    element("title", {}, g).textContent = JSON.stringify(token) + (i >= copiedFrom ? " (copied from the context)" : "");
    element("rect", {width: w, height: h, rx: 4}, g);
    element("text", {x: 4, y: 13}, g).textContent = label(token);
  });
}

function showRound(index) {
  const pick = $("round-pick");
  pick.max = Math.max(rounds.length, 1);
  pick.disabled = rounds.length < 2;
  pick.value = index + 1;
  drawRound(rounds[index]);
}

$("round-pick").addEventListener("input", (e) => drawRound(rounds[e.target.value - 1]));

// -- asking

async function* events(response) {  // the data of each server-sent event
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function ask(text) {
  conversation.push({role: "user", content: text});
  add("user", text);
  const div = add("assistant", ""), body = div.querySelector(".text");
  const stats = document.createElement("span");
  stats.className = "stats";
  let answer = "", reasoning = "", thoughts = null, usage = null, toolCalls = [];
  const started = performance.now();
  let first = null;
  rounds = [];
  showRound(0);
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, signal: controller.signal,
      body: JSON.stringify({model: "default_model", messages: conversation, stream: true, draft_trees: true,
                            stream_options: {include_usage: true},
                            max_tokens: Number($("max-tokens").value) || 256,
                            temperature: Number($("temperature").value) || 0}),
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
    }
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.treeflash && chunk.treeflash.round) {
        rounds.push(chunk.treeflash.round);
        if (Number($("round-pick").value) >= rounds.length - 1) showRound(rounds.length - 1);  // follow the latest
        else $("round-pick").max = rounds.length;
      }
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (!delta) continue;
      if (first === null && (delta.content || delta.reasoning_content)) first = performance.now();
      if (delta.reasoning_content) {
        reasoning += delta.reasoning_content;
        if (!thoughts) {
          thoughts = document.createElement("details");
          thoughts.className = "reasoning";
          thoughts.open = true;
          thoughts.innerHTML = "<summary>reasoning</summary><span></span>";
          div.insertBefore(thoughts, body);
        }
        thoughts.querySelector("span").textContent = reasoning;
      }
      if (delta.content) {
        answer += delta.content;
        body.textContent = answer;
      }
      for (const call of delta.tool_calls || []) {
        toolCalls.push(call);
        const line = document.createElement("div");
        line.className = "tools";
        line.textContent = `\u2192 ${call.function.name}(${call.function.arguments})`;
        div.insertBefore(line, stats.parentNode ? stats : null);
      }
      div.scrollIntoView({block: "end"});
    }
    const message = {role: "assistant", content: answer};
    if (toolCalls.length) message.tool_calls = toolCalls.map(({index, ...call}) => call);
    conversation.push(message);
    if (usage) {
      const ext = usage.treeflash || {}, cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
      const tau = ext.mean_acceptance_length == null ? "–" : ext.mean_acceptance_length.toFixed(2);
      stats.textContent = `${usage.completion_tokens} tokens · ${ext.generation_tps} tok/s · \u03c4 ${tau}` +
        ` (${ext.rounds} rounds, ${ext.mode}) · ${cached}/${usage.prompt_tokens} prompt tokens cached` +
        ` · first token ${((first || performance.now()) - started).toFixed(0)} ms`;
      stats.dataset.tps = ext.generation_tps;
      stats.dataset.tau = ext.mean_acceptance_length;
      stats.dataset.cached = cached;
      div.appendChild(stats);
    }
  } catch (err) {
    if (err.name !== "AbortError") {
      div.classList.add("error");
      body.textContent = (answer ? answer + "\n" : "") + "error: " + err.message;
    }
    conversation.pop();  // the question stays on screen but not in the conversation sent next
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  ask(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  rounds = [];
  $("messages").textContent = "";
  showRound(0);
  $("round-label").textContent = "";
});

fetch("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].id; })
  .catch(() => { $("model").textContent = "(server unreachable)"; });
