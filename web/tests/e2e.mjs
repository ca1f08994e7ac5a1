// End-to-end test of the web terminal in a real Chromium, against `relayd demo`.
//
//   RELAYD_URL=https://127.0.0.1:PORT/ RELAYD_TOKEN=... RELAYD_ARTIFACTS=dir node tests/e2e.mjs
//
// Optional: RELAYD_CHROMIUM (default /usr/bin/chromium), RELAYD_GUEST_LOGIN
// (default operator/relayd). Runs the steps in order, stops at the first
// failure, saves screenshots (and the downloaded console log) in
// RELAYD_ARTIFACTS, and prints one JSON line: {"ok", "steps": [{name, ok, ms,
// error?}], "artifacts", "problems"}. Exit status 0 only when every step passed.
// Waits are Playwright's auto-waiting and waitForFunction with timeouts: no sleeps.

import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const URL_ = requireEnv('RELAYD_URL');
const TOKEN = requireEnv('RELAYD_TOKEN');
const ARTIFACTS = requireEnv('RELAYD_ARTIFACTS');
const CHROMIUM = process.env.RELAYD_CHROMIUM || '/usr/bin/chromium';
const [GUEST_USER, GUEST_PASSWORD] = (process.env.RELAYD_GUEST_LOGIN || 'operator/relayd').split('/');
const VM = 'demo-1';
const WAIT = 10000;
const PASTE_BYTES = 70000; // over max_paste_bytes (65536): the page must split it
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

function requireEnv(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`e2e.mjs: set ${name}`);
    process.exit(2);
  }
  return value;
}

const result = { ok: false, steps: [], artifacts: [], problems: [] };
mkdirSync(ARTIFACTS, { recursive: true });

// -- helpers ----------------------------------------------------------------------------

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function screenshot(page, name) {
  const path = join(ARTIFACTS, name);
  await page.screenshot({ path });
  result.artifacts.push(name);
}

function watch(page, label) {
  page.on('console', (msg) => {
    if (msg.type() === 'error') result.problems.push(`${label} console error: ${msg.text()}`);
  });
  page.on('pageerror', (err) => result.problems.push(`${label} page error: ${err.message}`));
  return page.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (e) =>
      window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`),
    );
  });
}

// The terminal's visible rows as text (xterm.js's DOM renderer draws real text).
async function screenText(page) {
  return page.evaluate(() =>
    (document.querySelector('#terminal .xterm-rows')?.innerText || '').replace(/\u00a0/g, ' '),
  );
}

async function waitScreen(page, text, timeout = WAIT) {
  try {
    await page.waitForFunction(
      (t) =>
        (document.querySelector('#terminal .xterm-rows')?.innerText || '').replace(/\u00a0/g, ' ').includes(t),
      text,
      { timeout },
    );
  } catch (err) {
    throw new Error(`terminal never showed ${JSON.stringify(text)}; it shows:\n${await screenText(page)}`);
  }
}

async function waitConsole(page, attrs, timeout = WAIT) {
  const selector = '#console' + Object.entries(attrs).map(([k, v]) => `[data-${k}="${v}"]`).join('');
  await page.locator(selector).waitFor({ state: 'attached', timeout });
}

async function typeLine(page, text) {
  await page.keyboard.type(text);
  await page.keyboard.press('Enter');
}

async function focusIsInTerminal(page) {
  return page.evaluate(() => document.activeElement?.classList.contains('xterm-helper-textarea') ?? false);
}

async function consoleData(page) {
  return page.evaluate(() => ({ ...document.querySelector('#console').dataset }));
}

function count(haystack, needle) {
  return haystack.split(needle).length - 1;
}

// axe-core's WCAG 2.1 A and AA rules on the page as it is now; returns the violations.
const AXE_SOURCE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');
async function axeViolations(page) {
  if (!(await page.evaluate(() => 'axe' in window))) await page.addScriptTag({ content: AXE_SOURCE });
  const violations = await page.evaluate(async () => {
    const results = await window.axe.run(document, {
      runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] },
    });
    const found = results.violations.map(
      (v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).join(', ')})`,
    );
    // A run that checked nothing would pass vacuously.
    if (results.passes.length < 5) found.push(`axe checked only ${results.passes.length} rules`);
    return found;
  });
  return violations;
}

