// Strata console: local times, sortable tables, dialogs, time filters, the
// log-backup confirmation, the restore forms' pickers, the recovery events'
// marker details and the Task Center's live progress. Pages work without it
// except for those; nothing here changes data by itself.
"use strict";

(function () {
  const pad = (n) => String(n).padStart(2, "0");

  function localText(d, withSeconds) {
    const zone = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" })
      .formatToParts(d)
      .find((p) => p.type === "timeZoneName");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}` +
      (withSeconds ? `:${pad(d.getSeconds())}` : "") +
      (zone ? ` ${zone.value}` : "");
  }

  function utcText(d) {
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  // A value for <input type="datetime-local"> in the browser's zone.
  function localInput(d, withSeconds) {
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}` +
      (withSeconds ? `:${pad(d.getSeconds())}` : "");
  }

  // "2026-11-25T10:00Z" or "…:00:07Z" as a Date.
  function parseUtc(s) {
    if (!s) return null;
    const d = new Date(s.replace(/T(\d\d:\d\d)Z$/, "T$1:00Z"));
    return isNaN(d) ? null : d;
  }

  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const d = parseUtc(el.getAttribute("datetime"));
      if (!d) return;
      el.textContent = localText(d, true);
      el.title = "UTC: " + utcText(d);
    });
    // Backup sets in a select: "id · local time", UTC on hover.
    root.querySelectorAll("option[data-utc]").forEach((el) => {
      const d = parseUtc(el.dataset.utc);
      if (!d) return;
      el.textContent = el.value + " · " + localText(d, true);
      el.title = "UTC: " + utcText(d);
    });
    // Badges whose tooltip starts with a UTC time (restore drills).
    root.querySelectorAll(".badge[data-utc]").forEach((el) => {
      const d = parseUtc(el.dataset.utc);
      if (!d) return;
      el.title = el.title.replace(utcText(d), localText(d, true) + " (UTC: " + utcText(d) + ")");
    });
    root.querySelectorAll("svg text[data-utc]").forEach((el) => {
      const d = parseUtc(el.dataset.utc);
      if (!d) return;
      const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
      el.textContent = {
        seconds: `${hm}:${pad(d.getSeconds())}`,
        time: hm,
      }[el.dataset.fmt] || `${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    });
  }

  // ----- sortable tables -----
  function cellValue(row, index, kind) {
    const cell = row.children[index];
    if (!cell) return "";
    const v = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
    if (kind === "num" || kind === "version") {
      const n = parseFloat(v);
      return isNaN(n) ? -Infinity : n;
    }
    return v.toLowerCase();
  }

  function sortTable(table) {
    const th = table.querySelector("th[aria-sort]");
    if (!th) return;
    const index = Array.prototype.indexOf.call(th.parentNode.children, th);
    const kind = th.dataset.sort;
    const dir = th.getAttribute("aria-sort") === "descending" ? -1 : 1;
    const body = table.tBodies[0];
    const rows = Array.from(body.rows);
    rows.sort((a, b) => {
      const x = cellValue(a, index, kind);
      const y = cellValue(b, index, kind);
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
    rows.forEach((r) => body.appendChild(r));
  }

  function setupSorting(table) {
    table.querySelectorAll("th[data-sort] button").forEach((button) => {
      button.addEventListener("click", () => {
        const th = button.closest("th");
        const next = th.getAttribute("aria-sort") === "ascending" ? "descending" : "ascending";
        table.querySelectorAll("th[aria-sort]").forEach((o) => o.removeAttribute("aria-sort"));
        th.setAttribute("aria-sort", next);
        sortTable(table);
      });
    });
  }

  // Each cell knows its column's name: narrow screens show it beside the value.
  function labelCells(table) {
    const names = Array.from(table.querySelectorAll("thead th")).map((th) => th.textContent.trim());
    Array.from(table.tBodies[0].rows).forEach((row) => {
      Array.from(row.cells).forEach((td, i) => { td.dataset.label = names[i] || ""; });
    });
  }

  // ----- dialogs -----
  function setupDialogs() {
    document.querySelectorAll("[data-open]").forEach((b) => {
      b.addEventListener("click", () => {
        const d = document.getElementById(b.dataset.open);
        if (d && d.showModal) d.showModal();
      });
    });
    document.querySelectorAll("dialog [data-close]").forEach((b) => {
      b.addEventListener("click", () => b.closest("dialog").close());
    });
  }

  // ----- time range filters: local inputs, UTC parameters -----
  function setupTimeFilters() {
    document.querySelectorAll("form.timefilter").forEach((form) => {
      const pairs = Array.from(form.querySelectorAll("input[data-utc-for]")).map((input) => {
        const hidden = form.querySelector(`input[type=hidden][name="${input.dataset.utcFor}"]`);
        const d = parseUtc(hidden && hidden.value);
        const seconds = input.hasAttribute("data-seconds");
        if (d) input.value = localInput(d, seconds);
        return [input, hidden, seconds];
      });
      form.addEventListener("submit", () => {
        pairs.forEach(([input, hidden, seconds]) => {
          if (!hidden) return;
          const d = input.value ? new Date(input.value) : null;
          hidden.value = d && !isNaN(d) ? d.toISOString().slice(0, seconds ? 19 : 16) + "Z" : "";
        });
      });
    });
  }

  // ----- backup strategy -----
  function setupStrategy() {
    const form = document.querySelector("form.strategy");
    if (!form) return;
    const box = form.querySelector("#log-backup");
    const warning = form.querySelector("#log-off-warning");
    const wasOn = form.dataset.logWasOn === "true";
    const mark = () => warning && box && warning.classList.toggle("active", wasOn && !box.checked);
    if (box) box.addEventListener("change", mark);
    mark();
    form.addEventListener("submit", (e) => {
      const confirmed = e.submitter && e.submitter.name === "confirm_log_off";
      const dialog = document.getElementById("log-off-dialog");
      if (wasOn && box && !box.checked && !confirmed && dialog && dialog.showModal) {
        e.preventDefault();
        dialog.showModal();
      }
    });
    form.querySelectorAll("option[data-window]").forEach((o) => {
      const m = /^(\d\d):(\d\d)Z-(\d\d):(\d\d)Z$/.exec(o.dataset.window);
      if (!m) return;
      const at = (h, mi) => {
        const d = new Date();
        d.setUTCHours(+h, +mi, 0, 0);
        return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
      };
      o.textContent += ` (${at(m[1], m[2])}–${at(m[3], m[4])} local)`;
    });
  }

  // ----- restore time picker bounds -----
  function setupBounds() {
    document.querySelectorAll("input[data-min-utc]").forEach((input) => {
      const min = parseUtc(input.dataset.minUtc);
      const max = parseUtc(input.dataset.maxUtc);
      const seconds = input.hasAttribute("data-seconds");
      if (min) input.min = localInput(min, seconds);
      if (max) input.max = localInput(max, seconds);
    });
  }

  // ----- restore forms: only the chosen source's field is shown -----
  function setupRestoreForms() {
    document.querySelectorAll("form.restore").forEach((form) => {
      const show = () => {
        const chosen = form.querySelector("input[name=restore_by]:checked");
        form.querySelectorAll("[data-by]").forEach((field) => {
          field.hidden = !!chosen && field.dataset.by !== chosen.value;
        });
      };
      form.querySelectorAll("input[name=restore_by]").forEach((r) => r.addEventListener("change", show));
      show();
    });
    setupDatabaseChoices();
  }

  // ----- Databases form: the chosen set's databases are offered -----
  function setupDatabaseChoices() {
    const select = document.getElementById("db-set");
    const list = document.getElementById("db-choices");
    const hint = document.getElementById("db-choices-hint");
    if (!select || !list || !hint) return;
    select.addEventListener("change", async () => {
      const url = hint.dataset.url + "?backup_id=" + encodeURIComponent(select.value);
      let answer;
      try {
        const resp = await fetch(url, { credentials: "same-origin" });
        answer = await resp.json();
      } catch (e) {
        hint.textContent = "The databases of backup set " + select.value + " could not be read.";
        return;
      }
      if (answer.BackupId !== select.value) return;
      list.replaceChildren();
      if (answer.Databases) {
        answer.Databases.forEach((name) => {
          const option = document.createElement("option");
          option.value = name;
          list.appendChild(option);
        });
        hint.textContent = "Backup set " + answer.BackupId + " holds " + answer.Databases.length +
          " databases: pick one in each row.";
      } else {
        hint.textContent = "No list of databases for backup set " + answer.BackupId + ": " + answer.Error;
      }
    });
  }

  // ----- recovery events: a marker pointed at or focused is described -----
  function setupTimeline() {
    const info = document.getElementById("timeline-info");
    if (!info) return;
    document.querySelectorAll("svg.strip a.marker").forEach((m) => {
      const show = () => { info.textContent = m.dataset.summary; };
      m.addEventListener("mouseenter", show);
      m.addEventListener("focus", show);
    });
  }

  // ----- Task Center -----
  function stateKind(state) {
    if (state === "Finished") return "ok";
    if (state === "Failed") return "err";
    if (state === "NoStart") return "neutral";
    return "info";
  }

  function timeElement(iso) {
    const t = document.createElement("time");
    t.setAttribute("datetime", iso);
    t.textContent = iso;
    return t;
  }

  function fill(tr, t) {
    const cell = (f) => tr.querySelector(`td[data-f="${f}"]`);
    tr.dataset.task = t.id;
    tr.dataset.status = t.status;
    cell("id").textContent = t.id;
    cell("id").dataset.v = t.id;
    const link = cell("instance").querySelector("a");
    link.href = "/console/instances/" + encodeURIComponent(t.instance) + "/backups";
    link.textContent = t.instance;
    cell("instance").dataset.v = t.instance;
    cell("type").textContent = t.type_label;
    cell("type").dataset.v = t.type_label;
    const badge = cell("status").querySelector(".badge");
    badge.className = "badge " + stateKind(t.state);
    badge.textContent = t.status_label;
    cell("status").querySelector(".state").textContent = t.state;
    cell("status").dataset.v = t.status_label;
    cell("progress").querySelector("progress").value = t.progress;
    cell("progress").querySelector(".pct").textContent = t.progress + "%";
    cell("progress").dataset.v = t.progress;
    const started = cell("started");
    started.replaceChildren(timeElement(t.started_at));
    started.dataset.v = Date.parse(t.started_at);
    const finished = cell("finished");
    if (t.finished_at) {
      finished.replaceChildren(timeElement(t.finished_at));
      finished.dataset.v = Date.parse(t.finished_at);
    } else {
      const dash = document.createElement("span");
      dash.className = "muted";
      dash.textContent = "—";
      finished.replaceChildren(dash);
      finished.dataset.v = "";
    }
    const detail = cell("detail");
    detail.textContent = t.error || (t.backup_id ? "Backup set " + t.backup_id : t.detail);
    detail.classList.toggle("err-text", !!t.error);
    localizeTimes(tr);
  }

  function setupTasks() {
    const table = document.querySelector("table[data-poll]");
    if (!table) return;
    const body = table.tBodies[0];
    const template = document.getElementById("task-row");
    const empty = document.getElementById("tasks-empty");
    const live = document.getElementById("live");
    const url = table.dataset.poll + window.location.search;

    async function poll() {
      if (document.hidden) return;
      try {
        const res = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (res.status === 401) {
          window.location = "/console/signin?next=" + encodeURIComponent(location.pathname + location.search);
          return;
        }
        if (!res.ok) throw new Error("HTTP " + res.status);
        const data = await res.json();
        const existing = new Map(Array.from(body.rows).map((r) => [r.dataset.task, r]));
        const rows = data.tasks.map((t) => {
          let tr = existing.get(String(t.id));
          existing.delete(String(t.id));
          if (!tr) tr = template.content.firstElementChild.cloneNode(true);
          fill(tr, t);
          return tr;
        });
        existing.forEach((r) => r.remove());
        rows.forEach((r) => body.appendChild(r));
        sortTable(table);
        labelCells(table);
        if (empty) empty.hidden = rows.length > 0;
        if (live) live.textContent = "Live: updated " + localText(new Date(), true) + ".";
      } catch (err) {
        if (live) live.textContent = "Live updates paused: the server did not answer (" + err.message + "). Retrying.";
      }
    }
    setInterval(poll, 1000);
    poll();
  }

  document.addEventListener("DOMContentLoaded", () => {
    localizeTimes(document);
    document.querySelectorAll("table.sortable").forEach(setupSorting);
    document.querySelectorAll("table.data").forEach(labelCells);
    setupDialogs();
    setupTimeFilters();
    setupStrategy();
    setupBounds();
    setupRestoreForms();
    setupTimeline();
    setupTasks();
  });
})();
