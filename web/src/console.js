// The console view: xterm.js, one WebSocket at a time, the toolbar and the status line.
// What the messages mean (offsets, role, limits, close words) is protocol.js's; this
// draws it and does the I/O. app.js owns sign-in and the VM list and passes in what the
// console needs of it (see initConsole).

import { Terminal } from './xterm.mjs';
import { FitAddon } from './addon-fit.mjs';
import { CLOSE_NORMAL } from './protocol-constants.js';
import {
  SUBPROTOCOL,
  ConsoleStream,
  PasteMeter,
  closeMessage,
  consoleUrl,
  demotedMessage,
  inputMessages,
  vmPath,
} from './protocol.js';
import { DESTRUCTIVE_SYSRQ, SYSRQ_KEYS, sysrqLabel, sysrqWarning } from './sysrq.js';
import { $, hideBanner, setFocusHome, setStatus, showBanner } from './ui.js';

const SCREEN_READER_KEY = 'relayd.screenReaderMode';
const PROGRESS_MS = 200;
const QUEUED_SHOWN_BYTES = 64; // typing never queues this much; a paste does

const HOOKS = {
  reset: 'resets VM at once, like pressing its reset button',
  nmi: 'sends VM a non-maskable interrupt (a Linux guest may panic and dump)',
};

const encoder = new TextEncoder();

// What app.js provides: api(method, path, body), vmRole(vm), signOut(message), showList(vm).
let owner = null;

const stream = new ConsoleStream();
const paste = new PasteMeter();
const view = {
  vm: null, // the open VM's id
  wantMode: 'interactive',
  ws: null,
  generation: 0, // bumps per connection: events of an old socket are ignored
  connected: false,
  progressTimer: null,
  resizeTimer: null,
};

let term = null;
let fit = null;

// -- the terminal -------------------------------------------------------------------------

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
    clearTimeout(view.resizeTimer);
    view.resizeTimer = setTimeout(() => sendControl({ type: 'resize', cols, rows }), 150);
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

// -- opening and closing --------------------------------------------------------------------

