// relayd web terminal: sign in with a bearer token, list VMs, open a console over
// the relayd.console.v1 WebSocket (docs/protocol.md) in xterm.js.
//
// Offsets: every console byte has an absolute offset. hello.offset is the offset
// of the first live byte and hello.replay the number of replayed bytes before it,
// so the next byte expected is hello.offset - hello.replay plus every byte
// received since; an output_gap notice moves it past the skipped bytes.
// Reconnecting with ?from=<that offset> resumes with nothing lost or repeated.

import { installCspStyleShim } from './cspstyle.js';
import { Terminal } from './xterm.mjs';
import { FitAddon } from './addon-fit.mjs';

installCspStyleShim();

const TOKEN_KEY = 'relayd.token';
const SCREEN_READER_KEY = 'relayd.screenReaderMode';
const SUBPROTOCOL = 'relayd.console.v1';
const VM_REFRESH_MS = 15000;
const PROGRESS_MS = 200;
const QUEUED_SHOWN_BYTES = 64; // typing never queues this much; a paste does

const CLOSE_WORDS = {
  1000: 'The console session was closed.',
  1001: 'The gateway is shutting down.',
  1006: 'The connection to the gateway was lost.',
  1011: 'The gateway hit an internal error.',
  4001: 'Your session was taken over.',
  4003: 'Forbidden: you may not use this console.',
  4004: 'Unknown VM: it does not exist or you hold no role on it.',
  4008: 'Closed after being idle too long.',
  4009: 'The serial console is disabled for this VM.',
  4029: 'Session limit reached: close another console and reconnect.',
};

// Linux magic SysRq keys (Documentation/admin-guide/sysrq.rst).
const SYSRQ_KEYS = [
  ['h', 'help'],
  ['s', 'sync filesystems'],
  ['u', 'remount filesystems read-only'],
  ['b', 'reboot', 'reboots VM at once, without syncing or unmounting its filesystems'],
  ['o', 'power off', 'powers VM off at once'],
  ['c', 'crash (panic)', 'crashes the kernel of VM (a panic, and a crash dump if configured)'],
  ['e', 'terminate all tasks', 'sends SIGTERM to every process on VM except init'],
  ['i', 'kill all tasks', 'sends SIGKILL to every process on VM except init'],
  ['f', 'OOM kill', 'makes the OOM killer of VM kill a process'],
  ['k', 'SAK', 'kills every program on the current console of VM'],
  ['m', 'show memory'],
  ['t', 'show task states'],
  ['w', 'show blocked tasks'],
  ['l', 'backtrace all CPUs'],
  ['p', 'show registers'],
  ['d', 'show held locks'],
  ['q', 'show timers'],
  ['j', 'thaw filesystems'],
  ['n', 'nice real-time tasks'],
  ['r', 'keyboard to XLATE'],
  ['z', 'dump ftrace buffer'],
  ...Array.from({ length: 10 }, (_, n) => [String(n), `log level ${n}`]),
];
const DESTRUCTIVE_SYSRQ = new Set(SYSRQ_KEYS.filter((entry) => entry.length === 3).map(([key]) => key));

const $ = (id) => document.getElementById(id);
const encoder = new TextEncoder();

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  vms: new Map(),
  vm: null, // the open VM's id
  wantMode: 'interactive',
  ws: null,
  generation: 0, // bumps per connection: events of an old socket are ignored
  connected: false,
  role: null,
  port: null,
  limits: null,
  offset: null, // absolute offset of the next console byte
  firstOffset: null,
  written: 0,
  lineBusyUntil: 0, // performance.now() when relayd's pacing should have sent all input
  pasteTotal: 0,
  progressTimer: null,
  refreshTimer: null,
  resizeTimer: null,
};

