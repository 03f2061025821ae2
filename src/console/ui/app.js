// The stowage console: a page over /api/v1/ (nothing else). Views by location hash:
// #/ overview, #/repos table, #/repo/<name> one repository, #/evictions preview.
"use strict";

const API = "/api/v1";
const view = document.getElementById("view");
const statusBox = document.getElementById("status");
let timer = null;
let me = { may_act: false, user: null, auth: false };
// A message to show after the next navigation (an action that leaves the page it was on).
let flash = null;

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  }[c]));
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = Number(n), i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${units[i]}`;
}

function pct(x) {
  return x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)} %`;
}

function ago(unix) {
  if (!unix) return "never";
  const s = Math.max(0, Math.floor(Date.now() / 1000) - unix);
  if (s < 120) return `${s}s ago`;
  if (s < 7200) return `${Math.floor(s / 60)}m ago`;
  if (s < 172800) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function secs(n) {
  if (n === null || n === undefined) return "–";
  if (n < 120) return `${n}s`;
  if (n < 7200) return `${Math.floor(n / 60)}m`;
  return `${Math.floor(n / 3600)}h`;
}

function say(text, kind) {
  statusBox.textContent = text || "";
  statusBox.className = kind || "";
}

async function get(path) {
  const r = await fetch(API + path, { credentials: "same-origin" });
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(message(r, body));
  return body;
}

function message(r, body) {
  const m = body && body.errors && body.errors[0] && body.errors[0].message;
  return `${r.status}: ${m || r.statusText}`;
}

// Actions carry X-Requested-With (the API refuses them otherwise) and JSON for a body.
async function act(method, path, body) {
  const headers = { "X-Requested-With": "stowage" };
  const init = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(API + path, init);
  const answer = await r.json().catch(() => null);
  if (!r.ok) throw new Error(message(r, answer));
  return answer;
}

function bar(used, total, mark) {
  const w = total ? Math.min(100, (used / total) * 100) : 0;
  const m = total && mark ? `<i style="left:${Math.min(100, (mark / total) * 100)}%" title="high watermark"></i>` : "";
  return `<div class="bar"><span style="width:${w.toFixed(2)}%"></span>${m}</div>`;
}

function kv(pairs) {
  return `<div class="kv">${pairs.map(([k, v]) => `<span>${esc(k)}</span><span>${v}</span>`).join("")}</div>`;
}

// The 24-hour chart: requests (hits inside them) as bars, bytes fetched as thin bars below.
function chart(history) {
  const W = 288, H = 100, now = Math.floor(Date.now() / 1000);
  const step = history.bucket_secs || 300;
  const end = now - (now % step);
  const byStart = new Map(history.buckets.map((b) => [b.start, b]));
  let maxReq = 1, maxBytes = 1;
  for (const b of history.buckets) {
    maxReq = Math.max(maxReq, b.requests);
    maxBytes = Math.max(maxBytes, b.bytes_served, b.bytes_fetched);
  }
  let bars = "";
  for (let i = 0; i < W; i++) {
    const b = byStart.get(end - (W - 1 - i) * step);
    if (!b) continue;
    const h = (b.requests / maxReq) * 70, hh = (b.hits / maxReq) * 70;
    const f = (b.bytes_fetched / maxBytes) * 25;
    bars += `<rect class="req" x="${i}" y="${70 - h}" width="1" height="${h}"><title>${new Date(b.start * 1000).toLocaleTimeString()}: ${b.requests} requests, ${b.hits} hits, ${bytes(b.bytes_served)} served, ${bytes(b.bytes_fetched)} fetched</title></rect>`;
    bars += `<rect class="hit" x="${i}" y="${70 - hh}" width="1" height="${hh}"></rect>`;
    bars += `<rect class="fetched" x="${i}" y="${H - f}" width="1" height="${f}"></rect>`;
  }
  return `<svg class="chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="requests over the last 24 hours">
    <line x1="0" y1="71" x2="${W}" y2="71" stroke="#ccd" stroke-width=".3"></line>${bars}</svg>
    <div class="legend"><span><b style="background:var(--accent)"></b>requests</span><span><b style="background:var(--ok)"></b>hits</span><span><b style="background:var(--warn)"></b>bytes fetched upstream</span><span>24 h, 5-minute buckets; now at the right</span></div>`;
}

function traffic(t) {
  return kv([
    ["requests", `${t.requests}`],
    ["hit ratio", pct(t.hit_ratio)],
    ["byte hit ratio", pct(t.byte_hit_ratio)],
    ["served", bytes(t.bytes_served)],
    ["fetched upstream", bytes(t.bytes_fetched)],
    ["saved", bytes(t.bytes_saved)],
  ]);
}

function fills(list) {
  if (!list.length) return `<p class="muted">No fill in flight.</p>`;
  return list.map((f) => {
    const done = f.total ? `${bytes(f.written)} of ${bytes(f.total)}` : bytes(f.written);
    return `<div class="fill" data-fill="${esc(f.digest)}"><div class="name"><span>${esc(f.repository || "")} <code class="digest">${esc(f.digest.slice(7, 19))}</code></span><span class="num">${done}</span></div>${bar(f.written, f.total || f.written || 1)}</div>`;
  }).join("");
}

function upstreams(list) {
  if (!list.length) return `<p class="muted">Offline: no upstream is contacted.</p>`;
  return `<table><tbody>${list.map((u) => {
    const state = u.reachable === null ? `<span class="pill">checking</span>` : u.reachable ? `<span class="pill up">reachable</span>` : `<span class="pill down">unreachable</span>`;
    const rl = u.ratelimit ? `${u.ratelimit.remaining} of ${u.ratelimit.limit} pulls left` : "";
    const back = u.backing_off_secs ? ` · backing off ${secs(u.backing_off_secs)}` : "";
    return `<tr><td>${esc(u.host)}</td><td>${state}</td><td class="n">${esc(rl)}${esc(back)}</td></tr>`;
  }).join("")}</tbody></table>`;
}

async function overview() {
  const s = await get("/summary");
  me = s.you;
  who();
  const c = s.cache;
  const hosted = s.hosted ? `<div class="card"><h2>Hosted</h2><div class="big">${bytes(s.hosted.size_bytes)}</div>
    <div class="muted">of ${bytes(s.hosted.budget_bytes)} · ${s.hosted.blobs} blobs · never evicted</div>${bar(s.hosted.size_bytes, s.hosted.budget_bytes)}</div>` : "";
  view.innerHTML = `<h1>Overview</h1>
  <div class="grid">
    <div class="card" id="cache-card"><h2>Cache</h2><div class="big">${bytes(c.size_bytes)}</div>
      <div class="muted">of ${bytes(c.budget_bytes)} · ${c.blobs} blobs · ${c.repositories} repositories</div>
      ${bar(c.size_bytes + c.reserved_bytes, c.budget_bytes, c.high_watermark_bytes)}
      ${kv([["pinned", bytes(c.pinned_bytes)], ["reserved by fills", bytes(c.reserved_bytes)], ["evicted since start", `${c.evictions} · ${bytes(c.evicted_bytes)}`]])}</div>
    ${hosted}
    <div class="card"><h2>Since start</h2>${traffic(s.traffic.since_start)}</div>
    <div class="card"><h2>Last hour</h2>${traffic(s.traffic.last_hour)}</div>
    <div class="card"><h2>Last 24 hours</h2>${traffic(s.traffic.last_day)}</div>
    <div class="card wide"><h2>Requests and bytes, last 24 h</h2>${chart(s.history)}</div>
    <div class="card"><h2>Fills in flight</h2><div id="fills">${fills(s.fills)}</div></div>
    <div class="card"><h2>Upstreams</h2>${upstreams(s.upstreams)}</div>
  </div>`;
}

const table = { sort: "size", q: "", pages: [], next: null };

function repoRow(r) {
  const pin = r.pinned ? ` <span class="pill pinned">pinned</span>` : "";
  const kind = r.kind === "hosted" ? ` <span class="pill">hosted</span>` : "";
  return `<tr data-repo="${esc(r.name)}"><td><a href="#/repo/${encodeURIComponent(r.name)}">${esc(r.name)}</a>${kind}${pin}</td>
    <td class="n">${bytes(r.size_bytes)}</td><td class="n hide-sm">${bytes(r.shared_bytes)}</td><td class="n hide-sm">${r.tags}</td>
    <td class="n">${r.pulls}</td><td class="n">${ago(r.last_pulled)}</td><td class="n hide-sm">${bytes(r.bytes_served)}</td></tr>`;
}

async function loadRepos(more) {
  const p = new URLSearchParams({ sort: table.sort, n: "50" });
  if (table.q) p.set("q", table.q);
  if (more && table.next) p.set("last", table.next);
  const page = await get(`/repositories?${p}`);
  table.rows = more ? table.rows.concat(page.repositories) : page.repositories;
  table.next = page.next;
  table.total = page.total;
  const body = document.getElementById("repo-rows");
  if (!body) return;
  body.innerHTML = table.rows.map(repoRow).join("") || `<tr><td colspan="7" class="muted">No repository matches.</td></tr>`;
  document.getElementById("repo-count").textContent = `${table.rows.length} of ${table.total}`;
  document.getElementById("more").hidden = !table.next;
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.classList.toggle("sorted", th.dataset.sort === table.sort);
  }
}

