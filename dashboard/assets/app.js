// Kiln dashboard. No framework and no build step: the DOM is built with
// createElement/textContent (never innerHTML with data), updated in place so
// numbers change without moving anything, and fed by one server-sent event
// stream (/api/events) that carries the whole live view.
'use strict';

const S = {
  live: null,
  page: 'fleet',
  jobId: null,
  job: null,
  jobLoading: false,
  queueVersion: -1,
  queueTimer: null,
  jobsTimer: null,
  confirmResolve: null,
};

// ---------- helpers ----------

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  for (const kid of kids.flat()) {
    if (kid == null || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}

function setText(el, text) {
  if (el && el.textContent !== text) el.textContent = text;
}

const DASH = '—';

function gib(mb) {
  return (mb / 1024).toFixed(1);
}

function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return DASH;
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} m ${String(s % 60).padStart(2, '0')} s`;
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return `${hrs} h ${String(m % 60).padStart(2, '0')} m`;
  return `${Math.floor(hrs / 24)} d ${String(hrs % 24).padStart(2, '0')} h`;
}

function now() {
  return S.live && S.live.at_ms ? S.live.at_ms : Date.now();
}

function ago(ms) {
  if (!ms) return DASH;
  return duration((now() - ms) / 1000) + ' ago';
}

function clock(ms) {
  if (!ms) return DASH;
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  const t = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
  return today ? t : `${d.toLocaleDateString()} ${t}`;
}

function pctText(p) {
  return `${Math.floor(p).toString().padStart(3, '\u2007')}%`;
}

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

function jobLink(id) {
  return h('a', { href: `#/jobs/${encodeURIComponent(id)}`, class: 'mono' }, id);
}

function badge(state) {
  return h('span', { class: `badge s-${state}` }, state);
}

const WAIT_REASONS = {
  no_capable_worker: 'no capable worker',
  backend_down: 'backend down',
  all_busy: 'all busy',
  bigger_gpu: 'waiting for a bigger GPU',
  held: 'held by a busy worker',
  warm_gpu: 'waiting for a GPU with its model loaded',
};

