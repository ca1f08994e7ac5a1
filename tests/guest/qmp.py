"""A minimal QMP client, and a command-line hook for relayd.

QMP is QEMU's JSON control protocol: the server greets, the client sends
`qmp_capabilities`, then one command at a time, each answered by a `return`
or an `error` object (asynchronous `event` objects may come in between).

Run as a script it executes one command and exits 0 on `return`, 1 on an
error, which is what a relayd hook needs:

    python qmp.py /run/vm/qmp.sock chardev-send-break '{"id": "serial0"}'
    python qmp.py /run/vm/qmp.sock system_reset

This file imports only the standard library: relayd runs it as
`[sys.executable, "tests/guest/qmp.py", ...]` from `break_command` or
`reset_command`.
"""

from __future__ import annotations

import json
import socket
import sys
from typing import Any

TIMEOUT = 10.0


class QmpError(Exception):
    """QEMU answered with an error, or the conversation broke off."""


class QmpClient:
    """One QMP session over a connected stream socket (blocking, with a deadline)."""

    def __init__(self, sock: socket.socket, *, timeout: float = TIMEOUT) -> None:
        self._sock = sock
        self._sock.settimeout(timeout)
        self._buffer = b""
        self.greeting = self._read_message()
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting!r}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: str, *, timeout: float = TIMEOUT) -> QmpClient:
        """Connect to a QMP unix socket."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return cls(sock, timeout=timeout)
        except BaseException:
            sock.close()
            raise

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpError("QEMU closed the QMP connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"unexpected QMP message: {message!r}")
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command; returns its `return` value.

        Raises:
            QmpError: QEMU answered with an error or went away.
        """
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read_message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                raise QmpError(f"{command}: {error.get('class')}: {error.get('desc')}")
            # An asynchronous event (RESET, SHUTDOWN, ...): not our answer.

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str]) -> int:
    """`qmp.py SOCKET COMMAND [JSON-ARGUMENTS]`: run one QMP command."""
    if len(argv) not in (2, 3):
        print("usage: qmp.py SOCKET COMMAND [JSON-ARGUMENTS]", file=sys.stderr)
        return 2
    path, command = argv[0], argv[1]
    arguments = json.loads(argv[2]) if len(argv) == 3 else None
    try:
        with QmpClient.connect(path) as qmp:
            result = qmp.execute(command, arguments)
    except (OSError, QmpError, ValueError) as exc:
        print(f"qmp {command}: {exc}", file=sys.stderr)
        return 1
    if result not in ({}, None):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