async function repos() {
  view.innerHTML = `<h1>Repositories</h1>
  <div class="toolbar"><input id="search" type="search" placeholder="Search repositories" value="${esc(table.q)}" aria-label="search">
  <span id="repo-count" class="muted num"></span></div>
  <div class="tablewrap"><table><thead><tr>
    <th data-sort="name">Repository</th><th class="n" data-sort="size">Size</th><th class="n hide-sm">Shared</th><th class="n hide-sm">Tags</th>
    <th class="n" data-sort="pulls">Pulls</th><th class="n" data-sort="last_pulled">Last pulled</th><th class="n hide-sm">Served</th>
  </tr></thead><tbody id="repo-rows"></tbody></table></div>
  <div class="pager"><button id="more" hidden>More</button></div>`;
  let debounce = null;
  document.getElementById("search").addEventListener("input", (e) => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { table.q = e.target.value.trim(); loadRepos(false).catch(fail); }, 200);
  });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => { table.sort = th.dataset.sort; loadRepos(false).catch(fail); });
  }
  document.getElementById("more").addEventListener("click", () => loadRepos(true).catch(fail));
  await loadRepos(false);
}

function tagRow(r, t) {
  const f = t.freshness || {};
  let state = `<span class="pill">${esc(f.state || "")}</span>`;
  if (f.state === "fresh") state = `<span class="pill fresh" title="checked ${ago(f.checked)}">fresh · ${secs(f.ttl_left_secs)} left</span>`;
  if (f.state === "stale") state = `<span class="pill stale" title="checked ${ago(f.checked)}">stale · checked ${ago(f.checked)}</span>`;
  const pinned = t.pinned ? `<span class="pill pinned">pinned</span>` : "";
  let buttons = "";
  if (r.may_act) {
    buttons = t.pinned
      ? `<button data-action="unpin" data-tag="${esc(t.tag)}">Unpin</button>`
      : `<button data-action="pin" data-tag="${esc(t.tag)}">Pin</button> <button class="danger" data-action="purge" data-tag="${esc(t.tag)}">Purge</button>`;
  }
  return `<tr data-tag="${esc(t.tag)}"><td><b>${esc(t.tag)}</b> ${pinned}</td>
    <td><code class="digest" title="${esc(t.digest)}">${esc(t.digest.slice(7, 19))}</code><div class="muted hide-sm">${esc(t.media_type)}</div></td>
    <td>${esc((t.platforms || []).join(", "))}</td><td class="n">${bytes(t.size_bytes)}</td>
    <td class="n">${t.counters.pulls}</td><td class="n">${ago(t.counters.last_pulled)}</td><td>${state}</td><td>${buttons}</td></tr>`;
}

