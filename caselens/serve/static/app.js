// caselens case viewer: plain JavaScript, no libraries, no build step, nothing loaded from elsewhere.
// Every API call sends the token from sessionStorage; images are fetched with it and shown as blob: URLs.
'use strict';

const TOKEN_KEY = 'caselens-token';
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  collections: {},      // name -> info (items, encoder, facets, metadata_columns)
  current: '',          // case collection searched
  queryFile: null,      // the chosen image or DICOM file
  lastHits: [],
  viewing: null,        // {collection, id} in the viewer
  blobs: [],            // object URLs of the result grid (revoked on the next search)
};

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function status(message, isError = false) {
  const box = $('#status');
  box.textContent = message;
  box.classList.toggle('error', isError);
}

class ApiError extends Error {
  constructor(status, code, detail) {
    super(`${detail} (${code})`);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let body = {};
    try { body = await response.json(); } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, body.error || `http_${response.status}`, body.detail || response.statusText);
  }
  return options.raw ? response : response.json();
}

function reportError(err) {
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
    status(`${err.message}. Enter a valid API token above.`, true);
    $('#token').focus();
  } else {
    status(err.message || String(err), true);
  }
}

const enc = encodeURIComponent;
const itemPath = (collection, kind, id) => `/api/collections/${enc(collection)}/${kind}/${enc(id)}`;

async function imageUrl(collection, id, size) {
  const path = size ? `${itemPath(collection, 'thumbnails', id)}?size=${size}` : itemPath(collection, 'images', id);
  const response = await api(path, { raw: true });
  return URL.createObjectURL(await response.blob());
}

// ------------------------------------------------------------------ collections and filters
async function loadCollections() {
  const { collections } = await api('/api/collections');
  const infos = await Promise.all(collections.map((name) => api(`/api/collections/${enc(name)}`)));
  state.collections = {};
  infos.forEach((info) => { state.collections[info.name] = info; });
  const isImage = (info) => info.encoder.modalities.includes('image');
  const hasText = (info) => (info.facets.kind || []).some((f) => f.value === 'text');
  const cases = infos.filter(isImage);
  const knowledge = infos.filter(hasText);
  fillSelect($('#collection'), cases.map((i) => [i.name, `${i.name} (${i.items} items)`]));
  fillSelect($('#knowledge'), knowledge.map((i) => [i.name, `${i.name} (${i.items} passages)`]));
  if (!state.current || !state.collections[state.current]) state.current = cases.length ? cases[0].name : '';
  $('#collection').value = state.current;
  updateFilters();
  status(cases.length ? `${infos.length} collections; searching ${state.current}.` : 'No image collections on this server.');
}

function fillSelect(select, pairs, first) {
  select.replaceChildren();
  if (first) select.append(el('option', { value: '' , text: first }));
  for (const [value, text] of pairs) select.append(el('option', { value, text }));
}

function updateFilters() {
  const info = state.collections[state.current];
  const facets = (info && info.facets) || {};
  const choices = (name) => (facets[name] || []).map((f) => [String(f.value), `${f.value} (${f.count})`]);
  fillSelect($('#filter-label'), choices('label'), 'any');
  fillSelect($('#filter-modality'), choices('modality'), 'any');
  const other = ((info && info.metadata_columns) || []).filter((c) => !['label', 'modality'].includes(c));
  fillSelect($('#filter-column'), other.map((c) => [c, c]), 'none');
}

function searchOptions() {
  const filters = {};
  if ($('#filter-label').value) filters.label = $('#filter-label').value;
  if ($('#filter-modality').value) filters.modality = $('#filter-modality').value;
  const column = $('#filter-column').value;
  const value = $('#filter-value').value.trim();
  if (column && value) filters[column] = value;
  const k = Math.max(1, Math.min(200, parseInt($('#k').value, 10) || 12));
  return { k, filters, where: $('#where').value.trim() || null, excludeSame: $('#exclude-same').checked };
}

