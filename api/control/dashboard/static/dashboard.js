// The MUST dashboard: jobs list, submit form and a live job page, on the control API's own routes.
// Everything user-supplied (class names, URIs, error messages) is written with textContent, never
// as HTML. Charts: Chart.js (vendor/chart.umd.min.js), confusion matrix: chartjs-chart-matrix.
"use strict";

(function () {
  const KEY_STORAGE = "must.apiKey";
  const API_ROOT = new URL("../", document.baseURI).pathname;
  const JOB_POLL_MS = 2000;
  const SERIES_POLL_MS = 3000;
  const LIST_POLL_MS = 5000;
  const MAX_POINTS = 1000;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const PALETTE = ["#2f6fdb", "#e0603a", "#1f8a4c", "#9b51e0", "#c2352b", "#00a3a3", "#b08400", "#6b7280"];
  // Which metric goes on which chart; anything not named lands on "Other".
  const CURVE_GROUPS = [
    { id: "losses", title: "Loss terms", names: ["loss", "self_training", "fairness", "mim", "align"] },
    { id: "lr", title: "Learning rate", names: ["lr"] },
    { id: "confident", title: "Confident fraction", names: ["confident_fraction"] },
    { id: "entropy", title: "Mean-prediction entropy", names: ["mean_pred_entropy", "normalized_mean_pred_entropy"] },
    { id: "agreement", title: "Teacher-student agreement", names: ["agreement", "teacher_max_prob"] },
  ];

  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.font.size = 11;

  const $ = (selector) => document.querySelector(selector);
  const state = { view: null, jobId: null, job: null, timers: [], generation: 0, charts: {}, series: null };

  // ---- DOM helpers -------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function clear(node) {
    for (const canvas of node.querySelectorAll("canvas")) {
      const chart = Chart.getChart(canvas);
      if (chart) chart.destroy();
    }
    node.replaceChildren();
    return node;
  }

  function fmt(value, digits = 4) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    return Math.abs(value) >= 1e4 || (value !== 0 && Math.abs(value) < 1e-3)
      ? value.toExponential(2)
      : value.toFixed(digits).replace(/\.?0+$/, "") || "0";
  }

  function signed(value, digits = 4) {
    return (value > 0 ? "+" : "") + fmt(value, digits);
  }

  function when(iso) {
    return iso ? new Date(iso).toLocaleString() : "–";
  }

  // ---- API ---------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function errorText(body, status) {
    if (!body || body.detail === undefined) return `HTTP ${status}`;
    if (Array.isArray(body.detail)) return body.detail.map((e) => `${e.field}: ${e.msg}`).join("; ");
    return String(body.detail);
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const init = { method: options.method || "GET", headers };
    if (options.json !== undefined) {
      headers.set("Content-Type", "application/json");
      init.body = JSON.stringify(options.json);
    }
    const response = await fetch(API_ROOT + path, init);
    if (response.status === 401) {
      showLogin(key ? "That API key is not valid for this service." : "This service needs an API key.");
      throw new ApiError(401, "unauthorized");
    }
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new ApiError(response.status, errorText(body, response.status));
    }
    return response;
  }

  const getJson = async (path, options) => (await api(path, options)).json();

  // ---- Login -------------------------------------------------------------------------------------

  function showLogin(message) {
    stopPolling();
    $("#login-error").textContent = message || "";
    $("#login").hidden = false;
    $("#api-key").value = "";
    $("#api-key").focus();
  }

  $("#login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("#api-key").value.trim());
    $("#login").hidden = true;
    route();
  });

  $("#logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showLogin("");
  });

  // ---- Polling and routing -----------------------------------------------------------------------

  function stopPolling() {
    state.generation += 1;
    for (const timer of state.timers) clearTimeout(timer);
    state.timers = [];
  }

  // Run `task` now and then every `ms` until the view changes or `task` returns false.
  function poll(task, ms) {
    const generation = state.generation;
    const tick = async () => {
      if (generation !== state.generation) return;
      let again = true;
      try {
        again = (await task(generation)) !== false;
      } catch (error) {
        // 401: the login prompt is up; 404: the job is gone (or not this key's). Either way, stop.
        if (error.status === 401 || error.status === 404) return;
        console.warn(error);
      }
      if (again && generation === state.generation) state.timers.push(setTimeout(tick, ms));
    };
    tick();
  }

  function route() {
    stopPolling();
    const match = location.hash.match(/^#\/jobs\/([0-9a-fA-F-]{36})$/);
    $("#jobs-view").hidden = Boolean(match);
    $("#job-view").hidden = !match;
    if (match) showJob(match[1]);
    else showJobs();
  }

  window.addEventListener("hashchange", route);

  // ---- Jobs list and submit form -----------------------------------------------------------------

  function servedCandidate(job) {
    const outcome = job.outcome;
    if (!outcome) return null;
    return outcome.candidates.find((c) => c.name === outcome.served) || null;
  }

  // The served classifier's gain: eval top-1 over zero-shot when labels were given, else the guard's margin.
  function gainText(job) {
    const evaluation = job.evaluation;
    if (evaluation && evaluation.candidates && evaluation.candidates.zero_shot) {
      const served = evaluation.candidates[evaluation.served || job.served];
      if (served) {
        const points = 100 * (served.top1 - evaluation.candidates.zero_shot.top1);
        return `${signed(points, 1)} pts top-1`;
      }
    }
    const candidate = servedCandidate(job);
    if (!candidate) return "–";
    if (candidate.name === "zero_shot") return "0 (zero-shot kept)";
    return `${signed(candidate.margin)} guard margin`;
  }

  function statusBadge(status) {
    return el("span", { className: `status status-${status}`, text: status });
  }

  function jobRow(job) {
    const fraction = job.progress.fraction;
    const progress = el("progress", { max: "1", value: String(fraction || 0) });
    const percent = fraction === null || fraction === undefined ? "" : ` ${Math.round(100 * fraction)}%`;
    const link = el("a", { href: `#/jobs/${job.id}`, text: job.id.slice(0, 8) });
    const cells = [
      link,
      statusBadge(job.status),
      job.phase || "–",
      el("span", {}, progress, percent),
      job.served || "–",
      gainText(job),
      when(job.created_at),
    ];
    return el("tr", { "data-job": job.id }, ...cells.map((c) => el("td", {}, c)));
  }

  async function loadJobs(generation) {
    const page = await getJson("adaptations?limit=100");
    if (generation !== state.generation) return false;
    $("#jobs-table tbody").replaceChildren(...page.items.map(jobRow));
    $("#jobs-empty").hidden = page.items.length > 0;
    return true;
  }

  function showJobs() {
    state.view = "jobs";
    poll(loadJobs, LIST_POLL_MS);
  }

  function submitBody(form) {
    const data = new FormData(form);
    const text = (name) => String(data.get(name) || "").trim();
    const names = text("class_names").split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
    const body = { class_names: names, dataset: { uri: text("dataset_uri") } };
    if (text("max_images")) body.dataset.max_images = Number(text("max_images"));
    const model = {};
    for (const field of ["arch", "pretrained", "checkpoint", "config"]) if (text(field)) model[field] = text(field);
    if (model.checkpoint) delete model.pretrained;
    if (model.config) delete model.arch;
    body.model = model;
    if (text("eval_uri")) body.eval = { uri: text("eval_uri") };
    if (text("hparams")) body.hparams = JSON.parse(text("hparams"));
    return body;
  }

  $("#submit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#submit-error").textContent = "";
    try {
      const job = await getJson("adaptations", { method: "POST", json: submitBody(event.target) });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      if (error.status !== 401) $("#submit-error").textContent = error.message;
    }
  });

  // ---- Job page ----------------------------------------------------------------------------------

  function showJob(jobId) {
    state.view = "job";
    state.jobId = jobId;
    state.job = null;
    state.series = null;
    state.finalLoaded = false;
    state.placeholders = false;
    $("#job-id").textContent = jobId;
    for (const id of ["#timeline", "#curves", "#distribution", "#guard", "#evaluation", "#samples"]) clear($(id));
    $("#guard-reason").textContent = "";
    $("#curves-note").textContent = "";
    poll(refreshJob, JOB_POLL_MS);
    poll(refreshSeries, SERIES_POLL_MS);
  }

  async function refreshJob(generation) {
    let job;
    try {
      job = await getJson(`adaptations/${state.jobId}`);
    } catch (error) {
      if (error.status !== 404) throw error;
      $("#job-error").textContent = error.message;  // no such job (for this key): stop asking
      return false;
    }
    if (generation !== state.generation) return false;
    state.job = job;
    renderHeader(job);
    renderTimeline(job);
    if (!TERMINAL.has(job.status)) {
      if (!state.placeholders) {
        state.placeholders = true;
        renderOutcome(job);
        renderEvaluation(job);
      }
      return true;
    }
    if (!state.finalLoaded) {
      state.finalLoaded = true;
      renderOutcome(job);
      renderEvaluation(job);
      if (job.status === "succeeded") loadSamples(job, generation);
    }
    return false;
  }

  async function refreshSeries(generation) {
    const data = await getJson(`adaptations/${state.jobId}/metrics/series?max_points=${MAX_POINTS}`);
    if (generation !== state.generation) return false;
    state.series = data;
    renderCurves(data);
    // Once the job is over and its last rows are in (or it never trained), the curves are final.
    const job = state.job;
    const done = job && TERMINAL.has(job.status) && (data.last_step === null || data.last_step >= job.progress.step);
    return !done;
  }

  function renderHeader(job) {
    $("#job-status").replaceChildren(statusBadge(job.status));
    $("#job-phase").textContent = TERMINAL.has(job.status) ? `finished${job.phase ? ` (last: ${job.phase})` : ""}` : job.phase || "–";
    const p = job.progress;
    $("#job-progress").value = p.fraction || 0;
    const eta = p.eta_seconds && !TERMINAL.has(job.status) ? `, ETA ${Math.round(p.eta_seconds)} s` : "";
    const rate = p.images_per_sec ? `, ${fmt(p.images_per_sec, 1)} img/s` : "";
    $("#job-steps").textContent = `step ${p.step} / ${p.total_steps ?? "?"}${rate}${eta}`;
    const skipped = job.images_skipped ? ` (${job.images_skipped} skipped)` : "";
    $("#job-images").textContent = `${job.images_used} used${skipped}`;
    $("#job-served").textContent = job.served || "–";
    $("#job-gain").textContent = gainText(job);
    $("#job-error").textContent = job.error ? `${job.error.type}: ${job.error.message}` : "";
    const cancel = $("#cancel");
    cancel.hidden = TERMINAL.has(job.status);
    cancel.disabled = job.cancel_requested;
    cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel";
  }

  $("#cancel").addEventListener("click", async () => {
    if (!state.jobId || !confirm("Cancel this job?")) return;
    try {
      renderHeader(await getJson(`adaptations/${state.jobId}/cancel`, { method: "POST" }));
    } catch (error) {
      if (error.status !== 401) $("#job-error").textContent = error.message;
    }
  });

  // ---- Phase timeline ----------------------------------------------------------------------------

  // `job.phases` ([{phase, started_at, ended_at}]) when the API reports it; else the job's own timestamps.
  function renderTimeline(job) {
    const box = $("#timeline");
    if (Array.isArray(job.phases) && job.phases.length) {
      const now = Date.now();
      const origin = Date.parse(job.phases[0].started_at);
      const bars = job.phases.map((p) => [
        (Date.parse(p.started_at) - origin) / 1000,
        ((p.ended_at ? Date.parse(p.ended_at) : now) - origin) / 1000,
      ]);
      const data = { labels: job.phases.map((p) => p.phase), datasets: [{ label: "seconds", data: bars, backgroundColor: PALETTE[0] }] };
      const chart = chartIn(box, "timeline-chart", "chart", () => ({
        type: "bar",
        data,
        options: {
          indexAxis: "y",
          plugins: { legend: { display: false } },
          scales: { x: { title: { display: true, text: "seconds since the first phase" } } },
        },
      }));
      chart.data = data;
      chart.update("none");
      return;
    }
    const items = [
      ["created", job.created_at],
      ["started", job.started_at],
      [`now: ${job.phase || job.status}`, TERMINAL.has(job.status) ? null : job.heartbeat_at],
      [job.status, TERMINAL.has(job.status) ? job.finished_at : null],
    ].filter(([, at]) => at);
    clear(box).append(el("ol", { className: "timeline-list" }, ...items.map(([what, at]) => el("li", { text: `${what}: ${when(at)}` }))));
  }

  // ---- Charts ------------------------------------------------------------------------------------

  // The chart with this id inside `box`, made by `config()` the first time.
  function chartIn(box, id, className, config) {
    let canvas = box.querySelector(`#${id}`);
    if (!canvas) {
      clear(box);
      const holder = el("div", { className });
      canvas = el("canvas", { id });
      holder.append(canvas);
      box.append(holder);
      return new Chart(canvas, config());
    }
    return Chart.getChart(canvas);
  }

  // The named groups, then one chart per metric no group names (their scales differ).
  function curveGroups(names) {
    const named = CURVE_GROUPS.map((g) => ({ ...g, members: names.filter((n) => g.names.includes(n)) }));
    const known = new Set(CURVE_GROUPS.flatMap((g) => g.names));
    const others = names.filter((n) => !known.has(n)).sort().map((n) => ({ id: `other-${n.replace(/[^A-Za-z0-9_-]/g, "_")}`, title: n, members: [n] }));
    return named.concat(others).filter((g) => g.members.length);
  }

  const axisTicks = { callback: (value) => fmt(value, 3) };

  function renderCurves(data) {
    const box = $("#curves");
    const names = Object.keys(data.series);
    $("#curves-note").textContent = data.rows
      ? `${data.rows} metric rows, up to ${data.max_points} points per series, last step ${data.last_step}`
      : "(no metrics yet: they appear once training starts)";
    for (const group of curveGroups(names)) {
      const datasets = group.members.map((name, i) => ({
        label: name,
        data: data.series[name].steps.map((step, j) => ({ x: step, y: data.series[name].values[j] })),
        borderColor: PALETTE[i % PALETTE.length],
        borderWidth: 1.5,
        pointRadius: 0,
      }));
      let holder = box.querySelector(`[data-group="${group.id}"]`);
      if (!holder) {
        holder = el("figure", { "data-group": group.id, className: "curve" }, el("figcaption", { text: group.title }));
        const wrap = el("div", { className: "chart" });
        const canvas = el("canvas", { id: `curve-${group.id}` });
        wrap.append(canvas);
        holder.append(wrap);
        box.append(holder);
        new Chart(canvas, {
          type: "line",
          data: { datasets },
          options: {
            parsing: false,
            normalized: true,
            interaction: { mode: "nearest", intersect: false },
            scales: { x: { type: "linear", title: { display: true, text: "step" } }, y: { ticks: axisTicks } },
          },
        });
        continue;
      }
      const chart = Chart.getChart(holder.querySelector("canvas"));
      chart.data.datasets = datasets;
      chart.update("none");
    }
  }

  function classNames(job) {
    return (job.request && job.request.class_names) || [];
  }

  function renderOutcome(job) {
    renderDistribution(job);
    renderGuard(job);
  }

  function renderDistribution(job) {
    const box = clear($("#distribution"));
    const predictions = job.outcome && job.outcome.predictions;
    const counts = predictions && predictions.class_counts;
    if (!counts) {
      box.append(el("p", { className: "muted", text: "Shown when the job has succeeded (the guard's sample is scored then)." }));
      return;
    }
    const names = classNames(job);
    const served = job.served || job.outcome.served;
    // A job that serves zero-shot records one distribution: it is both bars.
    const entries = [["zero_shot", counts.zero_shot], [served, counts[served] || counts.zero_shot]];
    const datasets = entries.map(([name, values], i) => ({
      label: i === 0 ? "zero-shot" : `served: ${name}`,
      classifier: name,
      data: values,
      backgroundColor: PALETTE[i % PALETTE.length],
    }));
    if (served === "zero_shot") {
      box.append(el("p", { className: "muted", text: "The job serves zero-shot, so both distributions are the same." }));
    }
    const holder = el("div", { className: "chart-wide" });
    const canvas = el("canvas", { id: "distribution-chart" });
    holder.append(canvas);
    box.append(holder);
    new Chart(canvas, {
      type: "bar",
      data: { labels: names.slice(0, datasets[0].data.length), datasets },
      options: {
        plugins: { tooltip: { mode: "index", intersect: false } },
        scales: { x: { ticks: { autoSkip: true, maxRotation: 60 } }, y: { title: { display: true, text: `images (of ${predictions.images})` } } },
      },
    });
  }

  function renderGuard(job) {
    const box = clear($("#guard"));
    const outcome = job.outcome;
    if (!outcome) {
      box.append(el("p", { className: "muted", text: "The guard scores the candidates when training ends." }));
      return;
    }
    $("#guard-reason").textContent = `Serves ${outcome.served}: ${outcome.reason}`;
    const columns = [
      ["candidate", (c) => c.name],
      ["step", (c) => c.step],
      ["margin", (c) => signed(c.margin)],
      ["gain (zero-shot space)", (c) => signed(c.gain_zs_space)],
      ["gain (own space)", (c) => signed(c.gain_own_space)],
      ["zero-shot in own space", (c) => fmt(c.zero_shot_in_own_space)],
      ["balance", (c) => fmt(c.balance)],
      ["agreement with zero-shot", (c) => fmt(c.agreement_with_zero_shot)],
      ["mean confidence", (c) => fmt(c.mean_confidence)],
    ];
    const head = el("tr", {}, ...columns.map(([title]) => el("th", { text: title })));
    const rows = outcome.candidates.map((c) =>
      el("tr", { className: c.name === outcome.served ? "served" : "", "data-candidate": c.name }, ...columns.map(([, get]) => el("td", { text: String(get(c)) }))),
    );
    box.append(el("table", { className: "grid", id: "guard-table" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  }

  // `job.evaluation`: {images, class_names, served, candidates: {name: {top1, per_class_recall, confusion}}}.
  function renderEvaluation(job) {
    const box = clear($("#evaluation"));
    const evaluation = job.evaluation;
    if (!evaluation || !evaluation.candidates) {
      const asked = job.request && job.request.eval;
      const text = asked ? "Reported when the job has finished." : "No labelled eval set was given (request.eval).";
      box.append(el("p", { className: "muted", text }));
      return;
    }
    const names = Object.keys(evaluation.candidates);
    const served = evaluation.served || job.served;
    const top1 = names.map((n) => 100 * evaluation.candidates[n].top1);
    box.append(el("p", { text: `Top-1 on ${evaluation.images} labelled images (served: ${served}).` }));
    const top1Box = el("div", { className: "chart" }, el("canvas", { id: "eval-top1" }));
    box.append(top1Box);
    new Chart(top1Box.firstChild, {
      type: "bar",
      data: { labels: names, datasets: [{ label: "top-1 %", data: top1, backgroundColor: names.map((n) => (n === served ? PALETTE[0] : PALETTE[7])) }] },
      options: { plugins: { legend: { display: false } }, scales: { y: { min: 0, max: 100 } } },
    });
    const select = el("select", { id: "eval-candidate" }, ...names.map((n) => el("option", { value: n, text: n })));
    select.value = names.includes(served) ? served : names[0];
    const detail = el("div", {});
    box.append(el("label", { text: "Confusion matrix and recall of " }, select), detail);
    const show = () => renderConfusion(detail, evaluation, select.value);
    select.addEventListener("change", show);
    show();
  }

  function renderConfusion(box, evaluation, name) {
    clear(box);
    const candidate = evaluation.candidates[name];
    const classes = evaluation.class_names;
    const recall = classes.map((c) => 100 * (candidate.per_class_recall[c] ?? 0));
    const recallBox = el("div", { className: "chart" }, el("canvas", { id: "eval-recall" }));
    box.append(recallBox);
    new Chart(recallBox.firstChild, {
      type: "bar",
      data: { labels: classes, datasets: [{ label: `per-class recall % (${name})`, data: recall, backgroundColor: PALETTE[2] }] },
      options: { scales: { y: { min: 0, max: 100 } } },
    });
    const cells = [];
    candidate.confusion.forEach((row, t) => {
      const total = row.reduce((a, b) => a + b, 0) || 1;
      row.forEach((v, p) => { if (v) cells.push({ x: classes[p], y: classes[t], v, share: v / total }); });
    });
    const k = classes.length;
    const matrixBox = el("div", { className: "chart-matrix" }, el("canvas", { id: "eval-confusion" }));
    box.append(matrixBox);
    new Chart(matrixBox.firstChild, {
      type: "matrix",
      data: {
        datasets: [{
          label: `confusion (${name}): rows true, columns predicted`,
          data: cells,
          backgroundColor: (ctx) => `rgba(47, 111, 219, ${0.08 + 0.92 * ((ctx.raw && ctx.raw.share) || 0)})`,
          width: ({ chart }) => Math.max(1, (chart.chartArea || { width: 0 }).width / k - 1),
          height: ({ chart }) => Math.max(1, (chart.chartArea || { height: 0 }).height / k - 1),
        }],
      },
      options: {
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { title: () => "", label: (ctx) => `true ${ctx.raw.y} → predicted ${ctx.raw.x}: ${ctx.raw.v}` } },
        },
        scales: {
          x: { type: "category", labels: classes, offset: true, title: { display: true, text: "predicted" }, grid: { display: false } },
          y: { type: "category", labels: classes, offset: true, reverse: false, title: { display: true, text: "true" }, grid: { display: false } },
        },
      },
    });
  }

  // ---- Sample images -----------------------------------------------------------------------------

  const thumbQueue = [];
  let thumbsInFlight = 0;
  const MAX_THUMBS_IN_FLIGHT = 6;

  function pumpThumbs() {
    while (thumbsInFlight < MAX_THUMBS_IN_FLIGHT && thumbQueue.length) {
      const { img, path, generation } = thumbQueue.shift();
      if (generation !== state.generation) continue;
      thumbsInFlight += 1;
      api(path)
        .then((r) => r.blob())
        .then((blob) => {
          img.onload = () => URL.revokeObjectURL(img.src);
          img.src = URL.createObjectURL(blob);
        })
        .catch((error) => { img.alt = `unavailable: ${error.message}`; })
        .finally(() => { thumbsInFlight -= 1; pumpThumbs(); });
    }
  }

  // Thumbnails load when their class scrolls into view, a few at a time (200 classes x 6 images).
  const thumbObserver = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      thumbObserver.unobserve(entry.target);
      for (const img of entry.target.querySelectorAll("img[data-path]")) {
        thumbQueue.push({ img, path: img.dataset.path, generation: Number(entry.target.dataset.generation) });
      }
      pumpThumbs();
    }
  }, { rootMargin: "200px" });

  async function loadSamples(job, generation) {
    const box = clear($("#samples"));
    let samples;
    try {
      samples = await getJson(`adaptations/${job.id}/samples`);
    } catch (error) {
      if (error.status !== 401) box.append(el("p", { className: "muted", text: error.message }));
      return;
    }
    if (generation !== state.generation) return;
    const names = classNames(job);
    box.append(el("p", { className: "muted", text: `Up to ${samples.per_class} of the ${samples.images} guard-sample images per class, as ${samples.classifier} predicts them. Outlined: zero-shot predicted another class.` }));
    for (const cls of samples.classes) {
      if (!cls.images) continue;
      const thumbs = el("div", { className: "thumbs" });
      for (let i = 0; i < cls.images; i += 1) {
        const zs = cls.zero_shot[i];
        const moved = zs !== cls.index;
        const caption = `p=${fmt(cls.confidence[i], 2)}${moved ? ` · zero-shot: ${names[zs] ?? zs}` : ""}`;
        const img = el("img", { alt: `${cls.name} sample ${i}`, "data-path": `adaptations/${job.id}/samples/${cls.index}/${i}` });
        thumbs.append(el("div", { className: moved ? "thumb moved" : "thumb" }, img, el("span", { text: caption })));
      }
      const block = el("div", { className: "class-block", "data-class": String(cls.index), "data-generation": String(generation) },
        el("h4", { text: `${cls.name} (${cls.images})` }), thumbs);
      box.append(block);
      thumbObserver.observe(block);
    }
  }

  // ---- Start -------------------------------------------------------------------------------------

  // For tests and the curious: the renderers take a job as GET /adaptations/{id} returns it.
  window.mustDashboard = { state, stopPolling, renderTimeline, renderEvaluation, renderOutcome, gainText };
  route();
})();