async function repo(name) {
  const r = await get(`/repositories/${name.split("/").map(encodeURIComponent).join("/")}`);
  const host = location.host;
  const first = r.tags[0] ? `:${r.tags[0].tag}` : "";
  const purgeAll = r.may_act && r.kind === "mirrored" ? `<button class="danger" data-action="purge-repo">Purge repository</button>` : "";
  view.innerHTML = `<h1>${esc(r.name)}</h1>
  <div class="pull"><code id="pull-line">docker pull ${esc(host)}/${esc(r.pull)}${esc(first)}</code><button id="copy">Copy</button>${purgeAll}</div>
  <div class="grid"><div class="card">${kv([
    ["kind", esc(r.kind)], ["size on disk", bytes(r.size_bytes)], ["shared with others", bytes(r.shared_bytes)],
    ["blobs", `${r.blobs}`], ["tags", `${r.tag_count}`],
  ])}</div><div class="card">${kv([
    ["pulls", `${r.pulls}`], ["last pulled", ago(r.last_pulled)], ["first cached", ago(r.first_cached)],
    ["served", bytes(r.bytes_served)], ["fetched upstream", bytes(r.bytes_fetched)],
  ])}</div></div>
  <h2 style="margin-top:1rem">Tags</h2>
  <div class="tablewrap"><table><thead><tr><th>Tag</th><th>Digest</th><th>Platforms</th><th class="n">Size</th><th class="n">Pulls</th><th class="n">Last pulled</th><th>State</th><th></th></tr></thead>
  <tbody>${r.tags.map((t) => tagRow(r, t)).join("")}</tbody></table></div>`;
  document.getElementById("copy").addEventListener("click", () => copy(document.getElementById("pull-line").textContent));
  for (const b of view.querySelectorAll("button[data-action]")) {
    b.addEventListener("click", () => action(r, b).catch(fail));
  }
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    say("Copied to the clipboard.", "ok");
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents(document.getElementById("pull-line"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    say("Selected: press Ctrl+C to copy.");
  }
}

// Purges ask twice: the first click arms the button, the second acts.
async function action(r, b) {
  const tag = b.dataset.tag;
  const reference = `${r.name}:${tag}`;
  const path = r.name.split("/").map(encodeURIComponent).join("/");
  if ((b.dataset.action === "purge" || b.dataset.action === "purge-repo") && !b.classList.contains("armed")) {
    b.classList.add("armed");
    b.textContent = "Click again to purge";
    return;
  }
  b.disabled = true;
  if (b.dataset.action === "pin") {
    await act("POST", "/pins", { reference });
    say(`Pinned ${reference}.`, "ok");
  } else if (b.dataset.action === "unpin") {
    await act("DELETE", `/pins/${path}:${encodeURIComponent(tag)}`);
    say(`Unpinned ${reference}.`, "ok");
  } else if (b.dataset.action === "purge") {
    await act("DELETE", `/repositories/${path}/tags/${encodeURIComponent(tag)}`);
    if (r.tags.length === 1) return leave(`Purged ${reference}: the repository is gone.`);
    say(`Purged ${reference}.`, "ok");
  } else if (b.dataset.action === "purge-repo") {
    await act("DELETE", `/repositories/${path}`);
    return leave(`Purged ${r.name}.`);
  }
  await repo(r.name);
}

async function evictions() {
  view.innerHTML = `<h1>Eviction preview</h1>
  <p class="muted">What eviction would remove next, least recently used first; pinned blobs and blobs being read are skipped.</p>
  <div class="toolbar"><label>Free <input id="evict-bytes" type="text" value="1GiB" size="8"></label><button id="evict-go">Preview</button></div>
  <div id="evict-out"></div>`;
  const run = async () => {
    const n = parseSize(document.getElementById("evict-bytes").value);
    if (n === null) return say("Give a size such as 500MiB or 2GiB.", "error");
    const p = await get(`/evictions/preview?bytes=${n}`);
    const rows = p.blobs.map((b, i) => `<tr><td class="n">${i + 1}</td><td><code class="digest" title="${esc(b.digest)}">${esc(b.digest.slice(7, 19))}</code></td><td class="n">${bytes(b.size)}</td><td>${b.repositories.map(esc).join(", ") || `<span class="muted">untagged</span>`}</td></tr>`).join("");
    document.getElementById("evict-out").innerHTML = `<p>${p.enough ? "Would free" : "Can free only"} <b class="num">${bytes(p.freed)}</b> by removing ${p.count} blob(s)${p.truncated ? " (first 1000 listed)" : ""}.</p>
      <div class="tablewrap"><table><thead><tr><th class="n">#</th><th>Blob</th><th class="n">Size</th><th>Repositories</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  };
  document.getElementById("evict-go").addEventListener("click", () => run().catch(fail));
  await run();
}

// Goes to the repository table with a message (the page acted on is gone).
function leave(text) {
  flash = text;
  location.hash = "#/repos";
}

function parseSize(text) {
  const m = /^\s*([\d.]+)\s*([kmgt]?i?b?)?\s*$/i.exec(text);
  if (!m) return null;
  const unit = (m[2] || "").toLowerCase().replace("b", "").replace("i", "");
  const mult = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[unit];
  return mult === undefined ? null : Math.floor(parseFloat(m[1]) * mult);
}

function who() {
  const w = document.getElementById("who");
  const user = me.user ? `signed in as ${me.user}` : me.auth ? "" : "no [auth]";
  w.textContent = `${user}${me.may_act ? " · may pin and purge" : " · read only"}`;
}

function fail(e) {
  say(e.message, "error");
}

async function route() {
  clearInterval(timer);
  say(flash || "", flash ? "ok" : "");
  flash = null;
  const hash = location.hash || "#/";
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", hash === a.getAttribute("href") || (a.dataset.nav === "repos" && hash.startsWith("#/repo/")));
  }
  try {
    if (hash.startsWith("#/repo/")) {
      await repo(decodeURIComponent(hash.slice(7)));
    } else if (hash === "#/repos") {
      await repos();
    } else if (hash === "#/evictions") {
      await evictions();
    } else {
      await overview();
      // Live: fills and numbers move while the overview is open.
      timer = setInterval(() => overview().catch(fail), 2000);
    }
  } catch (e) {
    view.innerHTML = "";
    fail(e);
  }
}

window.addEventListener("hashchange", route);
get("/summary").then((s) => { me = s.you; who(); }).catch(() => {});
route();