let term = null;
let fit = null;

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// -- HTTP API -------------------------------------------------------------------------

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  const init = { method, headers, cache: 'no-store', credentials: 'omit' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, 'network', `the gateway could not be reached (${err.message})`);
  }
  if (!response.ok) {
    let code = `http_${response.status}`;
    let message = response.statusText || `HTTP ${response.status}`;
    try {
      const json = await response.json();
      code = json.error || code;
      message = json.message || message;
    } catch {
      // not JSON: keep the status text
    }
    throw new ApiError(response.status, code, message);
  }
  return response;
}

function vmPath(vm, rest) {
  return `/v1/vms/${encodeURIComponent(vm)}${rest}`;
}

// -- sign-in ----------------------------------------------------------------------------

function cleanToken(raw) {
  return raw.trim().replace(/^token:\s*/i, '').replace(/^bearer\s+/i, '').trim();
}

function tokenSubject(token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, '=')));
    return typeof claims.sub === 'string' ? claims.sub : null;
  } catch {
    return null;
  }
}

async function onSignIn(event) {
  event.preventDefault();
  const token = cleanToken($('token').value);
  const error = $('signin-error');
  if (!token) {
    error.textContent = 'Paste a token first.';
    $('token').focus();
    return;
  }
  error.textContent = 'Checking the token…';
  state.token = token;
  try {
    const vms = await fetchVms();
    sessionStorage.setItem(TOKEN_KEY, token);
    $('token').value = '';
    error.textContent = '';
    showVmList(vms);
    $('vms-title').focus();
  } catch (err) {
    state.token = null;
    error.textContent =
      err.status === 401 ? `The gateway refused this token: ${err.message}.` : `Sign-in failed: ${err.message}.`;
    $('token').focus();
  }
}

function signOut(message) {
  disconnect();
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  stopRefresh();
  $('console').hidden = true;
  $('vms').hidden = true;
  $('who').hidden = true;
  $('sign-out').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message || '';
  document.title = 'relayd serial console';
  $('token').focus();
}

// -- the VM list ------------------------------------------------------------------------

async function fetchVms() {
  const response = await api('GET', '/v1/vms');
  const { vms } = await response.json();
  state.vms = new Map(vms.map((vm) => [vm.id, vm]));
  return vms;
}

function showVmList(vms) {
  $('signin').hidden = true;
  $('console').hidden = true;
  $('vms').hidden = false;
  const sub = tokenSubject(state.token);
  $('who').textContent = sub ? `Signed in as ${sub}` : 'Signed in';
  $('who').hidden = false;
  $('sign-out').hidden = false;
  document.title = 'relayd: virtual machines';
  renderVms(vms);
  startRefresh();
}

