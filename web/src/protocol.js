// The relayd.console.v1 protocol as the page speaks it (docs/protocol.md), with no DOM
// and no sockets: URLs in, events out, the clock a parameter. console.js does the I/O
// and the drawing; web/tests/protocol.test.mjs runs this in Node.
//
// Offsets: every console byte has an absolute offset. hello.offset is the offset
// of the first live byte and hello.replay the number of replayed bytes before it,
// so the next byte expected is hello.offset - hello.replay plus every byte
// received since; an output_gap notice moves it past the skipped bytes.
// Reconnecting with ?from=<that offset> resumes with nothing lost or repeated.

import {
  CLOSE_ABNORMAL,
  CLOSE_FORBIDDEN,
  CLOSE_GOING_AWAY,
  CLOSE_IDLE,
  CLOSE_INTERNAL_ERROR,
  CLOSE_INVALID_DATA,
  CLOSE_MESSAGE_TOO_BIG,
  CLOSE_NORMAL,
  CLOSE_PROTOCOL_ERROR,
  CLOSE_DISABLED,
  CLOSE_SESSION_LIMIT,
  CLOSE_TAKEN_OVER,
  CLOSE_UNKNOWN_VM,
} from './protocol-constants.js';

export { SUBPROTOCOL } from './protocol-constants.js';

// relayd's default for limits.max_paste_bytes, used until hello says otherwise.
export const DEFAULT_MAX_PASTE_BYTES = 65536;

export const CLOSE_WORDS = {
  [CLOSE_NORMAL]: 'The console session was closed.',
  [CLOSE_GOING_AWAY]: 'The gateway is shutting down.',
  [CLOSE_PROTOCOL_ERROR]: 'The gateway closed the session: protocol error.',
  [CLOSE_ABNORMAL]: 'The connection to the gateway was lost.',
  [CLOSE_INVALID_DATA]: 'The gateway closed the session: a message was not valid UTF-8.',
  [CLOSE_MESSAGE_TOO_BIG]: 'The gateway closed the session: a message was too big.',
  [CLOSE_INTERNAL_ERROR]: 'The gateway hit an internal error.',
  [CLOSE_TAKEN_OVER]: 'Your session was taken over.',
  [CLOSE_FORBIDDEN]: 'Forbidden: you may not use this console.',
  [CLOSE_UNKNOWN_VM]: 'Unknown VM: it does not exist or you hold no role on it.',
  [CLOSE_IDLE]: 'Closed after being idle too long.',
  [CLOSE_DISABLED]: 'The serial console is disabled for this VM.',
  [CLOSE_SESSION_LIMIT]: 'Session limit reached: close another console and reconnect.',
};

// A browser reports a refused upgrade as 1006 before the socket ever opened.
const REFUSED_WORDS =
  'The gateway refused the console connection (the ticket may have expired, the session limit may be ' +
  'reached, or the VM has a writer and does not allow takeover).';

/** The API path of a VM: `/v1/vms/<id><rest>`, the id escaped. */
export function vmPath(vm, rest = '') {
  return `/v1/vms/${encodeURIComponent(vm)}${rest}`;
}

/**
 * The console WebSocket URL on the page's own origin.
 * @param {{protocol: string, host: string}} origin - the page's location
 * @param {string} vm
 * @param {string} ticket - one-time ticket from POST .../console/tickets
 * @param {number|null} from - resume offset, or null for the live tail with replay
 */
