"""What the gateways of one region share, kept in Redis: membership, leases, tickets,
console switches and the console log.

One `ClusterStore` is one gateway's handle on Redis (redis-py's asyncio client;
hiredis, a dependency, parses the replies). Every operation that reads and
then writes is one Lua script, so Redis runs it atomically; the rest are
single commands. Calls that concern many VMs are pipelined: one round trip.

Failures: every call has a deadline (`timeout`, default a third of the lease
period, at most 1 s). A refused connection, a timeout, or any Redis error raises
`ClusterUnavailableError`, the only exception callers need to catch; nothing is
retried here beyond redis-py's one immediate retry on a dead pooled connection
(the caller's next round is the retry).

Key layout, under ``prefix`` (`key_prefix(region)` = ``relayd:{<region>}:``, the
braces make every key of a region one Redis Cluster hash slot, so the scripts
may touch several keys; other regions can share the Redis)::

    gw:<gateway>        string  advertise address, PX = lease period   (heartbeat)
    gwvms:<gateway>     string  a digest of the gateway's configured VM ids, PX = lease
                                period (with the heartbeat; changes when its [[vms]] do)
    gateways            set     gateway ids that heartbeated; dead ones pruned on read
    dataset             string  random id set once; a new one = Redis lost its data
    lease:<vm>          string  "<gateway>:<token>", PX = lease period
    fence:<vm>          string  the VM's fencing counter: the last token issued
    log:<vm>            stream  console output; entry id "<offset>-1", field d = bytes
    logmeta:<vm>        hash    start, end (offsets), bytes (total stored), gaps,
                                reserved (offset), appended (bytes ever stored)
    ticket:<sha256>     string  ticket payload (JSON), PX = ticket lifetime
    switches:<level>    hash    key -> "1"/"0" per level: subscriptions, scale_sets, vms
    switch-times:<level> hash   key -> the time of the override's last change (ms, the
                                server's clock; orders what gateways put back after a loss)
    switches            channel a JSON message per switch change, and {"ownership": gw}
                                when a gateway claimed or released VMs (look now)

Fencing tokens are integers that rise for each VM. A claim issues
``max(counter, floor) + 1`` and stores it as the new counter. A missing counter
(a VM never claimed, or Redis lost its data) starts from the Redis server's
clock in milliseconds (``TIME``), which is above any token issued before unless
the VM changed owner more than once a millisecond on average; tokens are
therefore millisecond-sized numbers, exact in Lua's doubles. `floor` is the
highest token the claiming gateway has seen for the VM, in case the server's
clock is behind. Holders re-assert their own token after data loss (`renew`
re-creates a missing lease when the counter is missing or not above the
token), so a VM keeps its owner and token through a Redis restart.

A console log append is fenced inside Redis: it is refused unless the lease is
``<gateway>:<token>`` and the counter equals the token, so a deposed or frozen
owner can never add bytes. The log continues by absolute offset across owners
(``end`` is kept in Redis): an append that starts past ``end`` records a gap
(output printed while no gateway held the port), one that starts before it
skips what is already stored (a re-send after a timeout writes no byte twice).
The oldest entries are trimmed so at most ``console_log_bytes`` stay stored.

Redis must run with ``maxmemory-policy noeviction`` (the default): an evicted
lease or counter would break the guarantees above. Ticket ids are never logged
and are stored only as SHA-256 hashes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..config import ClusterConfig, Config, dialable_address
from ..errors import ClusterUnavailableError, ConfigError
from ..log import get_logger
from .ownership import Lease

__all__ = [
    "AppendResult",
    "ClusterStore",
    "ClusterUnavailableError",
    "LogSlice",
    "Outgoing",
    "Override",
    "OwnershipNews",
    "RedisTarget",
    "RoundState",
    "SwitchChange",
    "SwitchEvent",
    "SwitchesLost",
    "SwitchesRead",
    "SwitchesResync",
    "key_prefix",
    "vms_digest",
]

log = get_logger(__name__)

Level = Literal["subscriptions", "scale_sets", "vms"]
LEVELS: tuple[Level, ...] = ("subscriptions", "scale_sets", "vms")
DEFAULT_ENTRY_BYTES = 4096
# How far past the stored end an owner's offsets are reserved (each append moves the mark):
# a successor after a crash starts past it. Output an owner handed out beyond it without
# storing it (only while Redis was away) could have its offsets reused; below it, the
# successor announces a gap of at most this many offsets instead.
DEFAULT_RESERVE_AHEAD = 65536
# One script call renews or appends for up to SCRIPT_VMS VMs, an append call until it
# holds about SCRIPT_BYTES of output: few calls per round trip, none holding Redis long.
SCRIPT_VMS = 256
SCRIPT_BYTES = 1 << 20
_CACHE_ENTRIES = 1 << 16  # encoded keys and parsed leases remembered (then started afresh)
_RECONNECT_MIN = 0.1
_RECONNECT_MAX = 2.0
MESSAGE_LOG_INTERVAL = 30.0


def key_prefix(region: str) -> str:
    """The key prefix of a region: ``relayd:{<region>}:`` (one Redis Cluster hash slot)."""
    return f"relayd:{{{region}}}:"


# --- Lua scripts ---------------------------------------------------------------------------


class _Script:
    """A Lua script run by its SHA-1 (EVALSHA), loaded again when Redis forgot it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


# The region's dataset id, set by the first to ask: a new one means Redis lost its data.
_DATASET_OF = """
local function dataset(key, candidate)
  local ds = redis.call('GET', key)
  if not ds then
    redis.call('SET', key, candidate)
    ds = candidate
  end
  return ds
end
"""

_HEARTBEAT = _Script(
    """
-- KEYS: gw:<id>, gateways, dataset, gwvms:<id>
-- ARGV: id, advertise, ttl_ms, new dataset id, digest of the configured VM ids
"""
    + _DATASET_OF
    + """redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return dataset(KEYS[3], ARGV[4])
"""
)

# The heartbeat's dataset part alone, for a gateway that is leaving: it must still notice
# Redis losing its data (it may hold VMs until the drain ends, or be the last gateway).
_DATASET = _Script(
    """
-- KEYS: dataset   ARGV: new dataset id
"""
    + _DATASET_OF
    + """return dataset(KEYS[1], ARGV[1])
"""
)

_LIVE = _Script("""
-- KEYS: gateways   ARGV: prefixes of the heartbeat keys ("...gw:") and VM list digests
-- -> id, advertise, digest ('' if none) per live gateway
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local addr = redis.call('GET', ARGV[1] .. id)
  if addr then
    out[#out + 1] = id
    out[#out + 1] = addr
    out[#out + 1] = redis.call('GET', ARGV[2] .. id) or ''
  else
    redis.call('SREM', KEYS[1], id)
  end
end
return out
""")