function cell(row, text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

function renderVms(vms) {
  const body = $('vm-rows');
  const focusedId = document.activeElement?.dataset?.vmAction;
  body.replaceChildren();
  for (const vm of vms) {
    const row = document.createElement('tr');
    const name = document.createElement('th');
    name.scope = 'row';
    name.textContent = vm.id;
    row.append(name);
    cell(row, vm.scale_set ? `${vm.subscription} / ${vm.scale_set}` : vm.subscription);
    cell(row, vm.enabled ? 'enabled' : 'disabled', vm.enabled ? 'state-on' : 'state-off');
    cell(row, vm.port === 'up' ? 'up' : 'down', vm.port === 'up' ? 'state-up' : 'state-down');
    cell(row, vm.writer_attached ? 'attached' : 'none');
    cell(row, vm.role);
    const actions = cell(row, '', 'actions');
    const canWrite = vm.role !== 'reader';
    actions.append(
      actionButton(vm, 'interactive', canWrite ? 'Open console' : 'Open console (read-only)'),
      actionButton(vm, 'spectate', 'Spectate'),
    );
    body.append(row);
  }
  $('vms-status').textContent = vms.length
    ? `${vms.length} VM${vms.length === 1 ? '' : 's'}, updated ${new Date().toLocaleTimeString()}.`
    : 'You hold no role on any VM of this gateway.';
  if (focusedId) body.querySelector(`[data-vm-action="${CSS.escape(focusedId)}"]`)?.focus();
}

function actionButton(vm, mode, label) {
  const button = document.createElement('button');
  button.type = 'button';
  button.textContent = label;
  button.className = mode === 'interactive' ? 'primary' : '';
  button.dataset.vmAction = `${mode}:${vm.id}`;
  button.setAttribute('aria-label', `${label}: ${vm.id}`);
  button.disabled = !vm.enabled;
  button.addEventListener('click', () => openConsole(vm.id, mode));
  return button;
}

async function refreshVms({ quiet = false } = {}) {
  try {
    renderVms(await fetchVms());
  } catch (err) {
    if (err.status === 401) {
      signOut(`Signed out: ${err.message}.`);
    } else if (!quiet) {
      $('vms-status').textContent = `Could not list VMs: ${err.message}.`;
    }
  }
}

function startRefresh() {
  stopRefresh();
  state.refreshTimer = setInterval(() => {
    if (!$('vms').hidden && !document.hidden) refreshVms({ quiet: true });
  }, VM_REFRESH_MS);
}

function stopRefresh() {
  clearInterval(state.refreshTimer);
  state.refreshTimer = null;
}

// -- banner and announcements --------------------------------------------------------------

function showBanner(kind, text, actions = []) {
  const banner = $('banner');
  banner.className = `banner ${kind}`;
  $('banner-text').textContent = text;
  const holder = $('banner-actions');
  holder.replaceChildren(
    ...actions.map(([label, handler]) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = label;
      button.addEventListener('click', () => {
        hideBanner();
        handler();
      });
      return button;
    }),
  );
  banner.hidden = false;
}

function hideBanner() {
  const banner = $('banner');
  const hadFocus = banner.contains(document.activeElement);
  banner.hidden = true;
  if (hadFocus) (term && !$('console').hidden ? term : $('main')).focus();
}

function setStatus(id, text, className = '') {
  const el = $(id);
  el.textContent = text;
  el.className = className;
}

// -- the console ----------------------------------------------------------------------------