async function api(path, options = {}) {
  const init = { headers: { Accept: 'application/json' }, credentials: 'same-origin', ...options };
  if (options.body !== undefined) {
    init.method = options.method || 'POST';
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(options.body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw { error: `the dashboard server cannot be reached (${e.message})` };
  }
  if (res.status === 401) {
    location.href = '/login';
    throw { error: 'not logged in' };
  }
  let data = null;
  try {
    data = await res.json();
  } catch (_) {
    data = { error: `HTTP ${res.status}` };
  }
  if (!res.ok) throw data && data.error ? data : { error: `HTTP ${res.status}` };
  return data;
}

function toast(text, kind = 'ok') {
  const t = $('#toast');
  t.className = `toast ${kind}`;
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

// A modal question; resolves true only on the explicit confirm button.
function confirmAction(title, body, verb) {
  const dlg = $('#confirm');
  setText($('#confirm-title'), title);
  setText($('#confirm-body'), body);
  setText($('#confirm-yes'), verb);
  dlg.returnValue = '';
  dlg.showModal();
  $('#confirm-yes').focus();
  return new Promise((resolve) => {
    S.confirmResolve = resolve;
  });
}

function confirmClosed() {
  const dlg = $('#confirm');
  if (S.confirmResolve) {
    S.confirmResolve(dlg.returnValue === 'yes');
    S.confirmResolve = null;
  }
}

// ---------- actions ----------

async function cancelJob(id, resultEl) {
  if (!(await confirmAction(`Cancel ${id}?`, 'A queued job is removed from the queue; a running job is stopped on its GPU.', 'Cancel job'))) return;
  try {
    const r = await api(`/api/jobs/${encodeURIComponent(id)}/cancel`, { body: {} });
    const text = `${id}: cancel requested; the job is ${r.state}`;
    showResult(resultEl, text, 'ok');
    toast(text);
    if (S.page === 'job' && S.jobId === id) loadJob();
  } catch (e) {
    showResult(resultEl, `Cancel ${id} failed: ${e.error}`, 'error');
    toast(`Cancel ${id} failed: ${e.error}`, 'error');
  }
}

async function resubmitJob(id, resultEl) {
  if (!(await confirmAction(`Resubmit ${id}?`, 'A new job with the same backend, task, model, priority and parameters is queued.', 'Resubmit'))) return;
  try {
    const r = await api(`/api/jobs/${encodeURIComponent(id)}/resubmit`, { body: {} });
    const newId = r.accepted.job_id;
    showResult(resultEl, [`${id} resubmitted as `, jobLink(newId), ` (${r.accepted.state})`], 'ok');
    toast(`${id} resubmitted as ${newId}`);
  } catch (e) {
    showResult(resultEl, `Resubmit ${id} failed: ${e.error}`, 'error');
    toast(`Resubmit ${id} failed: ${e.error}`, 'error');
  }
}

function showResult(el, content, kind) {
  if (!el) return;
  el.replaceChildren(...[content].flat());
  el.className = `result ${kind}`;
  el.hidden = false;
}

// ---------- live stream ----------

function connect() {
  const es = new EventSource('/api/events');
  es.addEventListener('live', (ev) => {
    try {
      S.live = JSON.parse(ev.data);
    } catch (_) {
      return;
    }
    renderConnection();
    render();
  });
  es.onerror = () => {
    const c = $('#conn');
    c.dataset.state = 'down';
    setText(c, 'dashboard server unreachable; reconnecting…');
  };
}

function renderConnection() {
  const c = $('#conn');
  const b = S.live.broker;
  if (!b.connected) {
    c.dataset.state = 'down';
    setText(c, b.error ? `broker unreachable: ${b.error}` : 'connecting to the broker…');
    return;
  }
  const recent = b.last_event_ms && S.live.at_ms - b.last_event_ms < 30000;
  c.dataset.state = 'up';
  setText(c, recent ? 'live' : `live · polling every ${(b.poll_ms / 1000).toFixed(1)} s`);
}

function render() {
  if (!S.live) return;
  switch (S.page) {
    case 'fleet': renderFleet(); break;
    case 'queue': maybeReloadQueue(); break;
    case 'job': renderJobLive(); break;
    case 'actions': fillBackends(); break;
    default: break;
  }
}

// ---------- fleet ----------

function gpuCard() {
  return h('article', { class: 'gpu', tabindex: '-1' },
    h('header', null,
      h('h3', { class: 'name' }),
      h('span', { class: 'badge state' })),
    h('dl', { class: 'facts' },
      h('div', null, h('dt', null, 'Worker'), h('dd', { class: 'wid mono' })),
      h('div', null, h('dt', null, 'Host'), h('dd', { class: 'host' })),
      h('div', null, h('dt', null, 'Temp'), h('dd', { class: 'temp num' })),
      h('div', null, h('dt', null, 'Util'), h('dd', { class: 'util num' })),
      h('div', null, h('dt', null, 'Power'), h('dd', { class: 'power num' })),
      h('div', null, h('dt', null, 'Done'), h('dd', { class: 'done num' }))),
    h('div', { class: 'vram' },
      h('span', { class: 'label' }, 'VRAM'),
      h('div', { class: 'bar', role: 'meter', 'aria-label': 'VRAM used', 'aria-valuemin': '0', 'aria-valuemax': '100' },
        h('div', { class: 'fill' })),
      h('span', { class: 'vram-text num' })),
    h('div', { class: 'models' }, h('span', { class: 'label' }, 'Resident'), h('span', { class: 'resident' })),
    h('div', { class: 'current' },
      h('div', { class: 'job-line' }, h('span', { class: 'job-id' }), h('span', { class: 'stage' })),
      h('div', { class: 'job-bar' },
        h('progress', { class: 'job-progress', max: '100', value: '0' }),
        h('span', { class: 'pct num' }),
        h('span', { class: 'eta num' }))));
}

function updateCard(card, w, job) {
  const g = w.gpu || {};
  card.dataset.state = w.state;
  setText($('.name', card), g.name || '(unnamed GPU)');
  const st = $('.state', card);
  st.className = `badge state s-${w.state}`;
  setText(st, w.state);
  setText($('.wid', card), w.worker_id);
  setText($('.host', card), w.hostname || DASH);
  setText($('.temp', card), g.temperature_c != null ? `${g.temperature_c} °C` : DASH);
  setText($('.util', card), g.utilization_pct != null ? `${g.utilization_pct} %` : DASH);
  setText($('.power', card), g.power_mw != null ? `${(g.power_mw / 1000).toFixed(0)} W` : DASH);
  setText($('.done', card), String(w.jobs_done));
  const total = g.total_vram_mb || 0;
  const used = Math.max(0, total - (g.free_vram_mb || 0));
  const share = total > 0 ? (100 * used) / total : 0;
  const bar = $('.vram .bar', card);
  bar.setAttribute('aria-valuenow', share.toFixed(0));
  $('.fill', bar).style.width = `${share.toFixed(1)}%`;
  bar.dataset.level = share > 90 ? 'high' : share > 70 ? 'mid' : 'low';
  setText($('.vram-text', card), total > 0 ? `${gib(used)} / ${gib(total)} GiB${g.unified_memory ? ' (unified)' : ''}` : DASH);
  const resident = w.resident && w.resident.length ? w.resident : (w.loaded_model ? [w.loaded_model] : []);
  setText($('.resident', card), resident.length ? resident.join(', ') : 'none reported');
  const cur = $('.current', card);
  const idSlot = $('.job-id', card);
  const progress = $('.job-progress', card);
  if (w.current_job) {
    cur.dataset.active = 'yes';
    if (idSlot.dataset.job !== w.current_job) {
      idSlot.dataset.job = w.current_job;
      idSlot.replaceChildren(jobLink(w.current_job));
    }
    progress.dataset.job = w.current_job;
    const p = job && job.progress ? job.progress : null;
    const pct = p ? p.pct : 0;
    progress.value = pct;
    progress.setAttribute('aria-label', `progress of ${w.current_job}`);
    setText($('.pct', card), p ? pctText(pct) : DASH);
    setText($('.stage', card), p && p.stage ? p.stage : (job ? 'starting' : ''));
    setText($('.eta', card), job && job.eta_s != null ? `ETA ${duration(job.eta_s)}` : 'ETA —');
  } else {
    cur.dataset.active = 'no';
    delete idSlot.dataset.job;
    idSlot.replaceChildren(h('span', { class: 'muted' }, w.state === 'unhealthy' ? 'not taking jobs: backend unhealthy' : 'no job'));
    delete progress.dataset.job;
    progress.value = 0;
    setText($('.stage', card), '');
    setText($('.pct', card), '');
    setText($('.eta', card), '');
  }
}

function renderFleet() {
  const live = S.live;
  const online = live.workers.filter((w) => w.state !== 'offline');
  const gone = live.workers.filter((w) => w.state === 'offline');
  const busy = online.filter((w) => w.state === 'busy').length;
  setText($('#fleet-summary'),
    `${online.length} GPU${online.length === 1 ? '' : 's'} online · ${busy} busy · ${live.queue.running} running · ${live.queue.queued} queued`);
  const running = new Map(live.running.map((j) => [j.job_id, j]));
  const grid = $('#gpus');
  const cards = new Map($$('.gpu', grid).map((c) => [c.dataset.worker, c]));
  const order = [];
  for (const w of online) {
    let card = cards.get(w.worker_id);
    if (!card) {
      card = gpuCard();
      card.dataset.worker = w.worker_id;
      grid.append(card);
    }
    cards.delete(w.worker_id);
    updateCard(card, w, running.get(w.current_job));
    order.push(card);
  }
  for (const stale of cards.values()) stale.remove();
  const current = $$('.gpu', grid);
  if (current.some((c, i) => c !== order[i])) order.forEach((c) => grid.append(c));
  $('#gpus-empty').hidden = online.length > 0;

  const body = $('#gone tbody');
  body.replaceChildren(...gone.map((w) => h('tr', null,
    h('td', { class: 'mono' }, w.worker_id),
    h('td', null, w.hostname || DASH),
    h('td', null, (w.gpu && w.gpu.name) || DASH),
    h('td', { class: 'num' }, ago(w.last_seen_ms)),
    h('td', null, w.offline_reason || 'not reported (the broker restarted since)'))));
  $('#gone').hidden = gone.length === 0;
  $('#gone-empty').hidden = gone.length > 0;
}

// ---------- queue ----------

function maybeReloadQueue() {
  if (S.live && S.live.queue.version !== S.queueVersion && !S.queueTimer) {
    // At most one reload a second, however fast the queue moves.
    S.queueTimer = setTimeout(() => { S.queueTimer = null; loadQueue(); }, S.queueVersion < 0 ? 0 : 1000);
  }
}

async function loadQueue() {
  if (S.live) S.queueVersion = S.live.queue.version;
  let q;
  try {
    q = await api('/api/queue');
  } catch (e) {
    setText($('#queue-summary'), `Cannot load the queue: ${e.error}`);
    return;
  }
  const byClient = new Map();
  for (const j of q.jobs) byClient.set(j.client, (byClient.get(j.client) || 0) + 1);
  const total = S.live ? S.live.queue.queued : q.shown;
  setText($('#queue-summary'),
    `${Math.max(total, q.shown)} waiting${q.truncated ? ` (the first ${q.shown} shown)` : ''}` +
    (byClient.size ? ` · ${[...byClient].map(([c, n]) => `${c}: ${n}`).join(' · ')}` : ''));
  const table = $('#queue-table');
  const groups = new Map();
  for (const j of q.jobs) {
    if (!groups.has(j.priority)) groups.set(j.priority, []);
    groups.get(j.priority).push(j);
  }
  const bodies = [];
  for (const [prio, jobs] of groups) {
    bodies.push(h('tbody', null,
      h('tr', { class: 'group' }, h('th', { colspan: '7', scope: 'rowgroup' }, `Priority ${prio} · ${jobs.length} job${jobs.length === 1 ? '' : 's'}`)),
      jobs.map((j) => {
        const w = j.waiting;
        return h('tr', { 'data-job': j.job_id },
          h('td', { class: 'num' }, j.queue_position != null ? String(j.queue_position + 1) : DASH),
          h('td', null, jobLink(j.job_id)),
          h('td', null, j.client),
          h('td', null, `${j.backend} · ${j.task}`),
          h('td', null, j.model || DASH),
          h('td', { class: 'num' }, duration((now() - j.created_ms) / 1000)),
          h('td', { class: 'why' }, w
            ? [h('strong', null, WAIT_REASONS[w.reason] || w.reason), w.detail ? `: ${w.detail}` : '']
            : h('span', { class: 'muted' }, 'not reported by this broker')));
      })));
  }
  $$('tbody', table).forEach((b) => b.remove());
  table.append(...bodies);
  $('#queue-empty').hidden = q.jobs.length > 0;
  table.hidden = q.jobs.length === 0;
}

// ---------- jobs ----------

function scheduleJobs() {
  clearTimeout(S.jobsTimer);
  S.jobsTimer = setTimeout(loadJobs, 250);
}

async function loadJobs() {
  const f = $('#jobs-filter');
  const params = new URLSearchParams();
  for (const name of ['state', 'backend', 'client', 'worker', 'q']) {
    const v = f.elements[name].value.trim();
    if (v) params.set(name, v);
  }
  const err = $('#jobs-error');
  let r;
  try {
    r = await api(`/api/jobs?${params}`);
  } catch (e) {
    err.textContent = e.error;
    err.hidden = false;
    return;
  }
  err.hidden = true;
  const body = $('#jobs-table tbody');
  body.replaceChildren(...r.jobs.map((j) => h('tr', { 'data-job': j.job_id },
    h('td', null, jobLink(j.job_id)),
    h('td', null, badge(j.state)),
    h('td', null, `${j.backend} · ${j.task}`),
    h('td', null, j.model || DASH),
    h('td', null, j.client),
    h('td', { class: 'mono' }, j.worker || DASH),
    h('td', { class: 'num' }, clock(j.created_ms)),
    h('td', { class: 'num' }, j.started_ms ? duration(((j.finished_ms || now()) - j.started_ms) / 1000) : DASH),
    h('td', { class: 'err' }, j.error ? j.error.message : ''))));
  setText($('#jobs-count'), `${r.jobs.length} job${r.jobs.length === 1 ? '' : 's'} shown, newest first`);
}

// ---------- one job ----------

async function loadJob() {
  const id = S.jobId;
  if (!id || S.jobLoading) return;
  S.jobLoading = true;
  try {
    const job = await api(`/api/jobs/${encodeURIComponent(id)}`);
    if (S.jobId === id) {
      S.job = job;
      renderJob();
    }
  } catch (e) {
    if (S.jobId === id) {
      S.job = null;
      $('#job-body').replaceChildren(h('p', { class: 'error', role: 'alert' }, `Cannot load ${id}: ${e.error}`));
      setText($('#job-title'), id);
    }
  } finally {
    S.jobLoading = false;
  }
}

function field(dt, dd) {
  return h('div', null, h('dt', null, dt), h('dd', null, dd));
}

function attemptsOf(history) {
  const out = new Map();
  for (const t of history || []) {
    if (!t.attempt) continue;
    if (!out.has(t.attempt)) out.set(t.attempt, { attempt: t.attempt, start: null, end: null, worker: null, state: null, note: '' });
    const a = out.get(t.attempt);
    if (t.state === 'running' && a.start == null) { a.start = t.at_ms; a.worker = t.worker || a.worker; }
    if (t.state !== 'running') { a.end = t.at_ms; a.state = t.state; a.note = t.note || a.note; }
    if (t.worker) a.worker = t.worker;
  }
  return [...out.values()];
}

function artifactView(a) {
  const src = `/api/artifacts/${encodeURIComponent(a.id)}`;
  const type = a.media_type || '';
  let media;
  if (/^image\/(png|jpeg|webp|gif)$/.test(type)) media = h('img', { src, alt: a.name, class: 'preview', 'data-artifact': a.id });
  else if (type.startsWith('video/')) media = h('video', { src, controls: true, preload: 'metadata', class: 'preview', 'data-artifact': a.id });
  else if (type.startsWith('audio/')) media = h('audio', { src, controls: true, preload: 'metadata', 'data-artifact': a.id });
  else media = h('p', { class: 'muted' }, 'No preview for this type.');
  return h('figure', { class: 'output' },
    media,
    h('figcaption', null,
      h('span', { class: 'mono' }, a.name), ' · ', type, ' · ', h('span', { class: 'num' }, bytes(a.size)), ' · ',
      h('a', { href: `${src}?download=1`, download: a.name }, 'Download'),
      h('div', { class: 'sha mono', title: 'sha256' }, `sha256 ${a.sha256}`)));
}

function renderJob() {
  const j = S.job;
  if (!j) return;
  setText($('#job-title'), `Job ${j.job_id}`);
  const terminal = ['succeeded', 'failed', 'cancelled'].includes(j.state);
  const result = $('#job-result');
  const actions = h('div', { class: 'actions' },
    terminal ? null : h('button', { id: 'job-cancel', class: 'danger', onclick: () => cancelJob(j.job_id, result), disabled: j.cancel_requested }, j.cancel_requested ? 'Cancel requested' : 'Cancel'),
    h('button', { id: 'job-resubmit', onclick: () => resubmitJob(j.job_id, result) }, 'Resubmit'));
  const p = j.progress;
  // Only a job that runs (or waits to run again with progress kept) has a bar.
  const progress = h('div', { class: 'job-bar big', hidden: terminal || (j.state !== 'running' && !p) },
    h('progress', { id: 'job-progress', max: '100', value: String(p ? p.pct : 0), 'data-job': j.job_id, 'aria-label': 'progress' }),
    h('span', { id: 'job-pct', class: 'pct num' }, p ? pctText(p.pct) : DASH),
    h('span', { id: 'job-eta', class: 'eta num' }, 'ETA —'),
    h('span', { id: 'job-stage', class: 'stage' }, p ? p.stage : ''));
  const facts = h('dl', { class: 'facts wide' },
    field('State', badge(j.state)),
    field('Backend', j.backend),
    field('Task', j.task),
    field('Model', j.model || DASH),
    field('Priority', String(j.priority)),
    field('Client', j.client),
    field('Worker', j.worker || DASH),
    field('GPU', j.gpu || DASH),
    field('Tries', `${j.tries ?? DASH} of ${j.max_attempts}`),
    field('Created', clock(j.created_ms)),
    field('Started', clock(j.started_ms)),
    field('Finished', clock(j.finished_ms)),
    j.queue_position != null ? field('Position', String(j.queue_position + 1)) : null,
    j.waiting ? field('Waiting', `${WAIT_REASONS[j.waiting.reason] || j.waiting.reason}${j.waiting.detail ? ': ' + j.waiting.detail : ''}`) : null,
    j.degrade ? field('Degraded', `${j.degrade} step(s) below the request`) : null);
  const params = j.params
    ? h('table', { class: 'kv' }, h('tbody', null, Object.entries(j.params).map(([k, v]) =>
      h('tr', null, h('th', { scope: 'row' }, k), h('td', { class: 'mono' }, typeof v === 'string' ? v : JSON.stringify(v))))))
    : h('p', { class: 'muted' }, 'Not reported by the broker.');
  const timeline = h('ol', { class: 'timeline' }, (j.history || []).map((t) => h('li', { 'data-state': t.state },
    h('span', { class: 'num when' }, clock(t.at_ms)), ' ', badge(t.state),
    t.attempt ? h('span', { class: 'muted' }, ` attempt ${t.attempt}`) : null,
    t.worker ? h('span', null, ' on ', h('span', { class: 'mono' }, t.worker)) : null,
    t.note ? h('div', { class: 'note' }, t.note) : null)));
  const attempts = attemptsOf(j.history);
  const attemptTable = attempts.length
    ? h('table', { class: 'list' },
      h('thead', null, h('tr', null, ['Attempt', 'Worker', 'Started', 'Ran', 'Ended', 'Note'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', null, attempts.map((a) => h('tr', null,
        h('td', { class: 'num' }, String(a.attempt)),
        h('td', { class: 'mono' }, a.worker || DASH),
        h('td', { class: 'num' }, clock(a.start)),
        h('td', { class: 'num' }, a.start ? duration(((a.end || now()) - a.start) / 1000) : DASH),
        h('td', null, a.state ? badge(a.state) : 'running'),
        h('td', null, a.note || '')))))
    : h('p', { class: 'muted' }, 'Not started yet.');
  const error = j.error
    ? h('div', { class: 'error-box', role: 'alert' }, h('strong', null, j.error.kind), `: ${j.error.message}`, j.error.retryable ? ' (retryable)' : '')
    : null;
  const outputs = j.artifacts && j.artifacts.length
    ? h('div', { class: 'outputs' }, j.artifacts.map(artifactView))
    : h('p', { class: 'muted' }, terminal ? 'No outputs.' : 'Outputs appear when the job succeeds.');
  const info = j.info && Object.keys(j.info).length
    ? h('table', { class: 'kv' }, h('tbody', null, Object.entries(j.info).map(([k, v]) =>
      h('tr', null, h('th', { scope: 'row' }, k), h('td', { class: 'mono' }, typeof v === 'string' ? v : JSON.stringify(v))))))
    : null;
  $('#job-body').replaceChildren(...[
    actions, progress, error,
    h('h2', null, 'Outputs'), outputs,
    h('h2', null, 'Details'), facts,
    h('h2', null, 'Parameters'), params,
    info ? h('h2', null, 'Reported by the backend') : null, info,
    h('h2', null, 'Attempts'), attemptTable,
    h('h2', null, 'History'), timeline].filter(Boolean));
  renderJobLive();
}

// Moves the open job's progress bar from the live view; reloads the job when it
// changes state (it left or entered the running list, or the queue moved).
function renderJobLive() {
  const j = S.job;
  if (!j || !S.live || S.jobId !== j.job_id) return;
  const live = S.live.running.find((r) => r.job_id === j.job_id);
  if (live) {
    if (j.state !== 'running') { loadJob(); return; }
    const p = live.progress;
    const bar = $('#job-progress');
    if (bar && p) {
      bar.value = p.pct;
      bar.parentElement.hidden = false;
      setText($('#job-pct'), pctText(p.pct));
      setText($('#job-stage'), p.stage || '');
    }
    setText($('#job-eta'), live.eta_s != null ? `ETA ${duration(live.eta_s)}` : 'ETA —');
  } else if (j.state === 'running' || (j.state === 'queued' && S.live.queue.version !== S.jobQueueVersion)) {
    S.jobQueueVersion = S.live.queue.version;
    loadJob();
  }
}

// ---------- actions page ----------

function fillBackends() {
  const select = $('#submit-form').elements.backend;
  const offered = new Set();
  for (const w of (S.live ? S.live.workers : [])) {
    if (w.state === 'offline') continue;
    for (const b of w.backends || []) offered.add(b.backend);
  }
  const want = [...offered].sort();
  const have = [...select.options].map((o) => o.value);
  if (want.join() === have.join()) return;
  const keep = select.value;
  select.replaceChildren(...want.map((b) => h('option', { value: b }, b)));
  if (want.includes(keep)) select.value = keep;
  $('#submit-no-backend').hidden = want.length > 0;
}

function clearFieldErrors(form) {
  $$('.field-error', form).forEach((e) => e.remove());
  $$('[aria-invalid]', form).forEach((e) => e.removeAttribute('aria-invalid'));
}

async function submitTestJob(ev) {
  ev.preventDefault();
  const form = ev.target;
  clearFieldErrors(form);
  const result = $('#submit-result');
  const body = {};
  for (const name of ['backend', 'task', 'prompt', 'model', 'priority', 'steps', 'width', 'height', 'seed']) {
    body[name] = (form.elements[name].value || '').trim();
  }
  if (!body.prompt) {
    markField(form, 'prompt', 'a prompt is required');
    return;
  }
  if (!(await confirmAction('Submit this test job?', `${body.backend} · ${body.task || 'text_to_image'}: “${body.prompt}”`, 'Submit job'))) return;
  try {
    const r = await api('/api/submit', { body });
    showResult(result, ['Queued as ', jobLink(r.job_id), ` (${r.state}${r.duplicate ? ', an earlier identical submit' : ''})`], 'ok');
    toast(`Queued as ${r.job_id}`);
  } catch (e) {
    if (e.field && form.elements[e.field]) markField(form, e.field, e.error);
    showResult(result, `Not submitted: ${e.error}`, 'error');
  }
}

function markField(form, name, message) {
  const input = form.elements[name];
  input.setAttribute('aria-invalid', 'true');
  const id = `${input.id}-error`;
  input.setAttribute('aria-describedby', id);
  input.closest('label').append(h('span', { class: 'field-error', id, role: 'alert' }, message));
  input.focus();
}

async function actOnId(ev, action) {
  ev.preventDefault();
  const input = $('#act-id');
  const result = $('#act-result');
  clearFieldErrors($('#act-form'));
  const id = input.value.trim();
  if (!/^j[0-9]+$/.test(id)) {
    markField($('#act-form'), 'job_id', 'a job id looks like j42');
    return;
  }
  if (action === 'cancel') await cancelJob(id, result);
  else await resubmitJob(id, result);
}

// ---------- routing and keys ----------

const TITLES = { fleet: 'Fleet', queue: 'Queue', jobs: 'Jobs', job: 'Job', actions: 'Actions' };

function route() {
  const m = (location.hash || '#/fleet').match(/^#\/(fleet|queue|jobs|actions)(?:\/([^/?#]+))?/);
  let page = m ? m[1] : 'fleet';
  const id = m && m[2] ? decodeURIComponent(m[2]) : null;
  if (page === 'jobs' && id) page = 'job';
  const changed = page !== S.page || id !== S.jobId;
  S.page = page;
  S.jobId = id;
  for (const sec of $$('main > section')) sec.hidden = sec.id !== `page-${page}`;
  for (const a of $$('nav a')) {
    if (a.dataset.page === (page === 'job' ? 'jobs' : page)) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.title = `${TITLES[page]}${id ? ' ' + id : ''} · Kiln`;
  if (page === 'queue') { S.queueVersion = -1; maybeReloadQueue(); loadQueue(); }
  if (page === 'jobs') loadJobs();
  if (page === 'job' && changed) {
    S.job = null;
    $('#job-result').hidden = true;
    $('#job-body').replaceChildren(h('p', { class: 'muted' }, 'Loading…'));
    setText($('#job-title'), `Job ${id}`);
    loadJob();
  }
  if (changed) $('#main').focus({ preventScroll: true });
  render();
}

function typing(ev) {
  const t = ev.target;
  return t && (t.isContentEditable || ['INPUT', 'SELECT', 'TEXTAREA'].includes(t.tagName));
}

document.addEventListener('keydown', (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || typing(ev) || $('#confirm').open) return;
  const pages = { 1: 'fleet', 2: 'queue', 3: 'jobs', 4: 'actions' };
  if (pages[ev.key]) {
    location.hash = `#/${pages[ev.key]}`;
    ev.preventDefault();
  } else if (ev.key === '/' && S.page === 'jobs') {
    $('#jobs-filter').elements.q.focus();
    ev.preventDefault();
  }
});

window.addEventListener('hashchange', route);
document.addEventListener('DOMContentLoaded', () => {
  $('#confirm').addEventListener('close', confirmClosed);
  $('#jobs-filter').addEventListener('input', scheduleJobs);
  $('#jobs-filter').addEventListener('submit', (ev) => { ev.preventDefault(); loadJobs(); });
  $('#submit-form').addEventListener('submit', submitTestJob);
  $('#act-cancel').addEventListener('click', (ev) => actOnId(ev, 'cancel'));
  $('#act-resubmit').addEventListener('click', (ev) => actOnId(ev, 'resubmit'));
  $('#act-form').addEventListener('submit', (ev) => actOnId(ev, 'cancel'));
  setInterval(() => { if (S.page === 'fleet' && S.live) renderFleet(); }, 5000);
  route();
  connect();
});
