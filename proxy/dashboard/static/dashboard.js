// The dashboard's pages: each fetches its JSON endpoint and fills the shell the server rendered
// (tables sortable with the keyboard, charts drawn with uPlot, CSV links). No other script runs.
"use strict";

(function () {
  const main = document.getElementById("main");
  if (!main || !main.dataset.page) return;
  const page = main.dataset.page;
  const base = main.dataset.base;
  const status = document.getElementById("status");
  const controls = document.getElementById("controls");
  const numbers = new Intl.NumberFormat("en-US");
  const charts = [];
  let latest = null;

  const labels = {
    requests: "Requests", users: "Users", client_errors: "Client errors (4xx)",
    server_errors: "Server errors (5xx)", prompt_tokens: "Tokens in", completion_tokens: "Tokens out",
    total_tokens: "Tokens (total)", last_day: "Last day", username: "User", cluster: "Cluster",
    model: "Model", day: "Day", hour: "Hour (UTC)", answered: "Answered", errors: "Errors",
    error_rate: "Error rate", p50_ms: "Latency p50 (ms)", p95_ms: "Latency p95 (ms)",
    p99_ms: "Latency p99 (ms)", ttfc_p50_ms: "First token p50 (ms)", ttfc_p95_ms: "First token p95 (ms)",
    tokens_per_second: "Tokens/s", route: "Route", framework: "Framework", streams: "Streams",
    mean_ms: "Mean latency (ms)", last_request: "Last request (UTC)", status: "Status", batches: "Batches",
    id: "Batch", created: "Created", started: "Started", finished: "Finished",
    lines_processed: "Lines processed", num_responses: "Responses", compute_tasks: "Globus Compute tasks",
    jobs_running: "Jobs running", jobs_queued: "Jobs queued", problem: "Problem", state: "State",
    job_id: "Job", models: "Models", model_status: "Model status",
  };
  const label = (key) => labels[key] || key;

  function params() {
    const query = new URLSearchParams();
    if (controls) {
      for (const field of controls.elements) if (field.name && field.value) query.set(field.name, field.value);
    }
    if (main.dataset.name !== undefined) query.set("name", main.dataset.name);
    return query;
  }

  async function load() {
    status.textContent = "Loading…";
    let response;
    try {
      response = await fetch(`${base}/api/${page}?${params()}`, { credentials: "same-origin" });
    } catch (error) {
      status.textContent = "The gateway cannot be reached.";
      return;
    }
    if (response.status === 401) {
      window.location.assign(`${base}/login`);
      return;
    }
    const data = await response.json();
    if (!response.ok) {
      status.textContent = data.error || `Error ${response.status}`;
      return;
    }
    latest = data;
    render(data);
    status.textContent = data.truncated ? "Showing the first rows only: search to narrow." : "";
  }

  function render(data) {
    for (const list of document.querySelectorAll("dl.totals")) {
      list.replaceChildren();
      for (const [key, value] of Object.entries(data.totals || {})) {
        const pair = document.createElement("div");
        const term = document.createElement("dt");
        term.textContent = label(key);
        const detail = document.createElement("dd");
        detail.textContent = numbers.format(value);
        detail.dataset.key = key;
        detail.dataset.value = value;
        pair.append(term, detail);
        list.append(pair);
      }
    }
    for (const section of document.querySelectorAll("section.table")) {
      const table = (data.tables || {})[section.dataset.table];
      if (table) fillTable(section, table);
    }
    drawCharts(data);
  }

  function cell(column, value) {
    const td = document.createElement("td");
    td.dataset.column = column;
    td.dataset.value = value === null ? "" : value;
    if (column === "username" && page === "users") {
      const link = document.createElement("a");
      const query = params();
      query.delete("q");
      query.set("name", value);
      link.href = `${base}/user?${query}`;
      link.textContent = value;
      td.append(link);
    } else if (typeof value === "number") {
      td.className = "number";
      td.textContent = column === "error_rate" ? `${(value * 100).toFixed(1)} %` : numbers.format(value);
    } else {
      td.textContent = value === null ? "–" : value;
    }
    return td;
  }

  function fillTable(section, table) {
    const head = section.querySelector("thead");
    const body = section.querySelector("tbody");
    const row = document.createElement("tr");
    table.columns.forEach((column, index) => {
      const th = document.createElement("th");
      th.scope = "col";
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label(column);
      button.addEventListener("click", () => sortBy(section, table, index, th));
      th.append(button);
      row.append(th);
    });
    head.replaceChildren(row);
    body.replaceChildren(...table.rows.map((values) => {
      const tr = document.createElement("tr");
      values.forEach((value, index) => tr.append(cell(table.columns[index], value)));
      return tr;
    }));
    if (!table.rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = table.columns.length;
      td.textContent = "Nothing to show.";
      tr.append(td);
      body.append(tr);
    }
    const query = params();
    query.set("table", section.dataset.table);
    section.querySelector("a.csv").href = `${base}/api/${page}.csv?${query}`;
  }

  function sortBy(section, table, index, th) {
    const descending = th.getAttribute("aria-sort") !== "descending";
    for (const other of section.querySelectorAll("th")) other.removeAttribute("aria-sort");
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    const sign = descending ? -1 : 1;
    table.rows.sort((a, b) => {
      const x = a[index], y = b[index];
      if (x === y) return 0;
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    const sorted = { columns: table.columns, rows: table.rows };
    fillTable(section, sorted);
    section.querySelectorAll("th")[index].setAttribute("aria-sort", descending ? "descending" : "ascending");
    section.querySelectorAll("th button")[index].focus();
  }

  function time(text) {
    const [day, hour] = text.split(" ");
    const [y, m, d] = day.split("-").map(Number);
    return Date.UTC(y, m - 1, d, hour ? Number(hour.slice(0, 2)) : 0) / 1000;
  }

  function drawCharts(data) {
    while (charts.length) charts.pop().destroy();
    if (typeof uPlot === "undefined") return;
    for (const figure of document.querySelectorAll("figure.chart")) {
      const table = (data.tables || {})[figure.dataset.table];
      if (!table || !table.rows.length) continue;
      const column = (name) => table.rows.map((row) => row[table.columns.indexOf(name)]);
      const x = column(table.columns[0]).map(time);
      const width = Math.max(280, figure.clientWidth - 8);
      const options = {
        width, height: 240, tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
        series: [
          {},
          { label: "Requests", stroke: "#1f5fa8", width: 2, scale: "requests" },
          { label: "Tokens (total)", stroke: "#b3541e", width: 2, dash: [8, 4], scale: "tokens" },
        ],
        axes: [
          {},
          { scale: "requests", label: "Requests" },
          { scale: "tokens", label: "Tokens", side: 1, grid: { show: false } },
        ],
      };
      figure.querySelector(".uplot")?.remove();
      charts.push(new uPlot(options, [x, column("requests"), column("total_tokens")], figure));
    }
  }

  if (controls) {
    controls.addEventListener("change", load);
    controls.addEventListener("submit", (event) => { event.preventDefault(); load(); });
    const search = document.getElementById("search");
    if (search) {
      let timer = 0;
      search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(load, 300); });
    }
  }
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => latest && drawCharts(latest), 200);
  });
  load();
  if (page === "live") setInterval(load, 5000);
})();