async function signIn(page) {
  await page.locator('#token').fill(TOKEN);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('#vm-rows tr').first().waitFor({ timeout: WAIT });
}

// -- the run ------------------------------------------------------------------------------

const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 30000 });
const origin = new URL(URL_).origin;
const contextOptions = { ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 }, acceptDownloads: true };
const ctx1 = await browser.newContext(contextOptions);
await ctx1.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
const page1 = await ctx1.newPage();
await watch(page1, 'browser 1');
let ctx2 = null;
let page2 = null;
let current = page1;

const steps = [
  [
    'page is served with a strict Content-Security-Policy',
    async () => {
      const response = await page1.goto(URL_);
      const headers = response.headers();
      const csp = headers['content-security-policy'] || '';
      for (const directive of ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"]) {
        check(csp.includes(directive), `CSP lacks ${directive}: ${csp}`);
      }
      check(headers['x-frame-options'] === 'DENY', 'X-Frame-Options is not DENY');
      check(headers['referrer-policy'] === 'no-referrer', 'Referrer-Policy is not no-referrer');
      check((await page1.locator('script:not([src])').count()) === 0, 'the page has an inline script');
      check((await page1.locator('[style]').count()) === 0, 'the page has a style attribute');
      await page1.locator('#token').waitFor({ state: 'visible' });
      await screenshot(page1, '00-sign-in.png');
    },
  ],
  [
    'sign in with the keyboard only; the token stays out of the URL',
    async () => {
      await page1.locator('#token').waitFor({ state: 'visible' });
      check(await page1.evaluate(() => document.activeElement?.id === 'token'), 'the token field is not focused');
      await page1.keyboard.insertText(TOKEN);
      await page1.keyboard.press('Enter');
      await page1.locator('#vm-rows tr').nth(2).waitFor({ timeout: WAIT });
      const rows = await page1.locator('#vm-rows tr').allInnerTexts();
      check(rows.length === 3, `expected 3 VMs, got ${rows.length}`);
      const row = rows.find((r) => r.startsWith(VM));
      check(row && /\benabled\b/.test(row) && /\bup\b/.test(row), `${VM} is not listed enabled and up: ${row}`);
      check(!page1.url().includes(TOKEN), 'the token is in the URL');
      check(
        (await page1.evaluate(() => sessionStorage.getItem('relayd.token'))) === TOKEN,
        'the token is not in sessionStorage',
      );
      await screenshot(page1, '01-vm-list.png');
    },
  ],
  [
    'open demo-1 with the keyboard; focus lands in the terminal',
    async () => {
      let found = false;
      for (let i = 0; i < 30 && !found; i++) {
        await page1.keyboard.press('Tab');
        found = await page1.evaluate(
          (vm) => document.activeElement?.dataset?.vmAction === `interactive:${vm}`,
          VM,
        );
      }
      check(found, `Tab never reached the Open console button of ${VM}`);
      await page1.keyboard.press('Enter');
      await waitConsole(page1, { state: 'open', role: 'writer' });
      check(await focusIsInTerminal(page1), 'focus is not in the terminal after opening it');
      await waitScreen(page1, 'login:');
    },
  ],
  [
    'log in to the guest and read a command result',
    async () => {
      await typeLine(page1, GUEST_USER);
      await waitScreen(page1, 'Password:');
      await typeLine(page1, GUEST_PASSWORD);
      await waitScreen(page1, `${GUEST_USER}@${VM}:~$`);
      await typeLine(page1, 'uname -a');
      await waitScreen(page1, `$ uname -a\nLinux ${VM} 6.1.0-sim`);
      const text = await screenText(page1);
      check(/uname -a\nLinux demo-1 6\.1\.0-sim .* x86_64 GNU\/Linux\n/.test(text), `uname -a output not found:\n${text}`);
      await screenshot(page1, '02-logged-in.png');
    },
  ],
  [
    'keyboard: Tab stays in the terminal, Ctrl+F6 leaves it, Tab reaches it again',
    async () => {
      await page1.keyboard.press('Tab');
      check(await focusIsInTerminal(page1), 'Tab inside the terminal moved focus out');
      await page1.keyboard.press('Control+U'); // drop the typed tab from the guest's line
      await page1.keyboard.press('Control+F6');
      const outside = await page1.evaluate(() => ({
        inToolbar: Boolean(document.activeElement?.closest('#toolbar')),
        name: document.activeElement?.textContent,
      }));
      check(outside.inToolbar, 'Ctrl+F6 did not move focus to the toolbar');
      let back = false;
      for (let i = 0; i < 20 && !back; i++) {
        await page1.keyboard.press('Tab');
        back = await focusIsInTerminal(page1);
        if (!back) {
          const visible = await page1.evaluate(() => {
            const el = document.activeElement;
            const style = getComputedStyle(el);
            return el === document.body || style.outlineStyle !== 'none' || style.boxShadow !== 'none';
          });
          check(visible, 'a focused control has no visible focus indicator');
        }
      }
      check(back, 'Tab from the toolbar never reached the terminal');
      await page1.keyboard.press('Control+F6');
      check(!(await focusIsInTerminal(page1)), 'second Ctrl+F6 did not leave the terminal');
      await page1.keyboard.press('Control+F6');
      check(await focusIsInTerminal(page1), 'Ctrl+F6 from the toolbar did not return to the terminal');
    },
  ],
  [
    'every control has an accessible name',
    async () => {
      const unnamed = await page1.evaluate(() => {
        const nameOf = (el) => {
          if (el.getAttribute('aria-label')) return el.getAttribute('aria-label');
          const by = el.getAttribute('aria-labelledby');
          if (by) return by.split(/\s+/).map((id) => document.getElementById(id)?.textContent || '').join(' ');
          if (el.labels && el.labels.length) return el.labels[0].textContent;
          return el.textContent || el.title || '';
        };
        return [...document.querySelectorAll('button, select, input, textarea, a[href], [role="region"], [role="toolbar"]')]
          .filter((el) => el.getClientRects().length > 0)
          .filter((el) => !nameOf(el).trim())
          .map((el) => el.outerHTML.slice(0, 120));
      });
      check(unnamed.length === 0, `controls without a name: ${unnamed.join(' | ')}`);
    },
  ],
  [
    'SysRq: a destructive key asks first, a harmless one is sent at once',
    async () => {
      await page1.locator('#sysrq-key').selectOption('b');
      await page1.getByRole('button', { name: 'Send SysRq' }).click();
      const dialog = page1.getByRole('dialog', { name: 'Send a destructive SysRq?' });
      await dialog.waitFor({ state: 'visible' });
      check((await dialog.innerText()).includes('reboot'), 'the confirmation does not say what b does');
      await screenshot(page1, '03-sysrq-confirm.png');
      await dialog.getByRole('button', { name: 'Cancel' }).click();
      await dialog.waitFor({ state: 'hidden' });
      await page1.locator('#sysrq-key').selectOption('h');
      await page1.getByRole('button', { name: 'Send SysRq' }).click();
      await waitScreen(page1, 'sysrq: HELP');
      check(!(await screenText(page1)).includes('Resetting'), 'the cancelled SysRq b was sent');
      check(!(await dialog.isVisible()), 'SysRq h asked for confirmation');
      await page1.getByRole('button', { name: 'Send BREAK' }).click();
      await page1.locator('#st-input', { hasText: 'BREAK sent' }).waitFor();
      check(await focusIsInTerminal(page1), 'focus did not return to the terminal after BREAK');
      await page1.keyboard.type('m'); // BREAK then a key: SysRq over serial, typed by hand
      await waitScreen(page1, 'sysrq: Show Memory');
    },
  ],
  [
    'Apply size to guest types stty with the terminal size',
    async () => {
      const size = await page1.locator('#st-size').innerText();
      const m = /(\d+)×(\d+)/.exec(size);
      check(m, `no size in the status line: ${size}`);
      await page1.keyboard.press('Control+U');
      await page1.getByRole('button', { name: 'Apply size to guest' }).click();
      await waitScreen(page1, `stty rows ${m[2]} cols ${m[1]}`);
      check(await focusIsInTerminal(page1), 'focus did not return to the terminal');
    },
  ],
  [
    'a paste larger than max_paste_bytes is split, paced and shows progress',
    async () => {
      const lines = [];
      for (let i = 1; lines.length * 70 < PASTE_BYTES; i++) {
        lines.push(`paste line ${String(i).padStart(5, '0')} `.padEnd(69, '.') + '\n');
      }
      const text = lines.join('');
      check(text.length === PASTE_BYTES, `paste is ${text.length} bytes`);
      await typeLine(page1, 'cat > paste.txt');
      await page1.evaluate((t) => navigator.clipboard.writeText(t), text);
      await page1.keyboard.press('Control+Shift+V');
      await page1.locator('#st-paste-text', { hasText: /pasting… \d+ bytes queued/ }).waitFor({ timeout: 3000 });
      await screenshot(page1, '04-pasting.png');
      await page1.locator('#st-input', { hasText: `Pasted ${PASTE_BYTES} bytes.` }).waitFor({ timeout: 20000 });
      await waitScreen(page1, `paste line ${String(lines.length).padStart(5, '0')}`, 5000);
      await page1.keyboard.press('Control+D');
      await typeLine(page1, 'wc -c paste.txt');
      await waitScreen(page1, `${PASTE_BYTES} paste.txt`);
      check(await page1.locator('#banner').isHidden(), `a banner appeared: ${await page1.locator('#banner').innerText()}`);
    },
  ],
  [
    'a second browser takes over; the first shows the takeover banner',
    async () => {
      ctx2 = await browser.newContext(contextOptions);
      page2 = await ctx2.newPage();
      current = page2;
      await watch(page2, 'browser 2');
      await page2.goto(URL_);
      await signIn(page2);
      check(
        (await page2.locator('#vm-rows tr', { hasText: VM }).innerText()).includes('attached'),
        'the list does not show a writer attached',
      );
      await page2.getByRole('button', { name: `Open console: ${VM}` }).click();
      await waitConsole(page2, { state: 'open', role: 'writer' });
      current = page1;
      await waitConsole(page1, { state: 'closed', 'close-code': '4001' });
      const banner = page1.locator('#banner');
      await banner.waitFor({ state: 'visible' });
      const words = await banner.innerText();
      check(/taken over by user:demo/i.test(words), `banner says: ${words}`);
      check((await banner.getAttribute('role')) === 'alert', 'the banner is not an alert');
      await screenshot(page1, '05-taken-over.png');
      current = page2;
      await typeLine(page2, 'echo from-the-second-browser');
      await waitScreen(page2, 'from-the-second-browser\n');
      await screenshot(page2, '06-second-browser.png');
    },
  ],
  [
    'Reconnect resumes from the offset: what was missed arrives once, nothing repeats',
    async () => {
      current = page1;
      const before = await consoleData(page1);
      const screenBefore = await screenText(page1);
      check(count(screenBefore, 'from-the-second-browser') === 0, 'browser 1 saw output after it was evicted');
      await page1.getByRole('button', { name: 'Reconnect' }).first().click();
      await waitConsole(page1, { state: 'open', role: 'writer' });
      await waitScreen(page1, 'from-the-second-browser\n');
      await typeLine(page1, 'echo resumed-ok');
      await waitScreen(page1, 'resumed-ok\n');
      const screen = await screenText(page1);
      check(count(screen, 'from-the-second-browser') === 2, `missed output not shown exactly once:\n${screen}`);
      check(count(screen, `${PASTE_BYTES} paste.txt`) === 1, `earlier output repeated:\n${screen}`);
      const after = await consoleData(page1);
      check(Number(after.offset) > Number(before.offset), 'the offset did not advance');
      check(
        Number(after.written) === Number(after.offset) - Number(after.firstOffset),
        `bytes written ${after.written} != offset span ${after.offset} - ${after.firstOffset}: output lost or repeated`,
      );
      // The page's offset catches up with the end of the gateway's console log.
      await page1.waitForFunction(
        async (token) => {
          const vm = 'demo-1';
          const r = await fetch(`/v1/vms/${vm}/console-log?max_bytes=0`, { headers: { Authorization: `Bearer ${token}` } });
          return r.headers.get('Relayd-Log-End') === document.querySelector('#console').dataset.offset;
        },
        TOKEN,
        { timeout: WAIT, polling: 100 },
      );
      await page2.locator('#banner', { hasText: /taken over by user:demo/i }).waitFor();
      await screenshot(page1, '07-reconnected.png');
    },
  ],
  [
    'Download log saves the console log',
    async () => {
      const [download] = await Promise.all([
        page1.waitForEvent('download', { timeout: WAIT }),
        page1.getByRole('button', { name: 'Download log' }).click(),
      ]);
      check(/^demo-1-console-\d+-\d+\.log$/.test(download.suggestedFilename()), download.suggestedFilename());
      const path = join(ARTIFACTS, 'demo-1-console.log');
      await download.saveAs(path);
      result.artifacts.push('demo-1-console.log');
      const log = readFileSync(path, 'latin1');
      check(log.includes('login:') && log.includes('resumed-ok'), 'the log lacks the session output');
    },
  ],
  [
    'Spectate makes the session read-only; Take over makes it writable again',
    async () => {
      await page1.getByRole('button', { name: 'Spectate', exact: true }).click();
      await waitConsole(page1, { state: 'open', role: 'spectator' });
      await page1.locator('#terminal').click();
      await page1.keyboard.type('x');
      await page1.locator('#st-input', { hasText: 'Read-only' }).waitFor();
      await page1.getByRole('button', { name: 'Take over', exact: true }).click();
      await waitConsole(page1, { state: 'open', role: 'writer' });
      const data = await consoleData(page1);
      check(Number(data.written) === Number(data.offset) - Number(data.firstOffset), 'output lost or repeated');
    },
  ],
  [
    'screen-reader mode exposes the terminal text to assistive technology',
    async () => {
      const toggle = page1.getByRole('button', { name: 'Screen-reader mode' });
      await toggle.click();
      check((await toggle.getAttribute('aria-pressed')) === 'true', 'the toggle is not pressed');
      await page1.waitForFunction(
        () => (document.querySelector('.xterm-accessibility-tree')?.textContent || '').includes('resumed-ok'),
        null,
        { timeout: WAIT },
      );
      await screenshot(page1, '08-screen-reader-mode.png');
      await toggle.click();
      check((await toggle.getAttribute('aria-pressed')) === 'false', 'the toggle did not turn off');
    },
  ],
  [
    'axe-core: no WCAG 2.1 A/AA violations on the sign-in page, the VM list and a console',
    async () => {
      // A context of its own that lets the test inject axe-core past the page's CSP.
      const ctx3 = await browser.newContext({ ...contextOptions, bypassCSP: true });
      const page3 = await ctx3.newPage();
      current = page3;
      await page3.goto(URL_);
      await page3.locator('#token').waitFor({ state: 'visible' });
      const found = [];
      found.push(...(await axeViolations(page3)).map((v) => `sign-in: ${v}`));
      await signIn(page3);
      found.push(...(await axeViolations(page3)).map((v) => `VM list: ${v}`));
      await page3.getByRole('button', { name: 'Spectate: demo-2' }).click();
      await waitConsole(page3, { state: 'open', role: 'spectator' });
      await waitScreen(page3, 'login:');
      found.push(...(await axeViolations(page3)).map((v) => `console: ${v}`));
      await ctx3.close();
      check(found.length === 0, found.join('\n'));
    },
  ],
  [
    'no CSP violations, console errors or page errors',
    async () => {
      for (const [label, page] of [['browser 1', page1], ['browser 2', page2]]) {
        const violations = await page.evaluate(() => window.__cspViolations);
        for (const v of violations) result.problems.push(`${label} CSP violation: ${v}`);
      }
      check(result.problems.length === 0, result.problems.join('\n'));
    },
  ],
];

try {
  for (const [name, run] of steps) {
    const started = Date.now();
    try {
      await run();
      result.steps.push({ name, ok: true, ms: Date.now() - started });
    } catch (err) {
      result.steps.push({ name, ok: false, ms: Date.now() - started, error: String(err.stack || err) });
      try {
        await screenshot(current, 'failure.png');
      } catch {
        // the page is gone
      }
      break;
    }
  }
  result.ok = result.steps.length === steps.length && result.steps.every((s) => s.ok);
} finally {
  await browser.close();
  writeFileSync(join(ARTIFACTS, 'e2e-result.json'), JSON.stringify(result, null, 2));
  console.log(JSON.stringify(result));
}
process.exit(result.ok ? 0 : 1);
