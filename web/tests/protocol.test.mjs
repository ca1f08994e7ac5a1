// protocol.js in Node: URLs, offsets and resume, messages, close words, paste pacing.
// Run by `make webtest` (node --test); no browser, no DOM.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import * as constants from '../src/protocol-constants.js';
import {
  CLOSE_WORDS,
  ConsoleStream,
  DEFAULT_MAX_PASTE_BYTES,
  PasteMeter,
  SUBPROTOCOL,
  closeMessage,
  consoleUrl,
  demotedMessage,
  inputMessages,
  vmPath,
} from '../src/protocol.js';

const HELLO = {
  type: 'hello',
  vm: 'vm-a',
  role: 'writer',
  port: 'up',
  offset: 1000,
  replay: 200,
  limits: { max_paste_bytes: 16, input_bytes_per_s: 1000 },
};

const text = (obj) => JSON.stringify(obj);
const bytes = (n) => new Uint8Array(n).fill(0x61);

test('vmPath escapes the id so it stays one path segment', () => {
  assert.equal(vmPath('a/b c', '/console'), '/v1/vms/a%2Fb%20c/console');
  assert.equal(vmPath('vm-a'), '/v1/vms/vm-a');
});

test('consoleUrl on https is wss on the same host, ticket in the query', () => {
  const url = new URL(consoleUrl({ protocol: 'https:', host: 'gw:8443' }, 'vm-a', 't+1'));
  assert.equal(url.protocol, 'wss:');
  assert.equal(url.host, 'gw:8443');
  assert.equal(url.pathname, '/v1/vms/vm-a/console');
  assert.equal(url.searchParams.get('ticket'), 't+1');
  assert.equal(url.searchParams.has('from'), false);
});

test('consoleUrl with an offset resumes from it, including offset 0', () => {
  const url = new URL(consoleUrl({ protocol: 'http:', host: 'gw' }, 'vm-a', 't', 0));
  assert.equal(url.protocol, 'ws:');
  assert.equal(url.searchParams.get('from'), '0');
});

test('the subprotocol is control.py\'s', () => {
  assert.equal(SUBPROTOCOL, 'relayd.console.v1');
  assert.equal(SUBPROTOCOL, constants.SUBPROTOCOL);
});

test('hello sets the next offset to the start of its replay', () => {
  const stream = new ConsoleStream();
  const message = stream.receive(text(HELLO));
  assert.equal(message.type, 'hello');
  assert.equal(stream.offset, 800);
  assert.equal(stream.firstOffset, 800);
  assert.equal(stream.role, 'writer');
  assert.equal(stream.port, 'up');
  assert.deepEqual(stream.limits, HELLO.limits);
});

test('hello without a port means the port is up', () => {
  const stream = new ConsoleStream();
  stream.receive(text({ ...HELLO, port: undefined }));
  assert.equal(stream.port, 'up');
});

test('output advances the offset and the bytes written, byte for byte', () => {
  const stream = new ConsoleStream();
  stream.receive(text(HELLO));
  const out = stream.receive(bytes(150).buffer);
  assert.equal(out.type, 'output');
  assert.equal(out.bytes.length, 150);
  stream.receive(bytes(50));
  assert.equal(stream.offset, 1000);
  assert.equal(stream.written, 200);
});

test('a reconnection resumes where the output stopped and keeps the first offset', () => {
  const stream = new ConsoleStream();
  stream.receive(text(HELLO));
  stream.receive(bytes(300).buffer);
  stream.detach();
  assert.equal(stream.role, null);
  assert.equal(stream.offset, 1100); // what ?from= asks for
  // The gateway replays nothing before `from`: the next hello starts there.
  stream.receive(text({ ...HELLO, offset: 1100, replay: 0 }));
  assert.equal(stream.offset, 1100);
  assert.equal(stream.firstOffset, 800);
  assert.equal(stream.written, 300);
});

test('reset forgets the console: a new VM starts without a resume offset', () => {
  const stream = new ConsoleStream();
  stream.receive(text(HELLO));
  stream.receive(bytes(10).buffer);
  stream.reset();
  assert.equal(stream.offset, null);
  assert.equal(stream.firstOffset, null);
  assert.equal(stream.written, 0);
});

test('output_gap moves the offset past the skipped bytes', () => {
  const stream = new ConsoleStream();
  stream.receive(text(HELLO));
  const notice = { type: 'notice', event: 'output_gap', first: 800, last: 4999, bytes: 4200 };
  assert.deepEqual(stream.receive(text(notice)), notice);
  assert.equal(stream.offset, 5000);
});

test('port notices track the port; demoted makes the writer a spectator', () => {
  const stream = new ConsoleStream();
  stream.receive(text(HELLO));
  stream.receive(text({ type: 'notice', event: 'port_down' }));
  assert.equal(stream.port, 'down');
  stream.receive(text({ type: 'notice', event: 'port_up' }));
  assert.equal(stream.port, 'up');
  stream.receive(text({ type: 'notice', event: 'demoted', by: 'user:bob' }));
  assert.equal(stream.role, 'spectator');
});