// ------------------------------------------------------------------ the query image
function chooseFile(file) {
  if (!file) return;
  state.queryFile = file;
  const preview = $('#query-preview');
  if (preview.src) URL.revokeObjectURL(preview.src);
  const isDicom = /\.(dcm|dicom)$/i.test(file.name) || file.type === 'application/dicom';
  if (isDicom) {
    preview.hidden = true;
    $('#drop-text').textContent = `DICOM file chosen (${Math.round(file.size / 1024)} KiB)`;
  } else {
    preview.src = URL.createObjectURL(file);
    preview.alt = 'the query image';
    preview.hidden = false;
    $('#drop-text').textContent = 'Query image chosen; drop or press Enter for another';
  }
  runSearch();
}

function setupDrop() {
  const drop = $('#drop');
  const input = $('#file');
  drop.addEventListener('click', () => input.click());
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); input.click(); }
  });
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    chooseFile(e.dataTransfer.files[0]);
  });
  input.addEventListener('change', () => chooseFile(input.files[0]));
}

// ------------------------------------------------------------------ search
async function runSearch(byId) {
  if (!state.current) { status('Choose a collection first.', true); return; }
  const opts = searchOptions();
  let result;
  try {
    if (byId) {
      status('Searching cases similar to the one shown…');
      result = await api(`/api/collections/${enc(state.current)}/search/item`, {
        method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ id: byId, k: opts.k, where: opts.where, filters: opts.filters,
                               exclude_same: opts.excludeSame ? 'patient_id' : null }),
      });
    } else {
      if (!state.queryFile) { status('Choose or drop a query image first.', true); $('#drop').focus(); return; }
      status('Searching…');
      const form = new FormData();
      form.append('image', state.queryFile);
      form.append('k', String(opts.k));
      if (opts.where) form.append('where', opts.where);
      if (Object.keys(opts.filters).length) form.append('filters', JSON.stringify(opts.filters));
      if (opts.excludeSame) form.append('exclude_same', 'patient_id');
      result = await api(`/api/collections/${enc(state.current)}/search/image`, { method: 'POST', body: form });
    }
  } catch (err) { reportError(err); return; }
  state.lastHits = result.hits;
  $('#results-meta').textContent = `${result.hits.length} of ${result.candidates} candidates, ${Math.round(result.milliseconds)} ms`;
  status(`${result.hits.length} similar cases.`);
  await renderGrid(result.collection, result.hits);
}

function provenanceText(hit) {
  const p = hit.provenance || {};
  const parts = [hit.source || p.file || ''];
  if (p.reader) parts.push(p.reader);
  if (p.window) parts.push(`window ${p.window}`);
  if (p.page !== undefined) parts.push(`page ${p.page}`);
  return parts.filter(Boolean).join(' · ');
}

async function renderGrid(collection, hits) {
  state.blobs.forEach((u) => URL.revokeObjectURL(u));
  state.blobs = [];
  const grid = $('#results');
  grid.replaceChildren();
  const cards = hits.map((hit) => {
    const modality = (hit.metadata || {}).modality;
    const img = el('img', { alt: `case ${hit.rank}${hit.label ? ', ' + hit.label : ''}`, class: 'thumb', loading: 'lazy' });
    const button = el('button', { type: 'button', class: 'card-button', 'data-id': hit.id,
                                  'aria-label': `Open case ${hit.rank}: ${hit.label || 'no label'}, score ${hit.score.toFixed(3)}`,
                                  onclick: () => openCase(collection, hit.id) },
      img,
      el('span', { class: 'score', text: hit.score.toFixed(3) }),
      el('span', { class: 'label', text: hit.label || '—' }),
      modality ? el('span', { class: 'modality', text: modality }) : null,
      el('span', { class: 'prov', text: provenanceText(hit) }));
    grid.append(el('li', { class: 'card' }, button));
    return [img, hit];
  });
  await Promise.all(cards.map(async ([img, hit]) => {
    try {
      const url = await imageUrl(collection, hit.id, 192);
      state.blobs.push(url);
      img.src = url;
    } catch (err) {
      img.replaceWith(el('span', { class: 'thumb none', text: hit.kind === 'text' ? 'text' : 'no image' }));
    }
  }));
}

