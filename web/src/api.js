// relayd's HTTP API as the page uses it (docs/api.md), and the bearer token it sends:
// no DOM. The token goes only in the Authorization header, never in a URL.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status; // 0: the gateway could not be reached
    this.code = code;
  }
}

/**
 * One API request with the bearer token; the Response when it is 2xx.
 * @throws {ApiError} with relayd's JSON error code and message, or `network`
 */
export async function api(token, method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
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

/** A pasted token without the `token:` or `Bearer ` prefix it was copied with. */
export function cleanToken(raw) {
  return raw.trim().replace(/^token:\s*/i, '').replace(/^bearer\s+/i, '').trim();
}

/** The `sub` claim of a JWT, for "Signed in as"; null when it is not a readable JWT.
 * Not verified: the gateway does that; this is only a label. */
export function tokenSubject(token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(payload.padEnd(Math.ceil(payload.length / 4) * 4, '=')));
    return typeof claims.sub === 'string' ? claims.sub : null;
  } catch {
    return null;
  }
}