test('demoted says who took over, or why nobody did, and offers a takeover only after one', () => {
  assert.deepEqual(demotedMessage({ event: 'demoted', by: 'user:bob', writer: 'user:bob' }), {
    text: 'user:bob took over the console: you are now spectating (read-only).',
    canTakeOver: true,
  });
  assert.deepEqual(demotedMessage({ event: 'demoted', by: null, writer: null, reason: 'role_revoked' }), {
    text: 'Your role on this VM is now reader: you are now spectating (read-only).',
    canTakeOver: false,
  });
  // A relayed writer whose console moved to a gateway where another session writes (deny):
  // nobody took over, and taking over again would be refused.
  assert.deepEqual(demotedMessage({ event: 'demoted', by: null, writer: null, reason: 'writer_exists' }), {
    text: 'The console moved to a gateway where another session writes: you are now spectating (read-only).',
    canTakeOver: false,
  });
  const unknown = demotedMessage({ event: 'demoted', by: null, writer: null, reason: 'something_new' });
  assert.equal(unknown.canTakeOver, false);
  assert.ok(!unknown.text.includes('null'), unknown.text);
});

test('errors come back as they are; they change nothing', () => {
  const stream = new ConsoleStream();
  stream.receive(text(HELLO));
  const error = { type: 'error', code: 'read_only', message: 'spectators cannot type' };
  assert.deepEqual(stream.receive(text(error)), error);
  assert.equal(stream.role, 'writer');
  assert.equal(stream.offset, 800);
});

test('unknown types, non-objects and bad JSON are ignored', () => {
  const stream = new ConsoleStream();
  stream.receive(text(HELLO));
  for (const data of [text({ type: 'future' }), 'null', '42', '{not json', text({ event: 'x' })]) {
    assert.equal(stream.receive(data), null, data);
  }
  assert.equal(stream.offset, 800);
});

test('every close code control.py defines has its own words', () => {
  const codes = Object.entries(constants).filter(([name]) => name.startsWith('CLOSE_'));
  assert.ok(codes.some(([, code]) => code === 1007));
  for (const [name, code] of codes) {
    assert.ok(CLOSE_WORDS[code], name);
    assert.equal(closeMessage(code, '', true).text, CLOSE_WORDS[code], name);
  }
});

test('closeMessage adds the reason; an unknown code is named', () => {
  assert.equal(
    closeMessage(constants.CLOSE_IDLE, 'idle for 600s', true).text,
    'Closed after being idle too long. (idle for 600s)',
  );
  assert.equal(closeMessage(4500, '', true).text, 'The session closed (code 4500).');
});

test('closeMessage on a takeover quotes who, as an error', () => {
  const message = closeMessage(constants.CLOSE_TAKEN_OVER, 'taken over by user:bob', true);
  assert.equal(message.text, 'Taken over by user:bob. You are disconnected.');
  assert.equal(message.kind, 'error');
  assert.equal(message.takenOver, true);
});

test('closeMessage: 1006 before the socket opened is a refused upgrade', () => {
  assert.match(closeMessage(constants.CLOSE_ABNORMAL, '', false).text, /refused the console connection/);
  assert.equal(closeMessage(constants.CLOSE_ABNORMAL, '', true).text, CLOSE_WORDS[constants.CLOSE_ABNORMAL]);
});

test('closeMessage: 4003 and above are errors, the others warnings', () => {
  assert.equal(closeMessage(constants.CLOSE_GOING_AWAY, '', true).kind, 'warning');
  assert.equal(closeMessage(constants.CLOSE_INTERNAL_ERROR, '', true).kind, 'warning');
  assert.equal(closeMessage(constants.CLOSE_FORBIDDEN, '', true).kind, 'error');
  assert.equal(closeMessage(constants.CLOSE_SESSION_LIMIT, '', true).kind, 'error');
});

test('inputMessages splits at max_paste_bytes, in order, losing nothing', () => {
  const data = Uint8Array.from({ length: 40 }, (_, i) => i);
  const parts = inputMessages(data, 16);
  assert.deepEqual(parts.map((p) => p.length), [16, 16, 8]);
  assert.deepEqual(Uint8Array.from(parts.flatMap((p) => [...p])), data);
});

test('inputMessages without limits uses relayd\'s default', () => {
  const parts = inputMessages(new Uint8Array(DEFAULT_MAX_PASTE_BYTES + 1), undefined);
  assert.deepEqual(parts.map((p) => p.length), [DEFAULT_MAX_PASTE_BYTES, 1]);
  assert.deepEqual(inputMessages(new Uint8Array(0), 16), []);
});

test('PasteMeter: what was sent drains at the rate', () => {
  const meter = new PasteMeter();
  assert.equal(meter.sent(1000, 100, 0), 1000);
  assert.equal(meter.queued(100, 5000), 500);
  assert.equal(meter.queued(100, 10000), 0);
  assert.equal(meter.queued(100, 20000), 0);
});

test('PasteMeter: a paste sent while one is queued adds to its total', () => {
  const meter = new PasteMeter();
  meter.sent(1000, 100, 0);
  assert.equal(meter.sent(500, 100, 5000), 1000);
  assert.equal(meter.total, 1500);
  // Once drained, the next paste is a new one.
  meter.sent(10, 100, 60000);
  assert.equal(meter.total, 10);
});

test('PasteMeter.reset: a new connection starts with nothing queued', () => {
  const meter = new PasteMeter();
  meter.sent(1000, 100, 0);
  meter.reset();
  assert.equal(meter.queued(100, 0), 0);
  assert.equal(meter.queued(undefined, 0), 0);
});