// ------------------------------------------------------------------ the case viewer
async function openCase(collection, id) {
  const viewer = $('#viewer');
  let item;
  try { item = await api(itemPath(collection, 'items', id)); } catch (err) { reportError(err); return; }
  state.viewing = { collection, id };
  $('#viewer-title').textContent = `${item.label || (item.kind === 'text' ? 'Passage' : 'Case')} — ${collection}`;
  const img = $('#viewer-image');
  if (img.src) URL.revokeObjectURL(img.src);
  img.removeAttribute('src');
  img.hidden = true;
  $('#viewer-caption').textContent = item.id;
  const text = $('#viewer-text');
  text.hidden = !item.text;
  text.textContent = item.text || '';
  const body = $('#viewer-meta tbody');
  body.replaceChildren();
  const rows = [['label', item.label], ['kind', item.kind], ['source', item.source]];
  for (const [k, v] of Object.entries(item.metadata || {})) if (k !== 'label') rows.push([k, v]);
  for (const [k, v] of Object.entries(item.provenance || {})) rows.push([`provenance.${k}`, typeof v === 'object' ? JSON.stringify(v) : v]);
  for (const [k, v] of rows) {
    if (v === null || v === undefined || v === '') continue;
    body.append(el('tr', {}, el('th', { scope: 'row', text: k }), el('td', { text: String(v) })));
  }
  $('#viewer-similar').hidden = !(state.collections[collection] && collection === state.current);
  if (!viewer.open) viewer.showModal();
  $('#viewer-close').focus();
  try {
    img.src = await imageUrl(collection, id);
    img.alt = `image of ${item.label || 'the case'}`;
    img.hidden = false;
  } catch (err) {
    $('#viewer-caption').textContent = `${item.id} (no image: ${err.code || 'unavailable'})`;
  }
}

function setupViewer() {
  const viewer = $('#viewer');
  $('#viewer-close').addEventListener('click', () => viewer.close());
  viewer.addEventListener('click', (e) => { if (e.target === viewer) viewer.close(); });
  $('#viewer-similar').addEventListener('click', () => {
    const { id } = state.viewing || {};
    viewer.close();
    if (id) runSearch(id);
  });
  viewer.addEventListener('close', () => {
    const img = $('#viewer-image');
    if (img.src) URL.revokeObjectURL(img.src);
    img.removeAttribute('src');
    const back = state.viewing && document.querySelector(`.card-button[data-id="${CSS.escape(state.viewing.id)}"]`);
    if (back) back.focus();
  });
}

// ------------------------------------------------------------------ diagnosis
async function runDiagnose() {
  if (!state.current) return;
  const form = new FormData();
  if (state.queryFile) form.append('image', state.queryFile);
  else if (state.viewing) form.append('id', state.viewing.id);
  else { status('Choose a query image first.', true); return; }
  const knowledge = $('#knowledge').value;
  if (knowledge) form.append('knowledge', knowledge);
  status('Diagnosing…');
  let out;
  try {
    out = await api(`/api/collections/${enc(state.current)}/diagnose`, { method: 'POST', body: form });
  } catch (err) { reportError(err); return; }
  const body = $('#diagnosis-body');
  body.replaceChildren();
  const list = el('ul', { class: 'probs', 'aria-label': 'Label probabilities' });
  for (const { label, probability } of out.labels) {
    const pct = Math.round(probability * 100);
    list.append(el('li', {},
      el('span', { class: 'prob-label', text: label }),
      el('span', { class: 'bar', role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': pct,
                   'aria-label': `${label} probability` }, el('span', { class: 'fill', 'data-pct': pct })),
      el('span', { class: 'pct', text: `${pct}%` })));
  }
  body.append(list);
  list.querySelectorAll('.fill').forEach((f) => { f.style.width = `${f.dataset.pct}%`; });
  body.append(el('p', { class: out.abstained ? 'abstain' : 'hint',
    text: out.abstained ? `Abstained: no label reaches ${Math.round(out.threshold * 100)}%.`
                        : `Top label above the ${Math.round(out.threshold * 100)}% threshold.` }));
  if (out.supporting.length) {
    const sup = el('ul', { class: 'supporting', 'aria-label': 'Supporting cases' });
    for (const hit of out.supporting.slice(0, 8)) {
      sup.append(el('li', {}, el('button', { type: 'button', class: 'link', onclick: () => openCase(state.current, hit.id),
        text: `${hit.label || '—'} (${hit.score.toFixed(3)})` })));
    }
    body.append(el('h3', { text: 'Supporting cases' }), sup);
  }
  if (out.passages.length) {
    const ps = el('ul', { class: 'passages' });
    for (const p of out.passages) ps.append(el('li', {}, el('strong', { text: `[${p.key}] ` }), p.text.slice(0, 240)));
    body.append(el('h3', { text: 'Passages' }), ps);
  }
  status('Diagnosis ready.');
}