_CLAIM = _Script("""
-- KEYS: lease, fence   ARGV: gateway, ttl_ms, floor   -> new token, or nil if held
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local base = tonumber(redis.call('GET', KEYS[2]))
if base == nil then
  local t = redis.call('TIME')
  base = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local floor = tonumber(ARGV[3])
if floor > base then base = floor end
local token = string.format('%d', base + 1)
redis.call('SET', KEYS[2], token)
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
""")

_RENEW = _Script("""
-- KEYS: lease, fence per VM   ARGV: gateway, ttl_ms, one token per VM
-- -> per VM: 1 renewed, 2 re-created, 0 lost
local out = {}
for i = 1, #KEYS / 2 do
  local lease, fence, token = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i + 2]
  local mine = ARGV[1] .. ':' .. token
  local holder = redis.call('GET', lease)
  if holder == mine then
    redis.call('PEXPIRE', lease, ARGV[2])
    out[i] = 1
  elseif holder then
    out[i] = 0
  else
    local counter = tonumber(redis.call('GET', fence))
    if counter ~= nil and counter > tonumber(token) then
      out[i] = 0
    else
      redis.call('SET', fence, token)
      redis.call('SET', lease, mine, 'PX', ARGV[2])
      out[i] = 2
    end
  end
end
return out
""")

_RELEASE = _Script("""
-- KEYS: lease   ARGV: gateway, token   -> 1 released, 0 not ours
if redis.call('GET', KEYS[1]) == ARGV[1] .. ':' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
""")

# A switch's time orders changes made on different gateways (last writer wins when
# they put back what Redis lost): the server's clock in milliseconds, and always past
# the time the key had, so a clock that went back never makes a change look older.
_SWITCH_TIME = """
local function switch_time(times, key)
  local now = redis.call('TIME')
  local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local had = tonumber(redis.call('HGET', times, key) or '0') or 0
  if had >= at then at = had + 1 end
  return at
end
"""

_SET_SWITCH = _Script(
    _SWITCH_TIME
    + """
-- KEYS: switches:<level>, switch-times:<level>
-- ARGV: key, "1"/"0", channel, message (a JSON object the time is added to) -> the time
local at = string.format('%d', switch_time(KEYS[2], ARGV[1]))
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], at)
redis.call('PUBLISH', ARGV[3], string.sub(ARGV[4], 1, -2) .. ', "at": ' .. at .. '}')
return at
"""
)

# Putting back an override Redis lost (or never got): written only if it is the later
# change, by time; on a tie, a disabled console stays disabled. Every gateway puts back
# what it knew, in any order, and the region ends the same.
_RESTORE_SWITCH = _Script("""
-- KEYS: switches:<level>, switch-times:<level>
-- ARGV: key, "1"/"0", time, channel, message (with its time)   -> 1 written, 0 not
local have = redis.call('HGET', KEYS[1], ARGV[1])
if have then
  local had = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') or 0
  local at = tonumber(ARGV[3])
  if had > at or (had == at and (have == ARGV[2] or have ~= '1')) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
""")

# The fence every write of an owner passes, inside its script. A newer holder or token:
# 'fenced'; ours lapsed and nobody else's: 'lapsed' (renew re-creates it); ours: nil.
_FENCED = """
local function fenced(lease, fence, gateway, token)
  local mine = gateway .. ':' .. token
  local holder = redis.call('GET', lease)
  local counter = redis.call('GET', fence)
  if holder == mine and counter == token then return nil end
  if (holder and holder ~= mine) or (counter and tonumber(counter) > tonumber(token)) then
    return 'fenced'
  end
  return 'lapsed'
end
"""

# Many VMs' output in one call: typing echoes a byte at a time on hundreds of consoles,
# and a script call per VM cost the owner more CPU than relaying the keys.
_APPEND = _Script(
    """
-- KEYS: lease, fence, log, logmeta per VM
-- ARGV: gateway, capacity, entry bytes, reserve ahead, then token, start offset, mark, data
--       per VM (mark: reserve offsets up to it too; the owner's handed-out end plus what
--       the VM may print before its next append lands)
-- -> per VM: {'ok', start, end, written, skipped, gap_from, gap_to} | {'fenced'} | {'lapsed'}
"""
    + _FENCED
    + """local gateway, cap = ARGV[1], tonumber(ARGV[2])
local piece, ahead = tonumber(ARGV[3]), tonumber(ARGV[4])

local function append(lease, fence, log, logmeta, token, at, mark, data)
  local status = fenced(lease, fence, gateway, token)
  if status then return {status} end
  local meta = redis.call('HMGET', logmeta, 'start', 'end', 'bytes', 'reserved', 'appended')
  local first, last, total = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])
  local reserved, appended = tonumber(meta[4] or '0'), tonumber(meta[5] or '0')
  local gap_from, gap_to, skipped = -1, -1, 0
  if last == nil then
    redis.call('DEL', log)
    first, last, total = at, at, 0
  elseif at > last then
    gap_from, gap_to = last, at
    last = at
    redis.call('HINCRBY', logmeta, 'gaps', 1)
  elseif at < last then
    skipped = math.min(#data, last - at)
    data = string.sub(data, skipped + 1)
  end
  if #data > cap then
    last = last + #data - cap
    data = string.sub(data, #data - cap + 1)
  end
  local written = #data
  local pos = 1
  while pos <= written do
    local part = string.sub(data, pos, pos + piece - 1)
    redis.call('XADD', log, string.format('%d-1', last), 'd', part)
    last = last + #part
    pos = pos + piece
  end
  total = total + written
  local cursor = nil
  while total > cap do
    local batch = redis.call('XRANGE', log, cursor or '-', '+', 'COUNT', 64)
    if #batch == 0 then break end
    for _, entry in ipairs(batch) do
      if total <= cap then break end
      total = total - #entry[2][2]
      cursor = '(' .. entry[1]
    end
  end
  if cursor then
    local kept = redis.call('XRANGE', log, cursor, '+', 'COUNT', 1)
    if kept[1] then
      first = tonumber(string.match(kept[1][1], '^(%d+)-'))
      redis.call('XTRIM', log, 'MINID', kept[1][1])
    else
      first = last
      redis.call('XTRIM', log, 'MAXLEN', 0)
    end
  elseif written > 0 and total == written then
    first = last - written
  end
  -- Offsets past what is stored are this owner's: a successor starts after them, so
  -- output handed to clients but never stored is a gap, never a reused offset.
  -- A re-send that stores nothing leaves the mark: it may come after a settle.
  if written > 0 then reserved = math.max(reserved, last + ahead, mark) end
  -- Counted here, not only by the gateway: a call whose answer came too late still stored.
  redis.call('HSET', logmeta, 'start', string.format('%d', first),
             'end', string.format('%d', last), 'bytes', string.format('%d', total),
             'reserved', string.format('%d', reserved),
             'appended', string.format('%d', appended + written))
  return {'ok', first, last, written, skipped, gap_from, gap_to}
end

local out = {}
for i = 1, #KEYS / 4 do
  local k, a = 4 * (i - 1), 4 + 4 * (i - 1)
  out[i] = append(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4],
                  ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), ARGV[a + 4])
end
return out
"""
)

