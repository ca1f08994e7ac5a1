// api.js in Node against a real HTTP server on 127.0.0.1 port 0: the bearer header,
// JSON errors as ApiError, and the token helpers.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { once } from 'node:events';

import { ApiError, api, cleanToken, tokenSubject } from '../src/api.js';

// A server answering with `reply(request, body)`: [status, headers, body].
async function serve(reply) {
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (chunk) => (body += chunk));
    req.on('end', () => {
      const [status, headers, out] = reply(req, body);
      res.writeHead(status, headers);
      res.end(out);
    });
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { server, base: `http://127.0.0.1:${server.address().port}` };
}

test('api sends the bearer token and the JSON body, and returns the response', async (t) => {
  let seen;
  const { server, base } = await serve((req, body) => {
    seen = { method: req.method, url: req.url, auth: req.headers.authorization, type: req.headers['content-type'], body };
    return [200, { 'Content-Type': 'application/json' }, '{"ticket":"t1"}'];
  });
  t.after(() => server.close());
  const response = await api('tok', 'POST', `${base}/v1/vms/vm-a/console/tickets`, { mode: 'spectate' });
  assert.deepEqual(await response.json(), { ticket: 't1' });
  assert.deepEqual(seen, {
    method: 'POST',
    url: '/v1/vms/vm-a/console/tickets',
    auth: 'Bearer tok',
    type: 'application/json',
    body: '{"mode":"spectate"}',
  });
});

test('api turns relayd\'s JSON error into an ApiError with status, code and message', async (t) => {
  const { server, base } = await serve(() => [
    401,
    { 'Content-Type': 'application/json' },
    '{"error":"unauthorized","message":"token expired"}',
  ]);
  t.after(() => server.close());
  await assert.rejects(api('tok', 'GET', `${base}/v1/vms`), (err) => {
    assert.ok(err instanceof ApiError);
    assert.equal(err.status, 401);
    assert.equal(err.code, 'unauthorized');
    assert.equal(err.message, 'token expired');
    return true;
  });
});

test('api keeps the status text when the error body is not JSON', async (t) => {
  const { server, base } = await serve(() => [502, { 'Content-Type': 'text/plain' }, 'bad gateway']);
  t.after(() => server.close());
  await assert.rejects(api('tok', 'GET', `${base}/v1/vms`), { status: 502, code: 'http_502', message: 'Bad Gateway' });
});

test('api reports an unreachable gateway as status 0, code network', async () => {
  const { server, base } = await serve(() => [200, {}, '']);
  server.close();
  await once(server, 'close');
  await assert.rejects(api('tok', 'GET', `${base}/v1/vms`), { status: 0, code: 'network' });
});

test('cleanToken drops the prefixes a token is copied with', () => {
  assert.equal(cleanToken('  token: abc.def.ghi \n'), 'abc.def.ghi');
  assert.equal(cleanToken('Bearer abc'), 'abc');
  assert.equal(cleanToken('TOKEN:bearer  abc'), 'abc');
  assert.equal(cleanToken('   '), '');
});

test('tokenSubject reads sub from a JWT payload (base64url, unpadded), else null', () => {
  const jwt = (claims) => `h.${Buffer.from(JSON.stringify(claims)).toString('base64url')}.s`;
  const urlSafe = jwt({ sub: 'user:>>>???' });
  assert.match(urlSafe, /[-_]/); // the characters plain base64 would have as + and /
  assert.equal(tokenSubject(urlSafe), 'user:>>>???');
  assert.equal(tokenSubject(jwt({ sub: 'user:demo' })), 'user:demo');
  assert.equal(tokenSubject(jwt({ iss: 'x' })), null);
  assert.equal(tokenSubject(jwt({ sub: 42 })), null);
  assert.equal(tokenSubject('not-a-jwt'), null);
});
