// eslmatch search page: plain JavaScript, no dependencies, talks only to this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // "inferno"-like colour map: dark = little attention, bright yellow = most.
  const STOPS = [
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99],
    [212, 72, 66], [245, 125, 21], [250, 193, 39], [252, 255, 164],
  ];
  const MEAN = -1; // chip index for "all words (mean)"

  const state = {
    info: { stages: 2, takes_images: false },
    query: "",
    results: [],
    selectedId: null,
    attention: null,
    word: MEAN,
    searchSeq: 0,
    detailSeq: 0,
  };

  function clamp(x, lo, hi) {
    return Math.min(hi, Math.max(lo, x));
  }

  function colour(t) {
    const x = clamp(t, 0, 1) * (STOPS.length - 1);
    const i = Math.min(Math.floor(x), STOPS.length - 2);
    const f = x - i;
    return STOPS[i].map((a, j) => Math.round(a + (STOPS[i + 1][j] - a) * f));
  }

  function setStatus(text, isError = false) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", isError);
  }

  async function getJSON(url, options) {
    const resp = await fetch(url, options);
    let data = null;
    try {
      data = await resp.json();
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const message = data && data.error ? data.error : `${resp.status} ${resp.statusText}`;
      throw new Error(message);
    }
    return data;
  }

  async function loadHealth() {
    try {
      const h = await getJSON("/info");
      state.info = h;
      $("health").textContent = `${h.items} images` + (h.model ? ` \u00b7 model \u201c${h.model}\u201d` : "");
      $("photo-search").hidden = !h.takes_images;
    } catch (err) {
      $("health").textContent = `server not ready: ${err.message}`;
    }
  }

  // A failed search leaves the previous results on the page, greyed and said to be old.
  function searchFailed(err) {
    $("results").classList.add("stale");
    const shown = state.results && state.results.length ? " (the results below are from the previous search)" : "";
    setStatus(`Search failed: ${err.message}${shown}`, true);
  }

  function showResults(data, label) {
    $("results").classList.remove("stale");
    state.results = data.results;
    renderResults();
    const n = data.results.length;
    const took = data.took_ms == null ? "" : ` in ${data.took_ms.toFixed(1)} ms`;
    setStatus(`${n} result${n === 1 ? "" : "s"} for ${label}${took}. Choose one to see it.`);
  }

  async function onPhoto() {
    const file = $("photo").files[0];
    if (!file) return;
    const seq = ++state.searchSeq;
    setStatus("Searching by photo\u2026");
    const form = new FormData();
    form.append("image", file);
    form.append("k", $("k").value);
    const where = $("where").value.trim();
    if (where) form.append("where", where);
    try {
      const data = await getJSON("/search/image", { method: "POST", body: form });
      if (seq !== state.searchSeq) return;
      state.query = "";
      $("query").value = "";
      showResults(data, `the photo \u201c${file.name}\u201d`);
    } catch (err) {
      if (seq === state.searchSeq) searchFailed(err);
    }
  }

  async function onSimilar() {
    if (!state.selectedId) return;
    const seq = ++state.searchSeq;
    const id = state.selectedId;
    const params = new URLSearchParams({ k: $("k").value });
    const where = $("where").value.trim();
    if (where) params.set("where", where);
    try {
      const data = await getJSON(`/similar/${encodeURIComponent(id)}?${params}`);
      if (seq !== state.searchSeq) return;
      state.query = "";
      $("query").value = "";  // the sentence no longer describes these results
      $("query").placeholder = `images like \u201c${id}\u201d \u2013 or describe another`;
      showResults(data, `images like \u201c${id}\u201d`);
    } catch (err) {
      if (seq === state.searchSeq) searchFailed(err);
    }
  }

  // ------------------------------------------------------------------ search and results

  async function onSearch(event) {
    event.preventDefault();
    const text = $("query").value.trim();
    if (!text) {
      setStatus("Type a description first.", true);
      $("query").focus();
      return;
    }
    const seq = ++state.searchSeq;
    setStatus("Searching\u2026");
    $("search-button").disabled = true;
    try {
      const body = { text, k: Number($("k").value) };
      const where = $("where").value.trim();
      if (where) body.where = where;
      const data = await getJSON("/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (seq !== state.searchSeq) return;
      state.query = data.query;
      showResults(data, `\u201c${data.query}\u201d`);
    } catch (err) {
      if (seq === state.searchSeq) searchFailed(err);
    } finally {
      if (seq === state.searchSeq) $("search-button").disabled = false;
    }
  }

  function renderResults() {
    const list = $("results");
    list.replaceChildren();
    $("detail").hidden = true;
    state.selectedId = null;
    for (const r of state.results) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "result";
      button.dataset.id = r.id;
      button.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-label", `Rank ${r.rank}: ${r.id}, score ${fmt(r.score)}. Show attention.`);
      if (r.image_url) {
        const img = document.createElement("img");
        img.src = r.image_url;
        img.alt = "";
        img.loading = "lazy";
        button.append(img);
      } else {
        const ph = document.createElement("div");
        ph.className = "placeholder";
        ph.textContent = "no image";
        button.append(ph);
      }
      const meta = document.createElement("div");
      meta.className = "meta";
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${r.rank}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = fmt(r.score);
      score.title = r.first_stage_score == null ? "score" : `score (first stage ${fmt(r.first_stage_score)})`;
      const id = document.createElement("span");
      id.className = "item-id";
      id.textContent = r.id;
      meta.append(rank, score, id);
      button.append(meta);
      button.addEventListener("click", () => selectResult(r, button));
      li.append(button);
      list.append(li);
    }
  }

  function fmt(x) {
    return x == null ? "\u2013" : Number(x).toFixed(3);
  }

  // ------------------------------------------------------------------ attention heat-map

  async function selectResult(result, button) {
    for (const b of document.querySelectorAll(".result[aria-pressed='true']")) {
      b.setAttribute("aria-pressed", "false");
    }
    button.setAttribute("aria-pressed", "true");
    state.selectedId = result.id;
    const seq = ++state.detailSeq;
    const canvas = $("heatmap");
    delete canvas.dataset.drawn;
    $("detail").hidden = false;
    $("detail-caption").textContent = `#${result.rank} ${result.id} \u00b7 score ${fmt(result.score)}`;
    $("detail-meta").textContent = Object.entries(result.metadata || {}).map(([k, v]) => `${k}: ${v}`).join(" \u00b7 ");
    $("chips").replaceChildren();
    $("heatmap").getContext("2d").clearRect(0, 0, $("heatmap").width, $("heatmap").height);
    const heat = state.info.stages !== 1 && Boolean(state.query);
    $("heat-controls").hidden = !heat;  // one vector per image: no word-by-region map, no controls
    if (!heat) {
      // one vector per image (or a photo query): the picture itself, no word-by-region attention
      await showImage(result.image_url);
      if (seq === state.detailSeq) {
        $("detail-note").textContent = state.query ? "This gallery stores one vector per image: no word-by-region attention to show." : "";
      }
      return;
    }
    $("detail-note").textContent = "Loading attention\u2026";
    try {
      const params = new URLSearchParams({ text: state.query, id: result.id });
      const data = await getJSON(`/attention?${params}`);
      if (seq !== state.detailSeq) return;
      state.attention = data;
      state.word = strongestWord(data);
      await showImage(data.image_url);
      if (seq !== state.detailSeq) return;
      renderChips();
      drawHeatmap();
    } catch (err) {
      if (seq === state.detailSeq) $("detail-note").textContent = `Attention failed: ${err.message}`;
    }
  }

  // Tokenizer markers such as <start>, <end>, [CLS], [SEP]: shown, but not chosen by default.
  function isSpecial(word) {
    return /^<[^<>]+>$|^\[[A-Z]+\]$/.test(word);
  }

  // Rows of the words the user typed (all rows when every token is a marker).
  function plainRows(a) {
    const rows = a.weights.filter((_, i) => !isSpecial(a.words[i]));
    return rows.length ? rows : a.weights;
  }

  // The typed word whose attention is most concentrated (highest single weight).
  function strongestWord(a) {
    const anyPlain = a.words.some((w) => !isSpecial(w));
    let best = MEAN;
    let bestValue = -Infinity;
    a.weights.forEach((row, i) => {
      if (anyPlain && isSpecial(a.words[i])) return;
      const m = Math.max(...row);
      if (m > bestValue) {
        bestValue = m;
        best = i;
      }
    });
    return best;
  }

  function showImage(url) {
    const img = $("detail-image");
    const canvas = $("heatmap");
    return new Promise((resolve) => {
      const size = () => {
        canvas.width = img.naturalWidth || 256;
        canvas.height = img.naturalHeight || 256;
        $("figure").style.aspectRatio = `${canvas.width} / ${canvas.height}`;
        resolve();
      };
      if (!url) {
        img.removeAttribute("src");
        img.hidden = true;
        canvas.width = 256;
        canvas.height = 256;
        resolve();
        return;
      }
      img.hidden = false;
      img.onload = size;
      img.onerror = () => {
        img.hidden = true;
        canvas.width = 256;
        canvas.height = 256;
        resolve();
      };
      img.alt = `Gallery image ${state.selectedId}`;
      if (img.getAttribute("src") === url && img.complete && img.naturalWidth) {
        size();
      } else {
        img.src = url;
      }
    });
  }

  function renderChips() {
    const chips = $("chips");
    chips.replaceChildren();
    const make = (label, index) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = index !== MEAN && isSpecial(label) ? "chip special" : "chip";
      b.textContent = label;
      b.dataset.word = String(index);
      b.setAttribute("aria-pressed", String(index === state.word));
      b.addEventListener("click", () => {
        state.word = index;
        for (const c of chips.querySelectorAll(".chip")) {
          c.setAttribute("aria-pressed", String(c === b));
        }
        drawHeatmap();
      });
      chips.append(b);
    };
    make("all words (mean)", MEAN);
    state.attention.words.forEach((w, i) => make(w, i));
  }

  function selectedValues(a) {
    if (state.word !== MEAN) return a.weights[state.word];
    const rows = plainRows(a);
    const out = new Array(rows[0].length).fill(0);
    for (const row of rows) row.forEach((v, j) => { out[j] += v / rows.length; });
    return out;
  }

  function drawHeatmap() {
    const a = state.attention;
    const canvas = $("heatmap");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!a || !a.weights.length) {
      $("detail-note").textContent = "No words to show.";
      return;
    }
    if (!a.grid) {
      $("detail-note").textContent = "This index records no region grid, so the attention cannot be placed on the image.";
      return;
    }
    const [h, w] = a.grid;
    const values = selectedValues(a).slice(0, h * w);
    if (values.length < h * w) {
      $("detail-note").textContent = `The index gives ${values.length} regions for a ${h}\u00d7${w} grid.`;
      return;
    }
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const span = hi - lo > 1e-12 ? hi - lo : 1;
    const cells = document.createElement("canvas");
    cells.width = w;
    cells.height = h;
    const cctx = cells.getContext("2d");
    const pixels = cctx.createImageData(w, h);
    values.forEach((v, r) => {
      const t = (v - lo) / span;
      const [red, green, blue] = colour(t);
      pixels.data.set([red, green, blue, Math.round(255 * (0.3 + 0.7 * t))], r * 4);
    });
    cctx.putImageData(pixels, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
    const label = state.word === MEAN ? "all words (mean)" : a.words[state.word];
    canvas.dataset.drawn = label;
    canvas.setAttribute("aria-label", `Attention of \u201c${label}\u201d over a ${h}\u00d7${w} grid of regions`);
    $("legend-min").textContent = lo.toFixed(3);
    $("legend-max").textContent = hi.toFixed(3);
    $("detail-note").textContent = `Showing \u201c${label}\u201d: brighter regions get more of its attention.`;
  }

  function drawLegend() {
    const canvas = $("legend");
    const ctx = canvas.getContext("2d");
    for (let x = 0; x < canvas.width; x++) {
      const [r, g, b] = colour(x / (canvas.width - 1));
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  function onOpacity() {
    $("heatmap").style.opacity = String(Number($("opacity").value) / 100);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("search-form").addEventListener("submit", onSearch);
    $("photo").addEventListener("change", onPhoto);
    $("similar-button").addEventListener("click", onSimilar);
    $("opacity").addEventListener("input", onOpacity);
    onOpacity();
    drawLegend();
    loadHealth();
  });
})();