function ensureTerminal() {
  if (term) return;
  term = new Terminal({
    cursorBlink: true,
    fontFamily: '"DejaVu Sans Mono", "Liberation Mono", ui-monospace, Menlo, Consolas, monospace',
    fontSize: 15,
    scrollback: 10000,
    screenReaderMode: localStorage.getItem(SCREEN_READER_KEY) === 'true',
    theme: { background: '#111418', foreground: '#e8e8e8', cursor: '#f0f0f0' },
  });
  fit = new FitAddon();
  term.loadAddon(fit);
  term.open($('terminal'));
  term.attachCustomKeyEventHandler(onTerminalKey);
  term.onData((data) => sendInput(encoder.encode(data)));
  term.onBinary((data) => sendInput(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
  term.onResize(({ cols, rows }) => {
    showSize();
    clearTimeout(state.resizeTimer);
    state.resizeTimer = setTimeout(() => sendControl({ type: 'resize', cols, rows }), 150);
  });
  new ResizeObserver(() => fitTerminal()).observe($('terminal'));
  updateScreenReaderButton();
}

function fitTerminal() {
  if (!term || $('console').hidden) return;
  try {
    fit.fit();
  } catch {
    // not laid out yet
  }
  showSize();
}

function showSize() {
  if (term) setStatus('st-size', `Size ${term.cols}×${term.rows}`);
}

function openConsole(vm, mode) {
  stopRefresh();
  hideBanner();
  disconnect();
  state.vm = vm;
  state.wantMode = mode;
  state.offset = null;
  state.firstOffset = null;
  state.written = 0;
  $('vms').hidden = true;
  $('console').hidden = false;
  $('console-title').textContent = `Console of ${vm}`;
  document.title = `relayd: ${vm}`;
  ensureTerminal();
  term.reset();
  fitTerminal();
  updateConsoleData();
  for (const id of ['st-port', 'st-role', 'st-input', 'st-gap']) setStatus(id, '');
  setModeButton(mode === 'interactive' ? 'spectate' : 'interactive');
  $('btn-mode').disabled = false;
  connect();
  term.focus();
}

async function backToList() {
  disconnect();
  const vm = state.vm;
  state.vm = null;
  hideBanner();
  $('console').hidden = true;
  $('vms').hidden = false;
  document.title = 'relayd: virtual machines';
  startRefresh();
  await refreshVms();
  const button = document.querySelector(`[data-vm-action="interactive:${CSS.escape(vm || '')}"]`);
  (button && !button.disabled ? button : $('vms-title')).focus();
}

function updateConsoleData() {
  const data = $('console').dataset;
  data.role = state.role || '';
  data.offset = String(state.offset ?? 0);
  data.firstOffset = String(state.firstOffset ?? 0);
  data.written = String(state.written);
}

function setConnState(text, dataState, className = '') {
  setStatus('st-conn', text, className);
  $('console').dataset.state = dataState;
}

async function connect() {
  const generation = ++state.generation;
  const vm = state.vm;
  const mode = state.wantMode;
  setConnState(`Connecting to ${vm}…`, 'connecting');
  let ticket;
  try {
    const response = await api('POST', vmPath(vm, '/console/tickets'), { mode });
    ticket = (await response.json()).ticket;
  } catch (err) {
    if (generation !== state.generation) return;
    setConnState('Not connected', 'closed', 'warn');
    if (err.status === 401) {
      signOut(`Signed out: ${err.message}.`);
      return;
    }
    showBanner('error', `Could not open the console of ${vm}: ${err.message}.`, [['Reconnect', reconnect]]);
    return;
  }
  if (generation !== state.generation) return;
  const query = new URLSearchParams({ ticket });
  if (state.offset !== null) query.set('from', String(state.offset));
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${scheme}//${location.host}${vmPath(vm, '/console')}?${query}`, SUBPROTOCOL);
  ws.binaryType = 'arraybuffer';
  state.ws = ws;
  state.connected = false;
  ws.addEventListener('open', () => {
    if (generation === state.generation) state.connected = true;
  });
  ws.addEventListener('message', (event) => {
    if (generation === state.generation) onMessage(event.data);
  });
  ws.addEventListener('close', (event) => {
    if (generation === state.generation) onClose(event);
  });
}

// Closes the socket on purpose: bumping the generation mutes its close event.
function disconnect() {
  state.generation += 1;
  if (state.ws) {
    try {
      state.ws.close(1000, 'closed by the user');
    } catch {
      // already closing
    }
  }
  state.ws = null;
  state.connected = false;
  state.role = null;
  stopProgress();
}

function reconnect() {
  if (!state.vm) return;
  hideBanner();
  disconnect();
  connect();
  term.focus();
}

function switchMode() {
  state.wantMode = $('btn-mode').dataset.mode;
  reconnect();
}

function setModeButton(mode) {
  const button = $('btn-mode');
  button.dataset.mode = mode;
  button.textContent = mode === 'spectate' ? 'Spectate' : 'Take over';
}

function onMessage(data) {
  if (data instanceof ArrayBuffer) {
    const bytes = new Uint8Array(data);
    term.write(bytes);
    state.offset += bytes.length;
    state.written += bytes.length;
    updateConsoleData();
    return;
  }
  let message;
  try {
    message = JSON.parse(data);
  } catch {
    return;
  }
  if (message.type === 'hello') onHello(message);
  else if (message.type === 'notice') onNotice(message);
  else if (message.type === 'error') onError(message);
}

function onHello(hello) {
  const start = hello.offset - hello.replay;
  state.offset = start;
  if (state.firstOffset === null) state.firstOffset = start;
  state.role = hello.role;
  state.limits = hello.limits;
  state.lineBusyUntil = 0;
  setPort(hello.port || 'up');
  setConnState(`Connected to ${hello.vm}`, 'open', 'up');
  setStatus('st-input', '');
  setStatus('st-gap', '');
  showRole();
  updateConsoleData();
  if (term) sendControl({ type: 'resize', cols: term.cols, rows: term.rows });
  if (hello.previous_session_logged_out === false) {
    setStatus('st-gap', 'The previous writer left the guest logged in.');
  }
}

function showRole() {
  const vm = state.vms.get(state.vm);
  const reader = vm?.role === 'reader';
  if (state.role === 'writer') {
    setStatus('st-role', 'Role: writer (your keys reach the console)');
  } else {
    const why = reader ? 'your role is reader' : 'Take over to type';
    setStatus('st-role', `Role: spectator (read-only; ${why})`, 'warn');
  }
  $('console').dataset.role = state.role || '';
  setModeButton(state.role === 'writer' ? 'spectate' : 'interactive');
  $('btn-mode').disabled = state.role !== 'writer' && reader;
  updateToolbar();
}

function setPort(port) {
  state.port = port;
  setStatus('st-port', `Serial port ${port}`, port === 'up' ? 'up' : 'down');
}

function updateToolbar() {
  const writer = state.role === 'writer';
  for (const id of ['btn-break', 'btn-sysrq', 'btn-stty', 'sysrq-key']) $(id).disabled = !writer;
  // Reset and NMI run the VM's hypervisor hooks: owners only (the gateway checks too).
  $('owner-tools').hidden = state.vms.get(state.vm)?.role !== 'owner';
}

const HOOKS = {
  reset: 'resets VM at once, like pressing its reset button',
  nmi: 'sends VM a non-maskable interrupt (a Linux guest may panic and dump)',
};

function requestHook(name) {
  $('hook-confirm-text').textContent =
    `${name === 'reset' ? 'Reset' : 'NMI'}: this ${HOOKS[name].replace('VM', state.vm)}.`;
  const dialog = $('hook-confirm');
  dialog.dataset.hook = name;
  dialog.returnValue = '';
  dialog.showModal();
}

function onNotice(notice) {
  switch (notice.event) {
    case 'port_down':
      setPort('down');
      showBanner('warning', `The serial port of ${state.vm} is down; relayd keeps trying to reopen it.`);
      break;
    case 'port_up':
      setPort('up');
      hideBanner();
      break;
    case 'writer_changed':
      if (notice.you === 'evicted') {
        showBanner('error', `Taken over by ${notice.by}.`);
      } else {
        setStatus('st-gap', notice.writer ? `Writer now: ${notice.writer}` : 'No writer attached');
      }
      break;
    case 'demoted':
      state.role = 'spectator';
      showRole();
      showBanner('warning', `${notice.by} took over the console: you are now spectating (read-only).`, [
        ['Take over again', switchMode],
      ]);
      break;
    case 'output_gap': {
      state.offset = notice.last + 1;
      const skipped = `${notice.bytes} bytes of output skipped (offsets ${notice.first}–${notice.last})`;
      setStatus('st-gap', `Output gap: ${skipped}; Download log may still hold them.`, 'warn');
      term.write(`\r\n\x1b[7m[relayd: ${skipped}]\x1b[0m\r\n`);
      updateConsoleData();
      break;
    }
    case 'idle_warning':
      showBanner('warning', `Idle: this session closes in ${Math.round(notice.closes_in)} s unless you type.`);
      break;
    case 'shutting_down':
      showBanner('warning', `The gateway is shutting down; this session closes in ${notice.closes_in} s.`);
      break;
    case 'break_failed':
      showBanner('error', `BREAK failed: ${notice.message}`);
      break;
    case 'hook_result':
      setStatus('st-gap', `${notice.hook}: ${notice.ok ? 'done' : `failed (${notice.message || notice.status})`}`);
      break;
    case 'hook_ran':
      setStatus('st-gap', `${notice.hook} was run by ${notice.by}`);
      break;
    default:
      break;
  }
}

function onError(error) {
  switch (error.code) {
    case 'read_only':
      setStatus('st-input', 'Read-only: spectators cannot type. Take over to type.', 'warn');
      break;
    case 'paste_too_long':
      showBanner('error', `Paste refused: ${error.message}.`);
      break;
    case 'rate_limited':
      setStatus('st-input', `Throttled: ${error.message}`, 'warn');
      break;
    case 'port_down':
      setStatus('st-input', 'The serial port is down: input was not sent.', 'warn');
      break;
    case 'unsupported':
      showBanner('error', `Not supported on this VM: ${error.message}`);
      break;
    default:
      showBanner('error', `${error.code}: ${error.message}`);
  }
}

function onClose(event) {
  const wasOpen = state.connected;
  state.ws = null;
  state.connected = false;
  state.role = null;
  stopProgress();
  updateToolbar();
  $('console').dataset.closeCode = String(event.code);
  $('console').dataset.role = '';
  let words = CLOSE_WORDS[event.code] || `The session closed (code ${event.code}).`;
  if (event.code === 4001 && event.reason) {
    words = `${event.reason.charAt(0).toUpperCase()}${event.reason.slice(1)}. You are disconnected.`;
  } else if (event.reason && event.code !== 4001) {
    words = `${words} (${event.reason})`;
  }
  if (!wasOpen && event.code === 1006) {
    words =
      'The gateway refused the console connection (the ticket may have expired, the session limit may be ' +
      'reached, or the VM has a writer and does not allow takeover).';
  }
  setConnState(`Disconnected (${event.code})`, 'closed', 'warn');
  setStatus('st-role', '');
  const actions = [['Reconnect', reconnect]];
  if (event.code === 4001) {
    actions.splice(0, 1, ['Take over again', () => ((state.wantMode = 'interactive'), reconnect())]);
    actions.push(['Spectate', () => ((state.wantMode = 'spectate'), reconnect())]);
  }
  showBanner(event.code === 4001 || event.code >= 4003 ? 'error' : 'warning', words, actions);
}

// -- input ------------------------------------------------------------------------------------

function sendControl(message) {
  if (state.ws && state.connected) state.ws.send(JSON.stringify(message));
}

function sendInput(bytes) {
  if (!bytes.length) return;
  if (!state.ws || !state.connected) {
    setStatus('st-input', 'Not connected: keys were not sent. Use Reconnect.', 'warn');
    return;
  }
  if (state.role !== 'writer') {
    setStatus('st-input', 'Read-only: spectators cannot type. Take over to type.', 'warn');
    return;
  }
  if (!$('banner').hidden && $('banner-text').textContent.startsWith('Idle:')) hideBanner();
  // relayd refuses a message over max_paste_bytes whole; larger pastes go as several.
  const max = state.limits?.max_paste_bytes || 65536;
  for (let i = 0; i < bytes.length; i += max) state.ws.send(bytes.subarray(i, i + max));
  trackPacing(bytes.length);
}

// relayd writes input at limits.input_bytes_per_s; estimate what is still queued.
function trackPacing(n) {
  const rate = state.limits?.input_bytes_per_s;
  if (!rate) return;
  const now = performance.now();
  const wasQueued = queuedBytes(now);
  state.lineBusyUntil = Math.max(state.lineBusyUntil, now) + (n / rate) * 1000;
  state.pasteTotal = wasQueued > 0 ? state.pasteTotal + n : n;
  if (queuedBytes(now) >= QUEUED_SHOWN_BYTES && !state.progressTimer) {
    // Announced once; the progress itself is outside the live region, so not read every tick.
    setStatus('st-input', `Pasting ${state.pasteTotal} bytes at ${rate} bytes/s…`);
    $('st-paste').hidden = false;
    state.progressTimer = setInterval(showProgress, PROGRESS_MS);
    showProgress();
  }
}

function queuedBytes(now = performance.now()) {
  const rate = state.limits?.input_bytes_per_s || 0;
  return Math.max(0, Math.ceil(((state.lineBusyUntil - now) / 1000) * rate));
}

function showProgress() {
  const queued = queuedBytes();
  if (queued <= 0) {
    const total = state.pasteTotal;
    stopProgress();
    setStatus('st-input', `Pasted ${total} bytes.`);
    return;
  }
  const total = Math.max(state.pasteTotal, queued);
  const seconds = Math.ceil(queued / state.limits.input_bytes_per_s);
  $('paste-progress').max = total;
  $('paste-progress').value = total - queued;
  $('st-paste-text').textContent = `pasting… ${queued} bytes queued (about ${seconds} s)`;
}

function stopProgress() {
  clearInterval(state.progressTimer);
  state.progressTimer = null;
  $('st-paste').hidden = true;
}

async function copySelection() {
  const text = term.getSelection();
  if (!text) {
    setStatus('st-input', 'Nothing selected to copy.');
    return;
  }
  try {
    await navigator.clipboard.writeText(text);
    setStatus('st-input', `Copied ${text.length} characters.`);
  } catch {
    setStatus('st-input', 'The browser refused clipboard access; use its Copy menu instead.', 'warn');
  }
}

async function pasteClipboard() {
  let text;
  try {
    text = await navigator.clipboard.readText();
  } catch {
    setStatus('st-input', "The browser refused clipboard access; use its Paste menu (right-click) instead.", 'warn');
    return;
  }
  if (text) term.paste(text); // line endings and bracketed paste as xterm.js does them
}

function focusToolbar() {
  const first = [...$('toolbar').querySelectorAll('button, select')].find((el) => !el.disabled);
  (first || $('back')).focus();
}

function onTerminalKey(event) {
  if (event.type !== 'keydown') return true;
  if (event.ctrlKey && !event.altKey && event.key === 'F6') {
    event.preventDefault();
    focusToolbar();
    return false;
  }
  if (event.ctrlKey && event.shiftKey && !event.altKey && (event.code === 'KeyC' || event.code === 'KeyV')) {
    event.preventDefault();
    if (event.code === 'KeyC') copySelection();
    else pasteClipboard();
    return false;
  }
  return true;
}

// -- toolbar actions -----------------------------------------------------------------------------

function sendBreak() {
  sendControl({ type: 'break' });
  setStatus('st-input', 'BREAK sent: on Linux the next key typed within 5 s is a SysRq command.');
  term.focus();
}

function sysrqLabel(key) {
  return SYSRQ_KEYS.find(([k]) => k === key)?.[1] || key;
}

function requestSysrq() {
  const key = $('sysrq-key').value;
  if (!DESTRUCTIVE_SYSRQ.has(key)) {
    sendSysrq(key);
    return;
  }
  const what = SYSRQ_KEYS.find(([k]) => k === key)[2].replace('VM', state.vm);
  $('sysrq-confirm-text').textContent = `SysRq ${key} ${what}. Unsaved work in the guest may be lost.`;
  const dialog = $('sysrq-confirm');
  dialog.dataset.key = key;
  dialog.returnValue = '';
  dialog.showModal();
}

function sendSysrq(key) {
  sendControl({ type: 'sysrq', key });
  setStatus('st-input', `SysRq ${key} (${sysrqLabel(key)}) sent.`);
}

function applySizeToGuest() {
  if (!term) return;
  sendInput(encoder.encode(`stty rows ${term.rows} cols ${term.cols}\r`));
  term.focus();
}

async function downloadLog() {
  const vm = state.vm;
  setStatus('st-input', 'Downloading the console log…');
  try {
    const response = await api('GET', vmPath(vm, '/console-log'));
    const blob = await response.blob();
    const start = response.headers.get('Relayd-Log-Start') || '0';
    const end = response.headers.get('Relayd-Log-End') || String(blob.size);
    const url = URL.createObjectURL(blob);
    const link = document.createElement('a');
    link.href = url;
    link.download = `${vm}-console-${start}-${end}.log`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    setStatus('st-input', `Console log downloaded (${blob.size} bytes, offsets ${start}–${end}).`);
  } catch (err) {
    setStatus('st-input', `Could not download the log: ${err.message}.`, 'warn');
  }
}

function toggleScreenReaderMode() {
  ensureTerminal();
  const on = !term.options.screenReaderMode;
  term.options.screenReaderMode = on;
  localStorage.setItem(SCREEN_READER_KEY, String(on));
  updateScreenReaderButton();
}

function updateScreenReaderButton() {
  const on = Boolean(term?.options.screenReaderMode ?? localStorage.getItem(SCREEN_READER_KEY) === 'true');
  $('btn-sr').setAttribute('aria-pressed', String(on));
}

// -- wiring ----------------------------------------------------------------------------------

function init() {
  const select = $('sysrq-key');
  for (const [key, label] of SYSRQ_KEYS) {
    const option = document.createElement('option');
    option.value = key;
    option.textContent = `${key}: ${label}${DESTRUCTIVE_SYSRQ.has(key) ? ' (asks first)' : ''}`;
    select.append(option);
  }
  $('signin-form').addEventListener('submit', onSignIn);
  $('sign-out').addEventListener('click', () => signOut('Signed out.'));
  $('vms-refresh').addEventListener('click', () => refreshVms());
  $('back').addEventListener('click', backToList);
  $('banner-dismiss').addEventListener('click', hideBanner);
  $('btn-break').addEventListener('click', sendBreak);
  $('btn-reset').addEventListener('click', () => requestHook('reset'));
  $('btn-nmi').addEventListener('click', () => requestHook('nmi'));
  const hookDialog = $('hook-confirm');
  $('hook-cancel').addEventListener('click', () => hookDialog.close('cancel'));
  $('hook-run').addEventListener('click', () => hookDialog.close('run'));
  hookDialog.addEventListener('close', () => {
    if (hookDialog.returnValue !== 'run') return;
    sendControl({ type: hookDialog.dataset.hook });
    setStatus('st-input', `${hookDialog.dataset.hook} requested.`);
  });
  $('btn-sysrq').addEventListener('click', requestSysrq);
  $('btn-mode').addEventListener('click', switchMode);
  $('btn-reconnect').addEventListener('click', reconnect);
  $('btn-stty').addEventListener('click', applySizeToGuest);
  $('btn-log').addEventListener('click', downloadLog);
  $('btn-sr').addEventListener('click', toggleScreenReaderMode);
  const dialog = $('sysrq-confirm');
  $('sysrq-cancel').addEventListener('click', () => dialog.close('cancel'));
  $('sysrq-send').addEventListener('click', () => dialog.close('send'));
  dialog.addEventListener('close', () => {
    if (dialog.returnValue === 'send') sendSysrq(dialog.dataset.key);
    $('btn-sysrq').focus();
  });
  // Ctrl+F6 from anywhere on the console page goes to the terminal (and, inside it, out).
  document.addEventListener('keydown', (event) => {
    if (event.ctrlKey && event.key === 'F6' && !event.defaultPrevented && term && !$('console').hidden) {
      event.preventDefault();
      term.focus();
    }
  });
  updateToolbar();
  if (state.token) {
    fetchVms()
      .then(showVmList)
      .catch((err) => signOut(err.status === 401 ? `Signed out: ${err.message}.` : `Could not list VMs: ${err.message}.`));
  } else {
    signOut('');
  }
}

init();