// ------------------------------------------------------------------ ask
function citationTarget(entry) {
  // a cited case or page opens in the viewer (its image and metadata); a passage shows its text
  return () => openCase(entry.collection, entry.id);
}

async function runAsk(event) {
  event.preventDefault();
  const question = $('#question').value.trim();
  const knowledge = $('#knowledge').value;
  if (!question) { status('Type a question.', true); $('#question').focus(); return; }
  if (!knowledge) { status('No knowledge collection on this server.', true); return; }
  const form = new FormData();
  form.append('question', question);
  form.append('knowledge', knowledge);
  if ($('#ask-with-image').checked && state.queryFile && state.current) {
    form.append('image', state.queryFile);
    form.append('cases', state.current);
  }
  status('Retrieving and answering…');
  let out;
  try { out = await api('/api/ask', { method: 'POST', body: form }); } catch (err) { reportError(err); return; }
  const box = $('#answer');
  box.replaceChildren();
  const byKey = Object.fromEntries(out.context.map((c) => [c.key, c]));
  const answer = el('p', { class: out.abstained ? 'abstain answer' : 'answer' });
  // the answer's [key] citations become links to the cited case, page or passage
  const parts = out.answer.split(/(\[[^\[\]\s]+\])/g);
  for (const part of parts) {
    const key = part.startsWith('[') && part.endsWith(']') ? part.slice(1, -1) : null;
    if (key && byKey[key]) {
      answer.append(el('a', { href: '#', class: 'citation', 'data-key': key,
        onclick: (e) => { e.preventDefault(); citationTarget(byKey[key])(); } }, `[${key}]`));
    } else {
      answer.append(part);
    }
  }
  box.append(el('p', { class: 'hint', text: `Answered by ${out.generator}` }), answer);
  const sources = el('ol', { class: 'sources', 'aria-label': 'Sources' });
  for (const c of out.context) {
    const cited = out.grounding.cited.includes(c.key);
    sources.append(el('li', { class: cited ? 'cited' : '' },
      el('a', { href: '#', class: 'citation', 'data-key': c.key,
                onclick: (e) => { e.preventDefault(); citationTarget(c)(); } }, `[${c.key}]`),
      ` ${c.collection}, score ${c.score.toFixed(3)}${cited ? ', cited' : ''}: `,
      c.text.length > 200 ? c.text.slice(0, 200) + '…' : c.text));
  }
  box.append(el('h3', { text: 'Sources' }), sources);
  status(out.abstained ? `The answer abstained (${out.abstain_reason}).` : 'Answer ready.');
}

// ------------------------------------------------------------------ start
function setupToken() {
  $('#token').value = state.token;
  $('#token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    state.token = $('#token').value.trim();
    if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    loadCollections().catch(reportError);
  });
}

document.addEventListener('DOMContentLoaded', () => {
  setupToken();
  setupDrop();
  setupViewer();
  $('#collection').addEventListener('change', () => { state.current = $('#collection').value; updateFilters(); });
  $('#search-form').addEventListener('submit', (e) => { e.preventDefault(); runSearch(); });
  for (const id of ['#filter-label', '#filter-modality']) {
    $(id).addEventListener('change', () => { if (state.queryFile) runSearch(); });
  }
  $('#diagnose').addEventListener('click', runDiagnose);
  $('#ask-form').addEventListener('submit', runAsk);
  $('#question').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) $('#ask-form').requestSubmit();
  });
  loadCollections().catch(reportError);
});
