"""The exception tree of relayd.

RelaydError
├── ConfigError              operator error: carries file and key; surfaces once, in cli.py
├── UsageError               a command line asks for the impossible (exit code 2)
├── PeerError                the client broke a rule; carries what goes on the wire
│   ├── AuthError            401 before the upgrade (missing, malformed, expired, wrong token)
│   ├── ForbiddenError       403 (role too low, console disabled, client not allowed)
│   ├── NotFoundError        404 / close 4004 (unknown VM or route)
│   ├── MethodNotAllowedError 405, with the `Allow` header
│   ├── ConflictError        409 (takeover policy `deny` and a writer exists)
│   ├── RateLimitedError     429 / close 4029, with `Retry-After`
│   ├── ForwardedRequestError 400 / 431: a forwarded upgrade breaks the format or is too large
│   ├── ServiceUnavailableError 503 (the gateway is draining)
│   │   ├── OwnerUnavailableError  503 `owner_unavailable`: no gateway holds the VM's port now
│   │   └── SharedStateError       503 `cluster_unavailable`: Redis did not answer
│   ├── BadMessageError      a malformed control message: `bad_message`, session continues
│   └── StateWriteError      500: a change could not be persisted (disk full); it was not applied
├── ProxyProtocolError       the bytes before TLS are not a valid PROXY header (counted, closed)
├── ClusterUnavailableError  Redis could not be reached, did not answer in time, or refused
├── PeerLinkError            the VM's owner cannot be reached over a peer link (then 503)
├── ConsoleLogError          the console log could not be written, read or opened
├── PortUnavailableError     a serial backend could not be opened or went away
└── HookError                an operator-configured command (break/nmi/reset) failed

A `PeerError` says everything its answer needs: the HTTP status and close code
are class attributes, and `response_headers()` the headers its status requires,
so no caller maps codes to statuses by hand.
"""

from __future__ import annotations


class RelaydError(Exception):
    """Base of every error relayd raises on purpose."""


class ConfigError(RelaydError):
    """A configuration file is invalid; names the file and the key."""

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {message}")


class UsageError(RelaydError, ValueError):
    """The command line asks for something impossible (exit code 2)."""


class PeerError(RelaydError):
    """The peer did something wrong; the error says what to send back."""

    http_status = 400
    close_code = 1008
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def response_headers(self) -> list[tuple[str, str]]:
        """Headers the HTTP status requires (RFC 9110), beyond the JSON body's."""
        return []


class AuthError(PeerError):
    """Credentials are missing or invalid."""

    http_status = 401
    close_code = 4003
    code = "unauthorized"

    def response_headers(self) -> list[tuple[str, str]]:
        """A 401 names the scheme it wants."""
        return [("WWW-Authenticate", 'Bearer realm="relayd"')]


class ForbiddenError(PeerError):
    """The principal is known but may not do this."""

    http_status = 403
    close_code = 4003
    code = "forbidden"


class NotFoundError(PeerError):
    """The VM (or route) does not exist."""

    http_status = 404
    close_code = 4004
    code = "not_found"


class MethodNotAllowedError(PeerError):
    """The path exists, but not for this method."""

    http_status = 405
    code = "method_not_allowed"

    def __init__(self, method: str, *, allow: str) -> None:
        super().__init__(f"method {method[:16]} is not allowed here")
        self.allow = allow

    def response_headers(self) -> list[tuple[str, str]]:
        """A 405 lists the methods the path does take."""
        return [("Allow", self.allow)]


class ConflictError(PeerError):
    """The console has a writer and its policy refuses newcomers."""

    http_status = 409
    close_code = 4001
    code = "writer_exists"


class RateLimitedError(PeerError):
    """Too many sessions or attempts."""

    http_status = 429
    close_code = 4029
    code = "rate_limited"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float = 1.0) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def response_headers(self) -> list[tuple[str, str]]:
        """When to try again, in whole seconds (at least one)."""
        return [("Retry-After", str(max(1, round(self.retry_after))))]


class ServiceUnavailableError(PeerError):
    """The gateway cannot serve this now (it is draining); another gateway can."""

    http_status = 503
    close_code = 1001
    code = "draining"


class OwnerUnavailableError(ServiceUnavailableError):
    """The VM's owner is not reachable right now (failover in progress, or a network fault)."""

    code = "owner_unavailable"

    def response_headers(self) -> list[tuple[str, str]]:
        """A new owner takes over within seconds."""
        return [("Retry-After", "1")]


class SharedStateError(ServiceUnavailableError):
    """The region's shared state (Redis) did not answer: try again, maybe elsewhere."""

    code = "cluster_unavailable"

    def response_headers(self) -> list[tuple[str, str]]:
        """Worth retrying soon."""
        return [("Retry-After", "1")]


class ForwardedRequestError(PeerError):
    """A forwarded upgrade breaks the format (from a peer)."""

    code = "bad_forwarded_request"


class ForwardedRequestTooLargeError(ForwardedRequestError):
    """A forwarded upgrade cannot be built within the owner's head limits."""

    http_status = 431
    code = "too_large"


class BadMessageError(PeerError):
    """A control message that does not parse or is not known."""

    code = "bad_message"


class ProxyProtocolError(RelaydError):
    """The bytes before the TLS handshake are not a valid PROXY header."""


class ConsoleLogError(RelaydError):
    """The console log could not be written, read or opened; the caller decides what next."""


class StateWriteError(PeerError):
    """A change asked for could not be saved in the state directory, so it was not made.

    Not the peer's fault, but it ends that peer's request with a status and a
    JSON body like the errors above (500, `state_write_failed`).
    """

    http_status = 500
    close_code = 1011
    code = "state_write_failed"


class ClusterUnavailableError(RelaydError):
    """Redis could not be reached, did not answer within the deadline, or refused a command."""


class PeerLinkError(RelaydError):
    """The VM's owner cannot be reached, or answered outside the format (the client gets 503)."""


class PortUnavailableError(RelaydError):
    """A serial backend could not be reached or was lost."""


class HookError(RelaydError):
    """A configured hypervisor command failed to start, timed out or exited non-zero."""
