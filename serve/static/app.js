// sdray search page: plain JS, no build step. Talks to POST v1/search and GET v1/images/{id}.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const state = { image: null, imageName: null, auth: false };

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => (
      { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  function fmt(x, d) { return (typeof x === "number" && isFinite(x)) ? x.toFixed(d) : "–"; }
  function token() { return $("token").value.trim(); }
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (token()) h["Authorization"] = "Bearer " + token();
    return h;
  }
  // Thumbnails: the signed, short-lived URL the server puts in each hit (no key in any URL).
  function imageUrl(hit) { return hit.thumbnail || ""; }

  // Word pieces ("red", "##ing") -> words of the caption to highlight.
  function highlight(text, terms) {
    const whole = new Set(), pieces = [];
    terms.forEach((t) => {
      const w = String(t.term).toLowerCase();
      if (w.startsWith("##")) { if (w.length > 3) pieces.push(w.slice(2)); }
      else if (/^[\p{L}\p{N}]/u.test(w)) whole.add(w);
    });
    return String(text || "").split(/([\p{L}\p{N}]+)/u).map((part, i) => {
      if (i % 2 === 0) return esc(part);
      const low = part.toLowerCase();
      const hit = whole.has(low) || [...whole].some((w) => w.length > 2 && low.startsWith(w)) ||
        pieces.some((p) => low.endsWith(p));
      return hit ? "<mark>" + esc(part) + "</mark>" : esc(part);
    }).join("");
  }

  function setStatus(msg, isError) {
    $("status").textContent = msg;
    $("status").className = isError ? "error" : "muted";
  }

  function render(resp) {
    const box = $("results");
    box.innerHTML = "";
    $("query-terms").innerHTML = (resp.query_terms || []).slice(0, 10).map((t) =>
      '<span class="term" title="query weight">' + esc(t.term) + " " + fmt(t.weight, 2) + "</span>").join("");
    resp.hits.forEach((h, i) => {
      const card = document.createElement("article");
      card.className = "hit";
      card.dataset.id = h.id;
      const thumb = imageUrl(h);
      const terms = h.explanation || [];
      const chips = terms.map((t) =>
        '<span class="term" title="query ' + fmt(t.query, 3) + " × doc " + fmt(t.doc, 3) + '">' +
        esc(t.term) + " " + fmt(t.query * t.doc, 2) + "</span>").join("");
      card.innerHTML =
        (thumb ? '<img loading="lazy" alt="' + esc(h.caption || h.id) + '" src="' + esc(thumb) + '">' : "") +
        '<div class="body">' +
        '<div><span class="rank">#' + (i + 1) + "</span> " +
        '<span class="caption">' + highlight(h.caption || h.id, terms) + "</span></div>" +
        '<div class="scores"><span>score <b>' + fmt(h.score, 4) + "</b></span>" +
        "<span>fused " + fmt(h.scores.fused, 4) + "</span><span>dense " + fmt(h.scores.dense, 4) +
        "</span><span>sparse " + fmt(h.scores.sparse, 3) + "</span></div>" +
        '<div class="terms">' + chips + "</div></div>";
      box.appendChild(card);
    });
    setStatus(resp.hits.length + " results · " + resp.direction + " · " + resp.mode +
      (resp.fusion ? " (" + resp.fusion + ")" : "") + " · " + fmt(resp.took_ms, 1) + " ms · index " +
      resp.index_version, false);
  }

  async function search(ev) {
    if (ev) ev.preventDefault();
    const text = $("query").value.trim();
    if (!text && !state.image) { setStatus("Type a query or drop an image.", true); return; }
    const mode = document.querySelector("input[name=mode]:checked").value;
    const k = parseInt($("k").value, 10) || 10;
    const body = { k: k, mode: mode };
    if (state.image) body.image = state.image; else body.text = text;
    if ($("fusion").value) body.fusion = { method: $("fusion").value };
    setStatus("searching…", false);
    try {
      const r = await fetch("v1/search", {
        method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
      });
      const data = await r.json().catch(() => ({ error: "HTTP " + r.status }));
      if (r.status === 401) $("token-label").hidden = false;
      if (!r.ok) { setStatus("Error " + r.status + ": " + (data.error || "request failed"), true); return; }
      render(data);
    } catch (e) {
      setStatus("Network error: " + e, true);
    }
  }

  function useFile(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      state.image = url.slice(url.indexOf(",") + 1);
      state.imageName = file.name;
      $("preview").src = url; $("preview").hidden = false; $("clear-image").hidden = false;
      $("drop-text").textContent = file.name + " → captions";
      $("query").value = "";
      search();
    };
    reader.readAsDataURL(file);
  }
  function clearImage() {
    state.image = null; $("preview").hidden = true; $("clear-image").hidden = true; $("file").value = "";
    $("drop-text").textContent = "…or drop an image here (or click) to find matching captions";
  }

  const drop = $("drop");
  drop.addEventListener("click", (e) => { if (e.target.id !== "clear-image") $("file").click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files.length) useFile(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  $("clear-image").addEventListener("click", (e) => { e.stopPropagation(); clearImage(); });
  $("query").addEventListener("input", () => { if (state.image && $("query").value) clearImage(); });
  $("search-form").addEventListener("submit", search);
  document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", () => {
    if ($("query").value.trim() || state.image) search();
  }));
  $("fusion").addEventListener("change", () => { if ($("query").value.trim() || state.image) search(); });

  fetch("v1/info", { headers: headers() }).then((r) => {
    if (r.status === 401) { $("token-label").hidden = false; return null; }
    return r.ok ? r.json() : null;
  }).then((info) => {
    if (!info) return;
    $("k").max = info.limits.k_max;
    const sides = info.sides || {};
    $("info").textContent = "index " + info.index_version + " · " +
      Object.keys(sides).map((s) => sides[s].count + " " + s).join(", ") + " · " + info.shards + " shards";
    if (info.auth) $("token-label").hidden = false;
  }).catch(() => {});
})();
