"""The `relayd` command: argparse in, exit codes out.

This is the only place that turns exceptions into exit codes: 0 success,
1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import ClusterConfig, Config, load_config, parse_duration
from .errors import ConfigError, RelaydError
from .log import configure_logging

DEV_TOKENS_WARNING = (
    "auth.allow_dev_tokens = true: HS256 tokens from the development secret are accepted "
    "(anyone holding that file can mint a token for any principal); not for production"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Serial-console gateway.")
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", required=True, type=Path)

    demo = sub.add_parser("demo", help="gateway plus three simulated VMs on loopback")
    demo.add_argument("--certs", type=Path, default=Path("certs/dev"))
    demo.add_argument("--state-dir", type=Path, default=Path(".relayd-demo"))
    demo.add_argument("--listen", default="127.0.0.1:8443")
    demo.add_argument("--health-listen", default="127.0.0.1:9100")

    connect = sub.add_parser("connect", help="terminal client for a VM console")
    connect.add_argument("url", help="gateway base URL, e.g. https://127.0.0.1:8443")
    connect.add_argument("--vm", required=True)
    connect.add_argument("--token")
    connect.add_argument("--token-file", type=Path)
    connect.add_argument("--ca", type=Path)
    connect.add_argument("--spectate", action="store_true")
    connect.add_argument("--from", dest="resume_from", type=int, help="resume at this offset")

    token = sub.add_parser("token", help="development tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="mint an HS256 token with hs256_secret_file")
    issue.add_argument("--config", required=True, type=Path)
    issue.add_argument("--sub", required=True, help="the subject (principal user:<sub>)")
    issue.add_argument("--group", action="append", default=[])
    issue.add_argument("--ttl", default="1h")
    issue.add_argument("--amr", action="append", default=[])

    certs = sub.add_parser("certs", help="development certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_sub.add_parser("init", help="dev CA, server and client certificates")
    init.add_argument("directory", type=Path)
    init.add_argument("--name", action="append", default=[], help="extra server name or IP")
    init.add_argument("--force", action="store_true")

    check = sub.add_parser("check-config", help="validate a config file and explain it")
    check.add_argument("path", type=Path)
    check.add_argument(
        "--offline",
        action="store_true",
        help="check the files only, do not reach Redis (the unit's pre-start check: "
        "a gateway must still start while Redis is down)",
    )
    return p


def _explain(cfg: Config) -> str:
    gw = cfg.gateway
    lines = [
        f"{cfg.path}: ok",
        f"  region {gw.region}; TLS on {gw.listen} (min TLS {cfg.tls.min_version})"
        + (f"; health on {gw.health_listen}" if gw.health_listen else "; no health listener"),
        f"  tokens: issuer {cfg.auth.issuer!r}, audience {cfg.auth.audience!r}, "
        + ", ".join(
            k
            for k, v in (("JWKS", cfg.auth.jwks_file), ("HS256 (dev)", cfg.auth.hs256_secret_file))
            if v
        ),
        f"  {len(cfg.subscriptions)} subscription(s), {len(cfg.vms)} vm(s), "
        f"{len(cfg.role_assignments)} role assignment(s)",
    ]
    if cfg.auth.allow_dev_tokens:
        lines.insert(3, f"  WARNING: {DEV_TOKENS_WARNING}")
    for vm in cfg.vms:
        lines.append(
            f"  vm {vm.id}: {vm.serial} at {vm.baud} baud (input {vm.input_rate} B/s), "
            f"takeover={vm.takeover}, on_detach="
            + (f"send:{vm.on_detach!r}" if isinstance(vm.on_detach, bytes) else vm.on_detach)
        )
    return "\n".join(lines)


def _check_config(path: Path, *, offline: bool = False) -> int:
    cfg = load_config(path)
    # Load what the daemon would load at start, so a bad key file fails here too.
    from .auth import Authenticator
    from .tls import server_context

    # The daemon's own start-up log lines would repeat the warnings below on stdout.
    configure_logging("error", stream=sys.stderr)
    server_context(cfg.tls)
    Authenticator(cfg.auth)
    if cfg.auth.allow_dev_tokens:
        print(f"relayd: warning: {cfg.path}: {DEV_TOKENS_WARNING}", file=sys.stderr)
    if cfg.tls.crl is not None:
        from .revocation import load_revocations

        peer_ca = None if cfg.cluster is None else cfg.cluster.peer_ca
        _, problems = load_revocations(cfg.tls.crl, cfg.tls.client_ca, peer_ca)
        for problem in problems:
            print(f"relayd: warning: {cfg.tls.crl}: tls.crl: {problem}", file=sys.stderr)
    # The cluster's checks first: "ok" is printed only once everything passed.
    cluster = asyncio.run(_check_cluster(cfg, offline)) if cfg.cluster is not None else None
    print(_explain(cfg))
    if cluster is not None:
        print(cluster)
    return 0


async def _check_cluster(cfg: Config, offline: bool = False) -> str:
    """Load the peer-link material and reach Redis (unless `offline`), as the daemon would.

    Raises:
        ConfigError: a file does not load, or Redis does not answer (naming the key).
    """
    from .cluster.peerlink import (
        PeerTrust,
        check_own_certificate,
        peer_client_context,
        trust_peer_ca,
    )
    from .cluster.store import ClusterStore
    from .errors import ClusterUnavailableError
    from .tls import server_context

    cluster = cfg.cluster
    assert cluster is not None
    client_ctx = peer_client_context(
        cfg.tls.cert, cfg.tls.key, cluster.peer_ca, min_version=cfg.tls.min_version, crl=cfg.tls.crl
    )
    trust = PeerTrust.load(cluster.peer_ca, cfg.tls.client_ca)
    server_ctx = server_context(cfg.tls)
    trust_peer_ca(server_ctx, cluster.peer_ca)
    problem = check_own_certificate(server_ctx, client_ctx, trust, cluster.advertise.host)
    if problem is not None:
        raise ConfigError(str(cfg.path), *problem)
    if offline:
        return (
            f"cluster: gateway {cluster.gateway_id} advertised at {cluster.advertise}, "
            f"lease {cluster.lease_ttl:g} s; Redis not contacted (--offline)"
        )
    store = ClusterStore.from_config(cfg)
    try:
        live = await store.live_gateways()
    except ClusterUnavailableError as exc:
        raise ConfigError(str(cfg.path), "cluster.redis", _redis_problem(exc, cluster)) from None
    finally:
        await store.close()
    elsewhere = live.get(cluster.gateway_id)
    if elsewhere is not None and elsewhere != str(cluster.advertise):
        message = store.id_conflict(elsewhere, str(cluster.advertise))
        raise ConfigError(str(cfg.path), "cluster.gateway_id", message)
    others = ", ".join(sorted(gw for gw in live if gw != cluster.gateway_id)) or "none yet"
    return (
        f"cluster: gateway {cluster.gateway_id} advertised at {cluster.advertise}, "
        f"lease {cluster.lease_ttl:g} s; Redis {cluster.redis_display} answers; "
        f"other live gateways: {others}"
    )


def _redis_problem(exc: Exception, cluster: ClusterConfig) -> str:
    """What `check-config` says when Redis does not serve us: unreachable, or refusing."""
    from redis.exceptions import AuthenticationError, NoPermissionError

    cause = exc.__cause__
    if isinstance(cause, AuthenticationError):
        where = "redis_password_file" if cluster.redis_password_file else "the URL"
        return f"Redis refused the user or password in {where}: {exc}"
    if isinstance(cause, NoPermissionError):
        return (
            "Redis refused a command to the URL's user (its ACL must allow relayd's keys, "
            f"its scripts and its channel): {exc}"
        )
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            "Redis's certificate does not verify (against redis_ca, or the system CAs "
            f"without it), or does not name the URL's host: {exc}"
        )
    # TLS 1.3 checks the client's certificate after the handshake: Redis's refusal may
    # arrive as its alert, or as the connection reset before the alert is read.
    hung_up = "reset by peer" in text or "closed by server" in text.lower()
    no_cert = cluster.redis_cert is None and cluster.redis.startswith("rediss:")
    if "CERTIFICATE_REQUIRED" in text or "bad certificate" in text.lower() or (hung_up and no_cert):
        return (
            "Redis wants a client certificate it trusts (redis_cert and redis_key, issued "
            f"by its tls-ca-cert-file CA): {exc}"
        )
    return f"cannot reach Redis: {exc}"


def _issue(args: argparse.Namespace) -> int:
    from .auth import issue_token, read_secret_file

    cfg = load_config(args.config)
    if cfg.auth.hs256_secret_file is None:
        raise ConfigError(str(cfg.path), "auth.hs256_secret_file", "needed to issue tokens")
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise ConfigError("--ttl", "", str(exc)) from None
    token = issue_token(
        read_secret_file(cfg.auth.hs256_secret_file),
        issuer=cfg.auth.issuer,
        audience=cfg.auth.audience,
        sub=args.sub,
        groups=args.group,
        amr=args.amr,
        ttl=ttl or 3600.0,
    )
    print(token)
    return 0


def _connect(args: argparse.Namespace) -> int:
    from .client import connect, read_token

    token = read_token(args.token, args.token_file)
    return asyncio.run(
        connect(
            args.url,
            args.vm,
            token=token,
            ca=args.ca,
            spectate=args.spectate,
            resume_from=args.resume_from,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relayd` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            from .app import run_forever

            configure_logging(args.log_level)
            return run_forever(load_config(args.config))
        if args.command == "demo":
            from .app import _run
            from .demo import run_demo

            configure_logging(args.log_level, stream=sys.stderr)
            _run(
                run_demo(
                    certs=args.certs,
                    state_dir=args.state_dir,
                    listen=args.listen,
                    health_listen=args.health_listen,
                )
            )
            return 0
        if args.command == "connect":
            return _connect(args)
        if args.command == "token":
            return _issue(args)
        if args.command == "certs":
            from .certs import init_dev_pki

            pki = init_dev_pki(args.directory, names=args.name, force=args.force)
            # Not "ca: ..." lines: `make run` prints these before the demo's own lines.
            names = ", ".join(p.name for p in (pki.ca_cert, pki.server_cert, pki.client_cert))
            print(f"dev PKI in {pki.directory}: {names}")
            return 0
        if args.command == "check-config":
            return _check_config(args.path, offline=args.offline)
    except ConfigError as exc:
        print(f"relayd: config error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad arguments (client.UsageError, a bad --name, ...)
        print(f"relayd: {exc}", file=sys.stderr)
        return 2
    except RelaydError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
