// relayd web terminal: sign in with a bearer token, list VMs, open a console over
// the relayd.console.v1 WebSocket (docs/protocol.md) in xterm.js.
//
// The modules: app.js (this: sign-in, the VM list, start-up), console.js (the console
// view and its WebSocket), ui.js (status line and banner), and the parts with no DOM,
// unit-tested in Node (web/tests/*.test.mjs): protocol.js (URLs, messages, offsets and
// resume, close words, paste pacing), api.js (HTTP API, token), sysrq.js (the SysRq
// table), protocol-constants.js (generated from relayd/control.py).

import { installCspStyleShim } from './cspstyle.js';
import { api, cleanToken, tokenSubject } from './api.js';
import { disconnect, initConsole, openConsole } from './console.js';
import { $, hideBanner } from './ui.js';

installCspStyleShim();

const TOKEN_KEY = 'relayd.token';
const VM_REFRESH_MS = 15000;

const session = {
  token: sessionStorage.getItem(TOKEN_KEY),
  vms: new Map(), // id -> the API's VM object, as last listed
  refreshTimer: null,
};

const request = (method, path, body) => api(session.token, method, path, body);

// -- sign-in ----------------------------------------------------------------------------

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
  session.token = token;
  try {
    const vms = await fetchVms();
    sessionStorage.setItem(TOKEN_KEY, token);
    $('token').value = '';
    error.textContent = '';
    showVmList(vms);
    $('vms-title').focus();
  } catch (err) {
    session.token = null;
    error.textContent =
      err.status === 401 ? `The gateway refused this token: ${err.message}.` : `Sign-in failed: ${err.message}.`;
    $('token').focus();
  }
}

function signOut(message) {
  disconnect();
  session.token = null;
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
  const response = await request('GET', '/v1/vms');
  const { vms } = await response.json();
  session.vms = new Map(vms.map((vm) => [vm.id, vm]));
  return vms;
}

function showVmList(vms) {
  $('signin').hidden = true;
  $('console').hidden = true;
  $('vms').hidden = false;
  const sub = tokenSubject(session.token);
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
    // A scale set is named by its resource group too: two groups may each hold a "web".
    cell(
      row,
      vm.scale_set
        ? `${vm.subscription} / ${vm.resource_group} / ${vm.scale_set}`
        : vm.subscription,
    );
    cell(row, vm.enabled ? 'enabled' : 'disabled', vm.enabled ? 'state-on' : 'state-off');
    // In a cluster a port held by another gateway is "remote": it is up there.
    const portUp = vm.port === 'up' || vm.port === 'remote';
    cell(row, portUp ? 'up' : 'down', portUp ? 'state-up' : 'state-down');
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
  button.addEventListener('click', () => {
    stopRefresh();
    openConsole(vm.id, mode);
  });
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

// Back from the console of `vm`: the list again, focus on that VM's button.
async function returnToList(vm) {
  $('vms').hidden = false;
  document.title = 'relayd: virtual machines';
  startRefresh();
  await refreshVms();
  const button = document.querySelector(`[data-vm-action="interactive:${CSS.escape(vm || '')}"]`);
  (button && !button.disabled ? button : $('vms-title')).focus();
}

function startRefresh() {
  stopRefresh();
  session.refreshTimer = setInterval(() => {
    if (!$('vms').hidden && !document.hidden) refreshVms({ quiet: true });
  }, VM_REFRESH_MS);
}

function stopRefresh() {
  clearInterval(session.refreshTimer);
  session.refreshTimer = null;
}

// -- wiring ----------------------------------------------------------------------------------

function init() {
  initConsole({
    api: request,
    vmRole: (vm) => session.vms.get(vm)?.role,
    signOut,
    showList: returnToList,
  });
  $('signin-form').addEventListener('submit', onSignIn);
  $('sign-out').addEventListener('click', () => signOut('Signed out.'));
  $('vms-refresh').addEventListener('click', () => refreshVms());
  $('banner-dismiss').addEventListener('click', hideBanner);
  if (session.token) {
    fetchVms()
      .then(showVmList)
      .catch((err) => signOut(err.status === 401 ? `Signed out: ${err.message}.` : `Could not list VMs: ${err.message}.`));
  } else {
    signOut('');
  }
}

init();