/** Show the console of `vm` and connect in `mode` ('interactive' or 'spectate'). */
export function openConsole(vm, mode) {
  hideBanner();
  disconnect();
  view.vm = vm;
  view.wantMode = mode;
  stream.reset();
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

function backToList() {
  disconnect();
  const vm = view.vm;
  view.vm = null;
  hideBanner();
  $('console').hidden = true;
  owner.showList(vm);
}

function updateConsoleData() {
  const data = $('console').dataset;
  data.role = stream.role || '';
  data.offset = String(stream.offset ?? 0);
  data.firstOffset = String(stream.firstOffset ?? 0);
  data.written = String(stream.written);
}

function setConnState(text, dataState, className = '') {
  setStatus('st-conn', text, className);
  $('console').dataset.state = dataState;
}

async function connect() {
  const generation = ++view.generation;
  const vm = view.vm;
  const mode = view.wantMode;
  setConnState(`Connecting to ${vm}…`, 'connecting');
  let ticket;
  try {
    const response = await owner.api('POST', vmPath(vm, '/console/tickets'), { mode });
    ticket = (await response.json()).ticket;
  } catch (err) {
    if (generation !== view.generation) return;
    setConnState('Not connected', 'closed', 'warn');
    if (err.status === 401) {
      owner.signOut(`Signed out: ${err.message}.`);
      return;
    }
    showBanner('error', `Could not open the console of ${vm}: ${err.message}.`, [['Reconnect', reconnect]]);
    return;
  }
  if (generation !== view.generation) return;
  const ws = new WebSocket(consoleUrl(location, vm, ticket, stream.offset), SUBPROTOCOL);
  ws.binaryType = 'arraybuffer';
  view.ws = ws;
  view.connected = false;
  ws.addEventListener('open', () => {
    if (generation === view.generation) view.connected = true;
  });
  ws.addEventListener('message', (event) => {
    if (generation === view.generation) onMessage(event.data);
  });
  ws.addEventListener('close', (event) => {
    if (generation === view.generation) onClose(event);
  });
}

/** Close the socket on purpose: bumping the generation mutes its close event. */
export function disconnect() {
  view.generation += 1;
  if (view.ws) {
    try {
      view.ws.close(CLOSE_NORMAL, 'closed by the user');
    } catch {
      // already closing
    }
  }
  view.ws = null;
  view.connected = false;
  stream.detach();
  stopProgress();
}

function reconnect() {
  if (!view.vm) return;
  hideBanner();
  disconnect();
  connect();
  term.focus();
}

function switchMode() {
  view.wantMode = $('btn-mode').dataset.mode;
  reconnect();
}

function setModeButton(mode) {
  const button = $('btn-mode');
  button.dataset.mode = mode;
  button.textContent = mode === 'spectate' ? 'Spectate' : 'Take over';
}

// -- what relayd says ----------------------------------------------------------------------------

function onMessage(data) {
  const message = stream.receive(data);
  if (message === null) return;
  if (message.type === 'output') {
    term.write(message.bytes);
    updateConsoleData();
  } else if (message.type === 'hello') {
    onHello(message);
  } else if (message.type === 'notice') {
    onNotice(message);
  } else {
    onError(message);
  }
}

function onHello(hello) {
  paste.reset();
  showPort();
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
  const reader = owner.vmRole(view.vm) === 'reader';
  if (stream.role === 'writer') {
    setStatus('st-role', 'Role: writer (your keys reach the console)');
  } else {
    const why = reader ? 'your role is reader' : 'Take over to type';
    setStatus('st-role', `Role: spectator (read-only; ${why})`, 'warn');
  }
  $('console').dataset.role = stream.role || '';
  setModeButton(stream.role === 'writer' ? 'spectate' : 'interactive');
  $('btn-mode').disabled = stream.role !== 'writer' && reader;
  updateToolbar();
}

function showPort() {
  setStatus('st-port', `Serial port ${stream.port}`, stream.port === 'up' ? 'up' : 'down');
}

function updateToolbar() {
  const writer = stream.role === 'writer';
  for (const id of ['btn-break', 'btn-sysrq', 'btn-stty', 'sysrq-key']) $(id).disabled = !writer;
  // Reset and NMI run the VM's hypervisor hooks: owners only (the gateway checks too).
  $('owner-tools').hidden = owner.vmRole(view.vm) !== 'owner';
}

function onNotice(notice) {
  switch (notice.event) {
    case 'port_down':
      showPort();
      showBanner('warning', `The serial port of ${view.vm} is down; relayd keeps trying to reopen it.`);
      break;
    case 'port_up':
      showPort();
      hideBanner();
      break;
    case 'writer_changed':
      if (notice.you === 'evicted') {
        showBanner('error', `Taken over by ${notice.by}.`);
      } else {
        setStatus('st-gap', notice.writer ? `Writer now: ${notice.writer}` : 'No writer attached');
      }
      break;
    case 'demoted': {
      showRole();
      const { text, canTakeOver } = demotedMessage(notice);
      showBanner('warning', text, canTakeOver ? [['Take over again', switchMode]] : []);
      break;
    }
    case 'output_gap': {
      const skipped = `${notice.bytes} bytes of output skipped (offsets ${notice.first}–${notice.last})`;
      setStatus('st-gap', `Output gap: ${skipped}; Download log may still hold them.`, 'warn');
      term.write(`\r\n\x1b[7m[relayd: ${skipped}]\x1b[0m\r\n`);
      updateConsoleData();
      break;
    }
    case 'offsets_reused': {
      // The offsets this page holds past `first` are handed out again: their history is gone.
      const note = `console history was reset: output goes on at offset ${notice.first}`;
      setStatus('st-gap', `Offsets reused: ${note}; earlier output may not match.`, 'warn');
      term.write(`\r\n\x1b[7m[relayd: ${note}]\x1b[0m\r\n`);
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
  const wasOpen = view.connected;
  view.ws = null;
  view.connected = false;
  stream.detach();
  stopProgress();
  updateToolbar();
  $('console').dataset.closeCode = String(event.code);
  $('console').dataset.role = '';
  const { text, kind, takenOver } = closeMessage(event.code, event.reason, wasOpen);
  setConnState(`Disconnected (${event.code})`, 'closed', 'warn');
  setStatus('st-role', '');
  const actions = [['Reconnect', reconnect]];
  if (takenOver) {
    actions.splice(0, 1, ['Take over again', () => ((view.wantMode = 'interactive'), reconnect())]);
    actions.push(['Spectate', () => ((view.wantMode = 'spectate'), reconnect())]);
  }
  showBanner(kind, text, actions);
}

// -- input ------------------------------------------------------------------------------------

function sendControl(message) {
  if (view.ws && view.connected) view.ws.send(JSON.stringify(message));
}

function sendInput(bytes) {
  if (!bytes.length) return;
  if (!view.ws || !view.connected) {
    setStatus('st-input', 'Not connected: keys were not sent. Use Reconnect.', 'warn');
    return;
  }
  if (stream.role !== 'writer') {
    setStatus('st-input', 'Read-only: spectators cannot type. Take over to type.', 'warn');
    return;
  }
  if (!$('banner').hidden && $('banner-text').textContent.startsWith('Idle:')) hideBanner();
  for (const message of inputMessages(bytes, stream.limits?.max_paste_bytes)) view.ws.send(message);
  trackPacing(bytes.length);
}

function trackPacing(n) {
  const rate = stream.limits?.input_bytes_per_s;
  if (!rate) return;
  const queued = paste.sent(n, rate, performance.now());
  if (queued >= QUEUED_SHOWN_BYTES && !view.progressTimer) {
    // Announced once; the progress itself is outside the live region, so not read every tick.
    setStatus('st-input', `Pasting ${paste.total} bytes at ${rate} bytes/s…`);
    $('st-paste').hidden = false;
    view.progressTimer = setInterval(showProgress, PROGRESS_MS);
    showProgress();
  }
}

function showProgress() {
  const rate = stream.limits?.input_bytes_per_s;
  const queued = paste.queued(rate, performance.now());
  if (queued <= 0) {
    const total = paste.total;
    stopProgress();
    setStatus('st-input', `Pasted ${total} bytes.`);
    return;
  }
  const total = Math.max(paste.total, queued);
  const seconds = Math.ceil(queued / rate);
  $('paste-progress').max = total;
  $('paste-progress').value = total - queued;
  $('st-paste-text').textContent = `pasting… ${queued} bytes queued (about ${seconds} s)`;
}

function stopProgress() {
  clearInterval(view.progressTimer);
  view.progressTimer = null;
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

function requestSysrq() {
  const key = $('sysrq-key').value;
  if (!DESTRUCTIVE_SYSRQ.has(key)) {
    sendSysrq(key);
    return;
  }
  $('sysrq-confirm-text').textContent =
    `SysRq ${key} ${sysrqWarning(key, view.vm)}. Unsaved work in the guest may be lost.`;
  const dialog = $('sysrq-confirm');
  dialog.dataset.key = key;
  dialog.returnValue = '';
  dialog.showModal();
}

function sendSysrq(key) {
  sendControl({ type: 'sysrq', key });
  setStatus('st-input', `SysRq ${key} (${sysrqLabel(key)}) sent.`);
}

function requestHook(name) {
  $('hook-confirm-text').textContent =
    `${name === 'reset' ? 'Reset' : 'NMI'}: this ${HOOKS[name].replace('VM', view.vm)}.`;
  const dialog = $('hook-confirm');
  dialog.dataset.hook = name;
  dialog.returnValue = '';
  dialog.showModal();
}

function applySizeToGuest() {
  if (!term) return;
  sendInput(encoder.encode(`stty rows ${term.rows} cols ${term.cols}\r`));
  term.focus();
}

async function downloadLog() {
  const vm = view.vm;
  setStatus('st-input', 'Downloading the console log…');
  try {
    const response = await owner.api('GET', vmPath(vm, '/console-log'));
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

/**
 * Wire the console's controls once, at start-up.
 * @param {object} deps - what app.js provides:
 *   api(method, path, body) with the signed-in token; vmRole(vm) from the VM list;
 *   signOut(message) when the token is refused; showList(vm) for "Back to VM list".
 */
export function initConsole(deps) {
  owner = deps;
  setFocusHome(() => (term && !$('console').hidden ? term : $('main')));
  const select = $('sysrq-key');
  for (const [key, label] of SYSRQ_KEYS) {
    const option = document.createElement('option');
    option.value = key;
    option.textContent = `${key}: ${label}${DESTRUCTIVE_SYSRQ.has(key) ? ' (asks first)' : ''}`;
    select.append(option);
  }
  $('back').addEventListener('click', backToList);
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
}