export function consoleUrl(origin, vm, ticket, from = null) {
  const query = new URLSearchParams({ ticket });
  if (from !== null) query.set('from', String(from));
  const scheme = origin.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${origin.host}${vmPath(vm, '/console')}?${query}`;
}

/**
 * What to tell the user when a console closes.
 * @returns {{text: string, kind: 'error'|'warning', takenOver: boolean}}
 */
export function closeMessage(code, reason, wasOpen) {
  const takenOver = code === CLOSE_TAKEN_OVER;
  let text = CLOSE_WORDS[code] || `The session closed (code ${code}).`;
  if (takenOver && reason) {
    text = `${reason.charAt(0).toUpperCase()}${reason.slice(1)}. You are disconnected.`;
  } else if (reason && !takenOver) {
    text = `${text} (${reason})`;
  }
  if (!wasOpen && code === CLOSE_ABNORMAL) text = REFUSED_WORDS;
  return { text, kind: takenOver || code >= CLOSE_FORBIDDEN ? 'error' : 'warning', takenOver };
}

/**
 * What to tell a writer that is now a spectator (notice `demoted`), and whether taking the
 * console back can work: only after a takeover (`by`); a role now reader, or a console that
 * moved to a gateway where another session writes (`deny` there), would be refused.
 * @returns {{text: string, canTakeOver: boolean}}
 */
export function demotedMessage(notice) {
  const spectating = 'you are now spectating (read-only).';
  if (notice.reason === 'role_revoked') {
    return { text: `Your role on this VM is now reader: ${spectating}`, canTakeOver: false };
  }
  if (notice.reason === 'writer_exists') {
    const text = `The console moved to a gateway where another session writes: ${spectating}`;
    return { text, canTakeOver: false };
  }
  if (notice.by) return { text: `${notice.by} took over the console: ${spectating}`, canTakeOver: true };
  return { text: `You are now spectating (read-only).`, canTakeOver: false };
}

/** Input as binary messages: relayd refuses one over max_paste_bytes whole, so a larger
 * paste goes as several, in order. */
export function inputMessages(bytes, maxPasteBytes) {
  const max = maxPasteBytes || DEFAULT_MAX_PASTE_BYTES;
  const out = [];
  for (let i = 0; i < bytes.length; i += max) out.push(bytes.subarray(i, i + max));
  return out;
}

/**
 * One console's stream across its connections: what relayd said (role, limits, port)
 * and where the output stands, so that a reconnection resumes at `offset`.
 */
export class ConsoleStream {
  constructor() {
    this.reset();
  }

  /** A new console: nothing received yet. */
  reset() {
    this.offset = null; // absolute offset of the next console byte
    this.firstOffset = null; // where this page's output began
    this.written = 0; // bytes handed to the terminal
    this.role = null;
    this.limits = null;
    this.port = null;
  }

  /** The connection ended: no role until the next hello. */
  detach() {
    this.role = null;
  }

  /**
   * Take one WebSocket message and return what it was:
   * `{type: 'output', bytes}` for console output, the decoded hello, notice or error
   * object, or null for anything else (ignored, as the protocol allows new types).
   */
  receive(data) {
    if (typeof data !== 'string') {
      const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
      this.offset += bytes.length;
      this.written += bytes.length;
      return { type: 'output', bytes };
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return null;
    }
    if (message?.type === 'hello') {
      this.#hello(message);
    } else if (message?.type === 'notice') {
      this.#notice(message);
    } else if (message?.type !== 'error') {
      return null;
    }
    return message;
  }

  #hello(hello) {
    const start = hello.offset - hello.replay;
    this.offset = start;
    if (this.firstOffset === null) this.firstOffset = start;
    this.role = hello.role;
    this.limits = hello.limits;
    this.port = hello.port || 'up';
  }

  #notice(notice) {
    switch (notice.event) {
      case 'port_down':
        this.port = 'down';
        break;
      case 'port_up':
        this.port = 'up';
        break;
      case 'demoted':
        this.role = 'spectator';
        break;
      case 'output_gap':
        this.offset = notice.last + 1;
        break;
      default:
        break;
    }
  }
}

/**
 * How much of what was typed or pasted relayd still holds: it writes input at
 * limits.input_bytes_per_s, so the page estimates the queue from what it sent.
 * `now` is in milliseconds (performance.now()).
 */
export class PasteMeter {
  constructor() {
    this.busyUntil = 0; // when relayd's pacing should have written everything sent
    this.total = 0; // bytes of the paste in progress
  }

  /** A new connection: relayd's queue starts empty. */
  reset() {
    this.busyUntil = 0;
  }

  /** Bytes still queued at `now`. */
  queued(rate, now) {
    return Math.max(0, Math.ceil(((this.busyUntil - now) / 1000) * (rate || 0)));
  }

  /** `n` bytes were sent at `now`; returns the bytes queued after them. */
  sent(n, rate, now) {
    const wasQueued = this.queued(rate, now);
    this.busyUntil = Math.max(this.busyUntil, now) + (n / rate) * 1000;
    this.total = wasQueued > 0 ? this.total + n : n;
    return this.queued(rate, now);
  }
}