_RESERVE = _Script(
    """
-- KEYS: lease, fence, logmeta
-- ARGV: gateway, token, offset, 'settle' or 'reserve'
-- -> {'ok', reserved} | {'fenced'} | {'lapsed'}
"""
    + _FENCED
    + """local status = fenced(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if status then return {status} end
local reserved = tonumber(redis.call('HGET', KEYS[3], 'reserved') or '0')
local want = tonumber(ARGV[3])
if ARGV[4] == 'settle' then
  -- Everything handed out below `want` is stored: the next owner starts at the end,
  -- or at `want` if that is later (the owner started past its predecessor's mark).
  reserved = math.max(tonumber(redis.call('HGET', KEYS[3], 'end') or '0'), want)
  redis.call('HSET', KEYS[3], 'reserved', string.format('%d', reserved))
elseif want > reserved then
  reserved = want
  redis.call('HSET', KEYS[3], 'reserved', string.format('%d', reserved))
end
return {'ok', reserved}
"""
)

_RAISE_FLOOR = _Script("""
-- KEYS: logmeta   ARGV: offset   -> the floor now
-- Not fenced: it only ever raises where a new owner's offsets start (a gap at worst).
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local want = tonumber(ARGV[1])
if want > reserved then
  redis.call('HSET', KEYS[1], 'reserved', string.format('%d', want))
  return want
end
return reserved
""")

_READ = _Script("""
-- KEYS: log, logmeta   ARGV: from offset, max bytes   -> {start, end, data offset, data}
local meta = redis.call('HMGET', KEYS[2], 'start', 'end')
local first, last = tonumber(meta[1]), tonumber(meta[2])
if last == nil then return {0, 0, 0, ''} end
local from = math.max(tonumber(ARGV[1]), first)
local want = tonumber(ARGV[2])
if from >= last or want <= 0 then return {first, last, math.min(from, last), ''} end
local out, got, at, pos = {}, 0, nil, nil
local cursor = '-'
local prev = redis.call('XREVRANGE', KEYS[1], string.format('%d-1', from), '-', 'COUNT', 1)
if prev[1] then
  local off = tonumber(string.match(prev[1][1], '^(%d+)-'))
  local d = prev[1][2][2]
  if off + #d > from then
    local part = string.sub(d, from - off + 1, from - off + want)
    out[1] = part
    got, at, pos = #part, from, from + #part
  end
  cursor = '(' .. prev[1][1]
end
while got < want do
  local batch = redis.call('XRANGE', KEYS[1], cursor, '+', 'COUNT', 256)
  for _, entry in ipairs(batch) do
    local off = tonumber(string.match(entry[1], '^(%d+)-'))
    if at == nil then
      at, pos = off, off
    elseif off ~= pos then
      return {first, last, at, table.concat(out)}
    end
    local part = string.sub(entry[2][2], 1, want - got)
    out[#out + 1] = part
    got, pos = got + #part, pos + #part
    if got >= want then break end
  end
  if #batch < 256 then break end
  cursor = '(' .. batch[#batch][1]
end
return {first, last, at or last, table.concat(out)}
""")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundState:
    """What one ownership round reads, in one round trip (see `ClusterStore.observe`)."""

    dataset: str  # changes when Redis lost its data
    live: dict[str, str]  # gateway id -> advertise address
    holders: dict[str, Lease | None]  # vm -> lease
    # gateway id -> a digest of its configured VM ids ('' from a gateway that sets none)
    vm_lists: dict[str, str] = field(default_factory=dict)


class Outgoing(NamedTuple):
    """One VM's output for `ClusterStore.append_many`."""

    vm: str
    token: int  # the fencing token our lease was granted with
    start: int  # absolute offset of the first byte of `chunks`
    chunks: Sequence[bytes]
    # Offsets reserved up to here too, if the call stores a byte: past everything the
    # owner handed out, so a successor never reuses an offset a client holds.
    mark: int = 0


@dataclass(frozen=True)
class AppendResult:
    """What a console-log append did.

    ``status``: "ok"; "fenced" (our token was superseded: close the port, keep
    nothing); "lapsed" (our lease is missing but nobody took the VM: `renew`
    re-creates it, then append again). The other fields are meaningful only for "ok".
    """

    status: Literal["ok", "fenced", "lapsed"]
    start: int = 0  # log start after the append
    end: int = 0  # log end after the append
    written: int = 0  # bytes stored by this call
    skipped: int = 0  # bytes that were already stored (a re-send)
    gap: tuple[int, int] | None = None  # [from, to): output no gateway stored

    @property
    def ok(self) -> bool:
        """Whether the append was accepted."""
        return self.status == "ok"


@dataclass(frozen=True)
class LogSlice:
    """A read of the console log: `data` starts at `offset`; `start`/`end` bound the log.

    ``offset > from_offset`` means the bytes before it are gone (trimmed) or were
    never stored (a gap); ``data`` is always contiguous.
    """

    start: int
    end: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class SwitchChange:
    """A console switch was set on some gateway (`ClusterStore.set_switch`)."""

    level: Level
    key: str
    enabled: bool
    at: int = field(default=0, compare=False)  # its time; 0 from an older release


@dataclass(frozen=True)
class Override:
    """A switch override with its time, as a gateway puts it back (`restore_switches`)."""

    level: Level
    key: str
    enabled: bool
    at: int


@dataclass
class SwitchesRead:
    """The region's overrides, their times (absent: none known) and its dataset id (None
    until a heartbeat sets one: a different one than at the last read means Redis lost
    its data in between, overrides included)."""

    switches: dict[Level, dict[str, bool]]
    times: dict[Level, dict[str, int]]
    dataset: str | None


