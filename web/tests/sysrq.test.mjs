// sysrq.js in Node: the keys the toolbar offers are ones relayd accepts, and the
// destructive ones ask first.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { DESTRUCTIVE_SYSRQ, SYSRQ_KEYS, sysrqLabel, sysrqWarning } from '../src/sysrq.js';

test('every key is one of relayd\'s (0-9, a-z), once', () => {
  const keys = SYSRQ_KEYS.map(([key]) => key);
  assert.equal(new Set(keys).size, keys.length);
  for (const key of keys) assert.match(key, /^[0-9a-z]$/);
});

test('the keys that ask first are b, c, e, f, i, k and o', () => {
  assert.deepEqual([...DESTRUCTIVE_SYSRQ].sort(), ['b', 'c', 'e', 'f', 'i', 'k', 'o']);
});

test('a warning names the VM; harmless keys have none', () => {
  assert.equal(sysrqWarning('b', 'vm-a'), 'reboots vm-a at once, without syncing or unmounting its filesystems');
  assert.equal(sysrqWarning('h', 'vm-a'), null);
});

test('labels come from the table; an unknown key is its own label', () => {
  assert.equal(sysrqLabel('h'), 'help');
  assert.equal(sysrqLabel('7'), 'log level 7');
  assert.equal(sysrqLabel('y'), 'y');
});
