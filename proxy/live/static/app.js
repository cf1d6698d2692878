// carbon-proxy live page: one EventSource, no polling, no libraries. Every value from
// the server is placed with textContent (model and tenant names come from clients).
"use strict";
(function () {
  const MAX_ROWS = 50;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const rows = new Map(); // request id -> <tr>
  let settled = 0;

  const sig = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });
  const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });

  function num(value, unit) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    return sig.format(value) + (unit ? " " + unit : "");
  }

  function grams(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    if (value >= 1000) return sig.format(value / 1000) + " kg";
    if (value >= 1 || value === 0) return sig.format(value) + " g";
    return sig.format(value * 1000) + " mg";
  }

  function energy(joules) {
    if (joules >= 3.6e5) return sig.format(joules / 3.6e6) + " kWh";
    if (joules >= 3600) return sig.format(joules / 3600) + " Wh";
    return num(joules, "J");
  }

  function setText(id, text, cls) {
    const el = $(id);
    el.textContent = text;
    if (cls !== undefined) el.className = cls;
  }

  function connection(state, text) {
    const el = $("conn");
    el.dataset.state = state;
    el.textContent = text;
  }

  // -- requests table ------------------------------------------------------------------

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  function tokens(r) {
    if (r.images) return r.images + (r.images === 1 ? " image" : " images");
    const p = r.prompt_tokens === null ? "?" : r.prompt_tokens;
    const o = r.output_tokens === null ? "?" : r.output_tokens;
    return p + " / " + o;
  }

  function renderRow(r) {
    const tr = document.createElement("tr");
    const provisional = r.status !== "final";
    tr.className = provisional ? "provisional" : "final";
    tr.dataset.id = r.id;
    cell(tr, clock.format(new Date(r.finished_unix * 1000)));
    const model = cell(tr, r.model || "–", "model");
    model.title = r.model || "";
    cell(tr, r.tenant);
    cell(tr, tokens(r), "num");
    cell(tr, (provisional ? "≈ " : "") + num(r.energy_joules), "num");
    cell(tr, (provisional ? "≈ " : "") + num(r.co2e_grams), "num");
    const ok = r.status_code < 400 && r.outcome === "ok";
    cell(tr, (provisional ? "provisional" : "final") + " · " + r.status_code + (ok ? "" : " " + r.outcome), ok ? "" : "bad");
    return tr;
  }

  function addRows(list) {
    const body = document.querySelector("#requests tbody");
    for (const r of list) {
      const tr = renderRow(r);
      const old = rows.get(r.id);
      if (old) {
        old.replaceWith(tr); // provisional -> final keeps its place
      } else {
        body.insertBefore(tr, body.firstChild);
        settled += 1;
      }
      rows.set(r.id, tr);
    }
    while (body.rows.length > MAX_ROWS) {
      const last = body.rows[body.rows.length - 1];
      rows.delete(last.dataset.id);
      last.remove();
    }
    document.body.dataset.requests = String(settled);
  }

  // -- last hour -------------------------------------------------------------------------

  function renderHour(h) {
    if (!h) return;
    setText("gph", grams(h.grams_per_hour) + "/h");
    setText("gpt", h.grams_per_1k_tokens === null ? "–" : grams(h.grams_per_1k_tokens));
    setText("req", String(h.requests));
    setText("energy", energy(h.energy_joules));
    const span = h.window_seconds < 60 ? Math.round(h.window_seconds) + " s" : Math.round(h.window_seconds / 60) + " min";
    setText("hour-span", h.window_seconds < 3590 ? "(running for " + span + "; rates scaled to an hour)" : "");
    const svg = $("minutes");
    const values = h.grams_per_minute || [];
    const top = Math.max(...values, 0);
    svg.replaceChildren();
    const width = 600 / Math.max(values.length, 1);
    values.forEach((v, i) => {
      if (top <= 0 || v <= 0) return;
      const height = Math.max(1, (v / top) * 76);
      const rect = document.createElementNS(SVG, "rect");
      rect.setAttribute("x", String(i * width + 1));
      rect.setAttribute("width", String(Math.max(1, width - 2)));
      rect.setAttribute("y", String(80 - height));
      rect.setAttribute("height", String(height));
      svg.appendChild(rect);
    });
    const peak = top > 0 ? "; peak " + grams(top) + " in one minute" : "";
    svg.setAttribute("aria-label", "CO2e per minute over the last hour: " + grams(h.co2e_grams) + " in total" + peak);
  }

  // -- state: grid, meter, power -----------------------------------------------------------

  function renderGrid(g) {
    if (!g) return;
    setText("intensity", num(g.g_per_kwh, "gCO₂e/kWh"));
    const flags = [];
    if (g.stale) flags.push("stale");
    if (g.estimated) flags.push("estimated");
    if (g.marginal) flags.push("marginal");
    if (g.provider_healthy === false) flags.push("provider failing (" + g.consecutive_failures + ")");
    setText("source", g.source + (flags.length ? " — " + flags.join(", ") : ""), flags.length ? "warn" : "");
    setText("pue", num(g.pue));
  }

  function renderMeter(m) {
    if (!m) return;
    setText("meter-ok", m.ok ? "OK" : "failing", m.ok ? "ok" : "bad");
    setText("meter-kind", m.kind + " (" + m.method + ")");
    const age = m.staleness_seconds;
    setText("meter-age", age === null ? "never" : age < 1 ? Math.round(age * 1000) + " ms ago" : num(age, "s ago"));
    setText("meter-counts", m.samples + " / " + m.failures);
  }

  function barRow(name, cls, watts, scale) {
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("span");
    label.textContent = name;
    const track = document.createElement("div");
    track.className = "track";
    track.setAttribute("aria-hidden", "true");
    const bar = document.createElement("div");
    bar.className = "bar " + cls;
    bar.style.width = (scale > 0 && watts ? Math.min(100, (watts / scale) * 100) : 0) + "%";
    track.appendChild(bar);
    const value = document.createElement("span");
    value.className = "w";
    value.textContent = num(watts, "W");
    row.append(label, track, value);
    return row;
  }

  function renderGroups(groups) {
    const host = $("groups");
    if (!groups) return;
    host.replaceChildren();
    for (const g of groups) {
      const box = document.createElement("div");
      box.className = "group";
      const title = document.createElement("h3");
      const names = g.upstreams.length ? g.upstreams.join(", ") : "group " + g.group;
      title.textContent = names + " — devices " + (g.devices.join(", ") || g.group) + " · " + g.in_flight + " in flight";
      box.appendChild(title);
      const scale = Math.max(g.measured_watts || 0, g.attributed_watts || 0, g.idle_watts || 0, 1);
      box.append(
        barRow("Measured", "measured", g.measured_watts, scale),
        barRow("Attributed", "attributed", g.attributed_watts, scale),
        barRow("Idle", "idle", g.idle_watts, scale)
      );
      host.appendChild(box);
    }
  }

  function renderState(s) {
    if (!s) return;
    renderGroups(s.groups);
    renderGrid(s.grid);
    renderMeter(s.meter);
  }

  // -- the stream ----------------------------------------------------------------------

  function connect() {
    const source = new EventSource("/live/events");
    source.addEventListener("open", () => connection("live", "Live"));
    source.addEventListener("error", () => connection("reconnecting", "Reconnecting…"));
    source.addEventListener("hello", (e) => {
      const data = JSON.parse(e.data);
      connection("live", "Live");
      addRows(data.requests);
      renderHour(data.hour);
      renderState(data.state);
    });
    source.addEventListener("requests", (e) => {
      const data = JSON.parse(e.data);
      addRows(data.requests);
      renderHour(data.hour);
    });
    source.addEventListener("state", (e) => {
      const data = JSON.parse(e.data);
      renderHour(data.hour);
      renderState(data.state);
    });
  }

  connect();
})();