@dataclass(frozen=True)
class SwitchesResync:
    """The watcher is (re)subscribed: changes may have been missed, re-read `all_switches`."""


@dataclass(frozen=True)
class SwitchesLost:
    """The subscription broke (`reason`); the watcher is reconnecting."""

    reason: str


@dataclass(frozen=True)
class OwnershipNews:
    """`gateway` claimed or released VMs: the others run their round now, not on schedule."""

    gateway: str


SwitchEvent = SwitchChange | SwitchesResync | SwitchesLost | OwnershipNews


# A lease as `_CLAIM` and `_RENEW` write it: "<gateway>:<token>", the token in decimal.
_LEASE = re.compile(rb"(.+):(0|[1-9][0-9]{0,18})", re.DOTALL)


def _lease(raw: bytes) -> Lease:
    """A lease value as the scripts write it.

    Raises:
        ValueError: anything else (not UTF-8, no gateway, a token that is no decimal number).
    """
    match = _LEASE.fullmatch(raw)
    if match is None:
        raise ValueError("not <gateway>:<token>")
    return Lease(match[1].decode(), int(match[2]))


class _Malformed:
    """Values in Redis that no gateway of this version wrote, each logged once.

    Redis holds what any of its clients wrote (another version, an operator's
    command, a bad restore). A gateway skips such a value rather than raise out of
    an ownership round, which would end its node and with it the gateway.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[str, bytes]] = set()
        self.messages_skipped = 0
        self._message_logged: float | None = None

    def skip(self, key: str, raw: bytes, why: str) -> None:
        if (key, raw) in self._seen:
            return
        if len(self._seen) >= _CACHE_ENTRIES:
            self._seen.clear()
        self._seen.add((key, raw))
        log.warning("cluster_malformed_state", key=key, value=repr(raw[:64]), error=why)

    def skip_message(self, raw: bytes) -> None:
        """A channel message this version cannot read (one a newer version may send):
        logged at most every `MESSAGE_LOG_INTERVAL`, so a flood of them is no log flood."""
        self.messages_skipped += 1
        now = time.monotonic()
        if self._message_logged is None or now - self._message_logged >= MESSAGE_LOG_INTERVAL:
            self._message_logged = now
            log.warning(
                "cluster_channel_message_skipped",
                skipped=self.messages_skipped,
                value=repr(raw[:64]),
            )


# --- the store -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how this gateway proves itself to it (`[cluster]`)."""

    url: str = field(repr=False)  # may hold a password
    ca: Path | None = None  # rediss://: Redis's certificate verifies against this CA
    cert: Path | None = None  # rediss://: this gateway's client certificate
    key: Path | None = None
    password: str | None = field(default=None, repr=False)  # the URL's user's (a file's)

    @classmethod
    def from_config(cls, cluster: ClusterConfig) -> RedisTarget:
        """The target `cluster` names, its password read from its file now (a rotated
        password is read again at a reload).

        Raises:
            ValueError: the password file cannot be read (or is empty).
        """
        return cls(
            cluster.redis,
            cluster.redis_ca,
            cluster.redis_cert,
            cluster.redis_key,
            cluster.redis_password(),
        )

    def client_options(self) -> dict[str, Any]:
        """redis-py's connection options beyond the URL's."""
        options: dict[str, Any] = {}
        if self.password is not None:
            options["password"] = self.password
        if urlsplit(self.url).scheme == "rediss":
            options["ssl_min_version"] = ssl.TLSVersion.TLSv1_2
            if self.ca is not None:
                options["ssl_ca_certs"] = str(self.ca)
            if self.cert is not None and self.key is not None:
                options["ssl_certfile"], options["ssl_keyfile"] = str(self.cert), str(self.key)
        return options


class ClusterStore:
    """One gateway's handle on the region's shared state in Redis."""

    def __init__(
        self,
        target: RedisTarget | str,
        *,
        gateway_id: str,
        prefix: str,
        lease_ttl: float = 3.0,
        console_log_bytes: int = 1 << 20,
        timeout: float | None = None,
        entry_bytes: int = DEFAULT_ENTRY_BYTES,
        reserve_ahead: int = DEFAULT_RESERVE_AHEAD,
    ) -> None:
        """Args:
        target: the Redis to use, or only its redis://, rediss:// or unix:// URL
            (validated by the config).
        gateway_id: this gateway (leases, heartbeats and appends are in its name).
        prefix: the key prefix, normally `key_prefix(region)`.
        lease_ttl: seconds a lease and a heartbeat last without renewal.
        console_log_bytes: most console output stored per VM.
        timeout: deadline of every call; default ``min(1, lease_ttl / 3)``.
        entry_bytes: largest stream entry (a trimmed log keeps at least
            ``console_log_bytes - entry_bytes``).
        """
        self.gateway_id = gateway_id
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self.console_log_bytes = console_log_bytes
        self.timeout = min(1.0, lease_ttl / 3) if timeout is None else timeout
        self.entry_bytes = max(1, min(entry_bytes, console_log_bytes))
        self.reserve_ahead = reserve_ahead
        self._keys_of: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}
        self._leases_seen: dict[bytes, Lease] = {}
        self._malformed = _Malformed()
        self.target = target if isinstance(target, RedisTarget) else RedisTarget(target)
        self._redis: Redis = self._client(self.target)
        self.switch_watch_up = False  # the switch watcher is subscribed right now
        self._retargeted = asyncio.Event()  # set by `retarget`, for the switch watcher
        # redis-py leaves execute_command unannotated; this is the one typed door to it.
        self._command: Callable[..., Awaitable[Any]] = self._redis.execute_command

    def _client(self, target: RedisTarget) -> Redis:
        return Redis.from_url(
            target.url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 1),
            client_name=f"relayd-{self.gateway_id}",
            **target.client_options(),
        )

    async def retarget(self, target: RedisTarget) -> None:
        """Use `target` from now on (a reload moved Redis, or changed how this gateway
        proves itself to it), closing the old client.

        Calls under way on the old one fail (the callers' next round is the retry) and
        the switch watcher subscribes again; a new server is seen as a new dataset.
        """
        old = self._redis
        self.target = target
        self._redis = self._client(target)
        self._command = self._redis.execute_command
        self._retargeted.set()  # the switch watcher leaves the old client at once
        await old.aclose()

    @classmethod
    def from_config(cls, cfg: Config) -> ClusterStore:
        """The store for a config with a `[cluster]` section.

        Raises:
            ValueError: the config has no `[cluster]` section.
            ConfigError: the Redis password file cannot be read (any more).
        """
        if cfg.cluster is None:
            raise ValueError("the config has no [cluster] section")
        try:
            target = RedisTarget.from_config(cfg.cluster)
        except ValueError as exc:
            raise ConfigError(str(cfg.path), "cluster.redis_password_file", str(exc)) from None
        return cls(
            target,
            gateway_id=cfg.cluster.gateway_id,
            prefix=key_prefix(cfg.gateway.region),
            lease_ttl=cfg.cluster.lease_ttl,
            console_log_bytes=cfg.limits.console_log_bytes,
        )

    async def close(self) -> None:
        """Close every connection."""
        await self._redis.aclose()

    # -- plumbing -------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl * 1000))

    @asynccontextmanager
    async def _deadline(self, what: str, seconds: float | None = None) -> AsyncIterator[None]:
        """Bound a call by `timeout` and turn every failure into ClusterUnavailableError."""
        limit = self.timeout if seconds is None else seconds
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise ClusterUnavailableError(
                f"redis did not answer {what} within {limit:g} s"
            ) from None
        except (RedisError, OSError) as exc:
            raise ClusterUnavailableError(
                f"redis {what} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        """Run script calls and plain commands in one round trip, results in order.

        Scripts Redis no longer knows (it restarted) are loaded and their calls run
        again; a call that failed with NOSCRIPT did nothing, so this is safe.
        """
        results = await self._send(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            for source in {c.script.source for c in calls if c.script is not None}:
                await self._command("SCRIPT", "LOAD", source)
            again = await self._send([calls[i] for i in missing])
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    async def _send(self, calls: Sequence[_Call]) -> list[Any]:
        pipe: Pipeline = self._redis.pipeline(transaction=False)
        queue: Callable[..., object] = pipe.execute_command
        for call in calls:
            if call.script is None:
                queue(*call.args)
            else:
                queue("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    # -- membership -----------------------------------------------------------------------

    def _heartbeat_call(self, advertise: str, vms_digest: str) -> _Call:
        keys = (
            self._key("gw", self.gateway_id),
            self._key("gateways"),
            self._key("dataset"),
            self._key("gwvms", self.gateway_id),
        )
        # A fresh candidate each time: Redis keeps the first one it is given, so after
        # data loss the id changes even for the gateway that sets it again.
        args = (self.gateway_id, advertise, self._ttl_ms, secrets.token_hex(8), vms_digest)
        return _Call(_HEARTBEAT, keys, args)

    def _live_call(self) -> _Call:
        prefixes = (self._key("gw", ""), self._key("gwvms", ""))
        return _Call(_LIVE, (self._key("gateways"),), prefixes)

    async def heartbeat(self, advertise: str, vms_digest: str = "") -> str:
        """Say this gateway is alive for one lease period; returns the dataset id.

        A dataset id different from the last one seen means Redis lost its data
        (restarted empty): start the ownership grace period and re-create state.
        `vms_digest`: `vms_digest` of the configured VM ids, for the other gateways.
        """
        async with self._deadline("heartbeat"):
            (dataset,) = await self._pipeline([self._heartbeat_call(advertise, vms_digest)])
        return bytes(dataset).decode(errors="backslashreplace")

    async def leave(self) -> None:
        """Remove this gateway's heartbeat at once (clean shutdown)."""
        async with self._deadline("leave"):
            await self._command("DEL", self._key("gw", self.gateway_id))

    async def live_gateways(self) -> dict[str, str]:
        """Every gateway with a heartbeat, with its advertise address."""
        async with self._deadline("live_gateways"):
            (flat,) = await self._pipeline([self._live_call()])
        return self._gateways(flat)[0]

    async def id_live_elsewhere(self, advertise: str) -> str | None:
        """Where another gateway with this gateway's id is live, if it is (None if not).

        Two gateways with one `gateway_id` overwrite each other's heartbeat and share
        each other's leases: the one that leaves takes the other's VMs away with it.
        A heartbeat with this id at this `advertise` is this gateway's own (a restart
        within a lease period, or `check-config` beside the running daemon).
        """
        seen = (await self.live_gateways()).get(self.gateway_id)
        return seen if seen is not None and seen != advertise else None

    def id_conflict(self, elsewhere: str, advertise: str) -> str:
        """What to tell the operator when `id_live_elsewhere` found another gateway."""
        return (
            f"gateway {self.gateway_id!r} is already live in this region at {elsewhere}, "
            f"not at this gateway's advertise {advertise}: give each gateway its own "
            f"gateway_id (if this gateway moved, stop it at {elsewhere} and start it "
            f"again after lease_ttl)"
        )

    async def observe(
        self,
        advertise: str,
        vms: Iterable[str],
        *,
        heartbeat: bool = True,
        vms_digest: str = "",
    ) -> RoundState:
        """Heartbeat, read the live gateways and every VM's lease: one round trip.

        Args:
            vms_digest: `vms_digest` of this gateway's configured VM ids (heartbeat).
            heartbeat: False for a gateway that is leaving: it watches the region
                without counting itself in it (see `leave`), and still learns
                whether Redis lost its data.
        """
        vm_list = list(vms)
        if heartbeat:
            first = self._heartbeat_call(advertise, vms_digest)
        else:
            first = _Call(_DATASET, (self._key("dataset"),), (secrets.token_hex(8),))
        calls = [first, self._live_call()]
        if vm_list:
            calls.append(_Call(None, (), ("MGET", *(self._vm_keys(vm)[0] for vm in vm_list))))
        async with self._deadline("observe"):
            results = await self._pipeline(calls)
        # Only ever compared: any bytes will do (one no gateway wrote must not raise).
        dataset = bytes(results.pop(0)).decode(errors="backslashreplace")
        leases = results[1] if vm_list else []
        live, lists = self._gateways(results[0])
        return RoundState(
            dataset=dataset,
            live=live,
            holders={
                vm: self._parse_lease(vm, raw) for vm, raw in zip(vm_list, leases, strict=True)
            },
            vm_lists=lists,
        )

    def _gateways(self, flat: Sequence[bytes]) -> tuple[dict[str, str], dict[str, str]]:
        """`_LIVE`'s answer: (gateway -> advertise address, gateway -> VM ids digest).

        A gateway whose id or address is not what a gateway writes (an address no other
        gateway could dial) is left out, logged once: routing to it could only fail.
        """
        live: dict[str, str] = {}
        lists: dict[str, str] = {}
        for i in range(0, len(flat), 3):
            raw_id, raw_address = bytes(flat[i]), bytes(flat[i + 1])
            try:
                gateway, address = raw_id.decode(), raw_address.decode()
                dialable_address(address)
            except ValueError as exc:  # UnicodeDecodeError is one
                key = self._key("gw", raw_id.decode(errors="backslashreplace"))
                self._malformed.skip(key, raw_address, str(exc))
                continue
            live[gateway] = address
            lists[gateway] = bytes(flat[i + 2]).decode(errors="replace")
        return live, lists

    # -- leases ---------------------------------------------------------------------------

    def _lease_keys(self, vm: str) -> tuple[bytes, bytes]:
        lease, fence, _, _ = self._vm_keys(vm)
        return lease, fence

    def _vm_keys(self, vm: str) -> tuple[bytes, bytes, bytes, bytes]:
        """The VM's lease, fence, log and logmeta keys, encoded once: every round and
        every append names hundreds of them."""
        keys = self._keys_of.get(vm)
        if keys is None:
            if len(self._keys_of) >= _CACHE_ENTRIES:
                self._keys_of.clear()
            keys = self._keys_of[vm] = (
                self._key("lease", vm).encode(),
                self._key("fence", vm).encode(),
                self._key("log", vm).encode(),
                self._key("logmeta", vm).encode(),
            )
        return keys

    def _parse_lease(self, vm: str, raw: bytes | None) -> Lease | None:
        """`_lease`, remembered: a round reads the same few thousand leases each time.

        A malformed value reads as no lease (logged once): the VM is never claimed over
        it (a claim needs the key gone), and a holder whose lease it replaced loses it.
        """
        if raw is None:
            return None
        lease = self._leases_seen.get(raw)
        if lease is None:
            try:
                lease = _lease(raw)
            except ValueError as exc:
                self._malformed.skip(self._key("lease", vm), raw, str(exc))
                return None
            if len(self._leases_seen) >= _CACHE_ENTRIES:
                self._leases_seen.clear()
            self._leases_seen[raw] = lease
        return lease

    async def claim(self, vm: str, floor: int = 0) -> int | None:
        """Take the VM's lease if nobody holds it; the new fencing token, or None if held.

        Args:
            vm: the VM id.
            floor: the token is above this (the highest token seen for the VM).
        """
        return (await self.claim_many({vm: floor}))[vm]

    async def claim_many(self, floors: Mapping[str, int]) -> dict[str, int | None]:
        """`claim` for several VMs (vm -> floor) in one round trip."""
        calls = [
            _Call(_CLAIM, self._lease_keys(vm), (self.gateway_id, self._ttl_ms, floor))
            for vm, floor in floors.items()
        ]
        async with self._deadline("claim"):
            results = await self._pipeline(calls)
        return {vm: None if r is None else int(r) for vm, r in zip(floors, results, strict=True)}

    async def renew(self, vm: str, token: int) -> bool:
        """Extend our lease; re-create it if it lapsed and nobody took the VM since.

        False: the VM has another holder or a newer token: close its port.
        """
        return (await self.renew_many({vm: token}))[vm]

    async def renew_many(self, tokens: Mapping[str, int]) -> dict[str, bool]:
        """`renew` for several VMs (vm -> token): one script call per `SCRIPT_VMS` VMs."""
        vms = list(tokens)
        calls = []
        for group in _groups(vms, SCRIPT_VMS):
            keys = [key for vm in group for key in self._lease_keys(vm)]
            args = (self.gateway_id, self._ttl_ms, *(b"%d" % tokens[vm] for vm in group))
            calls.append(_Call(_RENEW, keys, args))
        async with self._deadline("renew"):
            results = await self._pipeline(calls)
        answers = [int(r) > 0 for result in results for r in result]
        return dict(zip(vms, answers, strict=True))

    async def release(self, vm: str, token: int) -> bool:
        """Delete our lease (only if it is still ours with this token)."""
        return (await self.release_many({vm: token}))[vm]

    async def release_many(self, tokens: Mapping[str, int]) -> dict[str, bool]:
        """`release` for several VMs (vm -> token) in one round trip."""
        calls = [
            _Call(_RELEASE, (self._key("lease", vm),), (self.gateway_id, token))
            for vm, token in tokens.items()
        ]
        async with self._deadline("release"):
            results = await self._pipeline(calls)
        return {vm: int(r) == 1 for vm, r in zip(tokens, results, strict=True)}

    async def holder(self, vm: str) -> Lease | None:
        """The VM's current lease, or None."""
        return (await self.holders([vm]))[vm]

    async def holders(self, vms: Iterable[str]) -> dict[str, Lease | None]:
        """The current lease of each VM (one MGET)."""
        vm_list = list(vms)
        if not vm_list:
            return {}
        async with self._deadline("holders"):
            raw = await self._command("MGET", *(self._vm_keys(vm)[0] for vm in vm_list))
        return {vm: self._parse_lease(vm, r) for vm, r in zip(vm_list, raw, strict=True)}

    # -- tickets --------------------------------------------------------------------------

    def _ticket_key(self, ticket_id: str) -> str:
        return self._key("ticket", hashlib.sha256(ticket_id.encode()).hexdigest())

    async def put_ticket(self, ticket_id: str, payload: str, ttl: float) -> bool:
        """Store a ticket for `ttl` seconds; False if that id already exists.

        Only a hash of `ticket_id` is stored. The payload is what redeeming returns
        (JSON of principal, VM, mode).
        """
        ms = max(1, round(ttl * 1000))
        async with self._deadline("put_ticket"):
            ok = await self._command("SET", self._ticket_key(ticket_id), payload, "PX", ms, "NX")
        return bool(ok)

    async def take_ticket(self, ticket_id: str) -> str | None:
        """Redeem a ticket: its payload, or None if unknown, expired or already taken.

        GETDEL is atomic: of two gateways redeeming the same ticket at once, one wins.
        """
        async with self._deadline("take_ticket"):
            raw = await self._command("GETDEL", self._ticket_key(ticket_id))
        # Not UTF-8 (no gateway wrote it) becomes a payload the redeemer refuses.
        return None if raw is None else bytes(raw).decode(errors="replace")

    # -- console switches -----------------------------------------------------------------

    async def set_switch(self, level: Level, key: str, enabled: bool) -> int:
        """Persist a switch override and announce it to every gateway (atomically).

        `key` is the subscription id, ``sub/rg/ss`` for a scale set, or the VM id.

        Returns:
            The change's time (`_SWITCH_TIME`), which orders it against what other
            gateways put back after Redis loses its data (`restore_switches`).
        """
        message = json.dumps({"level": level, "key": key, "enabled": enabled})
        args = (key, "1" if enabled else "0", self._key("switches"), message)
        async with self._deadline("set_switch"):
            (at,) = await self._pipeline([_Call(_SET_SWITCH, self._switch_keys(level), args)])
        return int(at)

    async def restore_switches(self, overrides: Sequence[Override]) -> int:
        """Put back overrides the region may have lost; each only where it is the later
        change (`_RESTORE_SWITCH`), and announced like a change when written (one round
        trip).

        Returns:
            How many were written.
        """
        calls = []
        for o in overrides:
            message = json.dumps({"level": o.level, "key": o.key, "enabled": o.enabled, "at": o.at})
            value = "1" if o.enabled else "0"
            args = (o.key, value, o.at, self._key("switches"), message)
            calls.append(_Call(_RESTORE_SWITCH, self._switch_keys(o.level), args))
        if not calls:
            return 0
        async with self._deadline("restore_switches"):
            return sum(int(written) for written in await self._pipeline(calls))

    def _switch_keys(self, level: Level) -> tuple[str, str]:
        return self._key("switches", level), self._key("switch-times", level)

    async def announce_owners(self) -> None:
        """Tell every gateway that leases changed hands here (on the switches channel).

        Only a hint, so a VM handed over moves in milliseconds rather than at the
        next round of each gateway: a lost message costs that round, nothing more.
        """
        message = json.dumps({"ownership": self.gateway_id})
        async with self._deadline("announce_owners"):
            await self._command("PUBLISH", self._key("switches"), message)

    async def all_switches(self) -> dict[Level, dict[str, bool]]:
        """Every persisted override, per level (one round trip)."""
        return (await self.read_switches()).switches

    async def read_switches(self) -> SwitchesRead:
        """Every persisted override with its time, and the dataset id they belong to (one
        round trip)."""
        calls = [
            _Call(None, (), ("HGETALL", key))
            for level in LEVELS
            for key in self._switch_keys(level)
        ]
        calls.append(_Call(None, (), ("GET", self._key("dataset"))))
        async with self._deadline("all_switches"):
            results = await self._pipeline(calls)
        raw_dataset = results.pop()
        dataset = None if raw_dataset is None else bytes(raw_dataset).decode("ascii", "replace")
        read = SwitchesRead({}, {}, dataset)
        for i, level in enumerate(LEVELS):
            values, times = results[2 * i], dict(_hash_items(results[2 * i + 1]))
            read.switches[level], read.times[level] = {}, {}
            for k, v in _hash_items(values):
                try:
                    name = bytes(k).decode()
                except UnicodeDecodeError:  # no gateway wrote it: no configured name matches
                    self._malformed.skip(self._key("switches", level), bytes(k), "not UTF-8")
                    continue
                read.switches[level][name] = v == b"1"
                # No time (set by an older release, or by hand): older than any change.
                with suppress(KeyError, ValueError):
                    read.times[level][name] = int(times[k])
        return read

    async def watch_switches(
        self, on_event: Callable[[SwitchEvent], None], *, ping_interval: float = 1.0
    ) -> None:
        """Deliver switch changes from every gateway until cancelled; never returns.

        `on_event` gets `SwitchesResync` each time the subscription is (re)made,
        then a `SwitchChange` per change (and `OwnershipNews` per announcement, see
        `announce_owners`), and `SwitchesLost` when the connection
        breaks or stays silent for ``ping_interval + timeout`` (a hung Redis). It is
        then re-made, waiting 0.1 s doubling to 2 s between failed attempts; changes
        made meanwhile are covered by the next `SwitchesResync`. `on_event` must not
        block; an exception from it ends the watch.
        """
        delay = _RECONNECT_MIN
        reported = False
        while True:
            try:
                await self._watch_once(on_event, ping_interval)
                delay = _RECONNECT_MIN
                continue  # `retarget`: subscribe on the new client at once
            except ClusterUnavailableError as exc:
                if self.switch_watch_up:
                    self.switch_watch_up = False
                    reported = False
                    delay = _RECONNECT_MIN
                if not reported:
                    reported = True
                    log.warning("cluster_switch_watch_lost", error=str(exc))
                    on_event(SwitchesLost(str(exc)))
            await asyncio.sleep(delay)
            delay = min(_RECONNECT_MAX, delay * 2)

    async def _watch_once(
        self, on_event: Callable[[SwitchEvent], None], ping_interval: float
    ) -> None:
        client = self._redis
        self._retargeted.clear()
        pubsub = client.pubsub()
        try:
            async with self._deadline("subscribe"):
                await pubsub.subscribe(self._key("switches"))
            loop = asyncio.get_running_loop()
            heard = loop.time()
            pinged = False
            while True:
                async with self._deadline("pubsub", ping_interval + self.timeout):
                    message = await self._message(pubsub, ping_interval)
                if self._redis is not client:
                    return  # `retarget`: the caller subscribes on the new client
                now = loop.time()
                if message is None:
                    if now - heard > ping_interval + self.timeout:
                        raise ClusterUnavailableError(
                            f"pub/sub connection silent for {now - heard:.1f} s"
                        )
                    if not pinged:
                        async with self._deadline("pubsub ping"):
                            await pubsub.ping()
                        pinged = True
                    continue
                heard, pinged = now, False
                if message["type"] == "subscribe":
                    self.switch_watch_up = True
                    on_event(SwitchesResync())
                elif message["type"] == "message":
                    event = _channel_event(message["data"])
                    if event is not None:
                        on_event(event)
                    else:
                        self._malformed.skip_message(bytes(message["data"]))
        finally:
            await pubsub.aclose()

    async def _message(self, pubsub: PubSub, ping_interval: float) -> dict[str, Any] | None:
        """The subscription's next message (None: none within `ping_interval`), or None at
        once when `retarget` replaced the client: the old subscription's connection, closed
        with the old client, would reconnect as it (to the old server, with the old
        password) and hear nothing the region says on the new one."""
        reading = asyncio.ensure_future(pubsub.get_message(timeout=ping_interval))
        moved = asyncio.ensure_future(self._retargeted.wait())
        try:
            await asyncio.wait((reading, moved), return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            if not reading.done() or moved.done():
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        if moved.done() and not moved.cancelled():
            return None
        message: dict[str, Any] | None = reading.result()
        return message

    # -- console log ----------------------------------------------------------------------

    def _append_call(self, batches: Sequence[Outgoing]) -> _Call:
        keys: list[str | bytes] = []
        cap = self.console_log_bytes
        args: list[Any] = [self.gateway_id, cap, self.entry_bytes, self.reserve_ahead]
        for vm, token, start_offset, chunks, mark in batches:
            data = b"".join(chunks)
            # More than the log holds is cut here, so it never crosses the network.
            if len(data) > cap:
                start_offset += len(data) - cap
                data = data[len(data) - cap :]
            keys += self._vm_keys(vm)
            args += (b"%d" % token, b"%d" % start_offset, b"%d" % mark, data)
        return _Call(_APPEND, keys, args)

    async def append(
        self, vm: str, token: int, start_offset: int, chunks: Sequence[bytes], mark: int = 0
    ) -> AppendResult:
        """Add console output at `start_offset`, fenced by our token: one round trip.

        Args:
            vm: the VM id.
            token: the fencing token our lease was granted with.
            start_offset: absolute offset of the first byte of `chunks`.
            chunks: the output, in order (stored in entries of at most `entry_bytes`).
            mark: reserve offsets up to here too (see `Outgoing`); the call always
                reserves `reserve_ahead` past what it stored.
        """
        return (await self.append_many([Outgoing(vm, token, start_offset, chunks, mark)]))[0]

    async def append_many(self, batches: Sequence[Outgoing]) -> list[AppendResult]:
        """`append` for several VMs in one round trip.

        A script call takes up to `SCRIPT_VMS` VMs and about `SCRIPT_BYTES` of output,
        so one call never holds Redis (single-threaded) for long.
        """
        calls: list[_Call] = []
        group: list[Outgoing] = []
        size = 0
        for batch in batches:
            group.append(batch)
            size += sum(len(c) for c in batch.chunks)
            if len(group) >= SCRIPT_VMS or size >= SCRIPT_BYTES:
                calls.append(self._append_call(group))
                group, size = [], 0
        if group:
            calls.append(self._append_call(group))
        async with self._deadline("append"):
            results = await self._pipeline(calls)
        return [_append_result(r) for result in results for r in result]

    async def read(self, vm: str, from_offset: int, max_bytes: int) -> LogSlice:
        """Up to `max_bytes` of contiguous output from `from_offset`, or from the first
        stored byte after it (then ``offset > from_offset``)."""
        keys = (self._key("log", vm), self._key("logmeta", vm))
        call = _Call(_READ, keys, (max(0, from_offset), max(0, max_bytes)))
        async with self._deadline("read"):
            ((start, end, offset, data),) = await self._pipeline([call])
        return LogSlice(int(start), int(end), int(offset), bytes(data))

    async def resume_point(self, vm: str) -> int:
        """Where a new owner's offsets start: past everything stored or reserved by anyone.

        An owner reserves offsets a log's worth ahead of what it stored (each append
        moves the mark), so output its clients saw but Redis never got (it died, or
        Redis was away) is skipped by its successor: a gap, never an offset reused.
        """
        async with self._deadline("resume_point"):
            end, reserved = await self._command(
                "HMGET", self._key("logmeta", vm), "end", "reserved"
            )
        return max(int(end or 0), int(reserved or 0))

    async def reserve(self, vm: str, token: int, offset: int, *, settle: bool = False) -> bool:
        """Reserve offsets up to `offset` for our lease (fenced); False if it is not ours."""
        keys = (self._key("lease", vm), self._key("fence", vm), self._key("logmeta", vm))
        mode = "settle" if settle else "reserve"
        call = _Call(_RESERVE, keys, (self.gateway_id, token, offset, mode))
        async with self._deadline("reserve"):
            (result,) = await self._pipeline([call])
        return bytes(result[0]) == b"ok"

    async def raise_floors(self, floors: Mapping[str, int]) -> None:
        """Make each VM's next owner start its offsets at or past `floors[vm]`, whoever
        holds the lease (or nobody): a gateway that handed a VM over puts back the mark
        Redis lost with its data, before another gateway claims the VM at 0."""
        calls = [
            _Call(_RAISE_FLOOR, (self._key("logmeta", vm),), (offset,))
            for vm, offset in floors.items()
        ]
        if calls:
            async with self._deadline("raise_floors"):
                await self._pipeline(calls)

    async def settle(self, vm: str, token: int, end: int) -> bool:
        """Everything we handed out (offsets below `end`) is stored: the next owner may
        start at the log's end, or at `end` if we started past it and printed nothing."""
        return await self.reserve(vm, token, end, settle=True)

    async def bounds(self, vm: str) -> tuple[int, int]:
        """The log's (start, end) offsets; (0, 0) when nothing was ever stored."""
        async with self._deadline("bounds"):
            start, end = await self._command("HMGET", self._key("logmeta", vm), "start", "end")
        return (int(start), int(end)) if end is not None else (0, 0)


@dataclass(frozen=True)
class _Call:
    """One command of a pipeline: a script with its keys and arguments, or a plain command."""

    script: _Script | None
    keys: Sequence[str | bytes]
    args: Sequence[Any]


def _groups(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def vms_digest(vm_ids: Iterable[str]) -> str:
    """A short digest of a set of VM ids: equal for equal sets, in any order."""
    joined = "\n".join(sorted(vm_ids)).encode()
    return hashlib.sha256(joined).hexdigest()[:16]


def _hash_items(raw: Any) -> Iterable[tuple[bytes, bytes]]:
    # HGETALL is a dict in redis-py's RESP2 parsing, a flat list from a raw pipeline.
    if isinstance(raw, dict):
        return raw.items()
    return zip(raw[::2], raw[1::2], strict=True)


def _channel_event(data: Any) -> SwitchChange | OwnershipNews | None:
    """A message of the switches channel; None for one this version does not know."""
    try:
        msg = json.loads(data)
        if isinstance(msg, dict) and isinstance(msg.get("ownership"), str):
            return OwnershipNews(msg["ownership"])
        level, key, enabled = msg["level"], msg["key"], msg["enabled"]
    # RecursionError: "[[[[..." nested too deep for the parser; anyone who may PUBLISH
    # could send it, and raised here it would end the watcher (and the node with it).
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    at = msg.get("at", 0)
    if level not in LEVELS or not isinstance(key, str) or not isinstance(enabled, bool):
        return None
    if not isinstance(at, int) or isinstance(at, bool) or at < 0:
        at = 0  # unordered, as from a release before times: never a reason to drop a change
    return SwitchChange(level, key, enabled, at)


def _append_result(raw: Sequence[Any]) -> AppendResult:
    status = bytes(raw[0]).decode()
    if status == "fenced":
        return AppendResult("fenced")
    if status == "lapsed":
        return AppendResult("lapsed")
    start, end, written, skipped, gap_from, gap_to = (int(x) for x in raw[1:])
    gap = (gap_from, gap_to) if gap_from >= 0 else None
    return AppendResult("ok", start, end, written, skipped, gap)
