"""The admin CLI's side of AdminService: find the admin kit, open an mTLS channel, call, and turn answers into dicts.

The CLI (:mod:`coordinator.admin.cli`) renders these dicts as rich tables, or prints them as JSON with ``--json``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from protos.fedbridge.v1 import admin_service_pb2 as apb
from protos.fedbridge.v1 import admin_service_pb2_grpc as apb_grpc

ENV = {"coordinator": "FEDBRIDGE_COORDINATOR", "kit": "FEDBRIDGE_ADMIN_KIT", "cert": "FEDBRIDGE_ADMIN_CERT",
       "key": "FEDBRIDGE_ADMIN_KEY", "ca": "FEDBRIDGE_CA", "timeout": "FEDBRIDGE_ADMIN_TIMEOUT"}
TIMEOUT_S = 60.0  # a unary call's deadline unless $FEDBRIDGE_ADMIN_TIMEOUT says otherwise
WITHDRAW_TIMEOUT_S = 3600.0


class AdminClientError(RuntimeError):
    """The call could not be made or was refused; ``code`` is the gRPC status name (or ``USAGE``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class AdminConnection:
    """Where the coordinator is and which admin credentials to present."""

    target: str
    ca: Path
    cert: Path
    key: Path
    server_name: str = ""


def call_timeout() -> float:
    """Seconds a unary call may take: ``$FEDBRIDGE_ADMIN_TIMEOUT`` (seconds > 0) or :data:`TIMEOUT_S`.

    Why an environment variable: every command takes it the same way, and a script against a slow link (or a test
    against a peer that never answers) sets it once.
    """
    raw = os.environ.get(ENV["timeout"], "").strip()
    if not raw:
        return TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise AdminClientError("USAGE", f"${ENV['timeout']} must be a number of seconds > 0, got {raw!r}")
    return value


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def resolve(coordinator: str, kit: Path | None, cert: Path | None, key: Path | None, ca: Path | None,
            server_name: str = "") -> AdminConnection:
    """Fill cert/key/CA from an admin kit folder where not given explicitly, and check every file exists.

    A kit folder holds ``admin.pem`` + ``admin.key`` (or ``client.pem`` + ``client.key``) and ``ca.pem`` (here or in
    its parent folder, as the dev PKI lays it out).
    """
    if not coordinator or ":" not in coordinator:
        raise AdminClientError("USAGE", f"--coordinator must be host:port (or set ${ENV['coordinator']}), got "
                                        f"{coordinator!r}")
    if kit is not None:
        kit = Path(kit)
        if not kit.is_dir():
            raise AdminClientError("USAGE", f"--kit {kit} is not a folder")
        cert = cert or _first(kit / "admin.pem", kit / "client.pem")
        key = key or _first(kit / "admin.key", kit / "client.key")
        ca = ca or _first(kit / "ca.pem", kit.parent / "ca.pem")
    for flag, path in (("--cert", cert), ("--key", key), ("--ca", ca)):
        if path is None:
            raise AdminClientError("USAGE", f"no {flag} given and none found in the kit (use --kit DIR or {flag} or "
                                            f"${ENV[flag[2:]]})")
        if not Path(path).is_file():
            raise AdminClientError("USAGE", f"{flag} {path} does not exist")
    assert cert is not None and key is not None and ca is not None
    return AdminConnection(coordinator, Path(ca), Path(cert), Path(key), server_name)


def to_dict(msg: Message) -> dict[str, Any]:
    """A response as a plain dict with proto field names, defaults included, and states as lower-case words."""
    out = json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _states(out)


def _states(obj: Any) -> Any:
    if isinstance(obj, dict):  # proto3 JSON writes int64 as strings: the *_ms timestamps go back to int
        return {k: (v.removeprefix("FEDERATION_STATE_").lower() if k == "state" and isinstance(v, str)
                    and v.startswith("FEDERATION_STATE_") else int(v) if k.endswith("_ms") and isinstance(v, str)
                    else _states(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_states(v) for v in obj]
    return obj


class AdminClient:
    """A synchronous AdminService client over mutual TLS."""

    def __init__(self, conn: AdminConnection) -> None:
        creds = grpc.ssl_channel_credentials(conn.ca.read_bytes(), conn.key.read_bytes(), conn.cert.read_bytes())
        options = [("grpc.ssl_target_name_override", conn.server_name)] if conn.server_name else []
        self.target = conn.target + (f" (TLS name {conn.server_name})" if conn.server_name else "")
        self.channel = grpc.secure_channel(conn.target, creds, options=options)
        self.stub = apb_grpc.AdminServiceStub(self.channel)
        self.timeout = call_timeout()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, request: Message | None = None) -> dict[str, Any]:
        """Call a unary RPC by name (request defaults to the empty ``<Method>Request``)."""
        request = request if request is not None else getattr(apb, f"{method}Request")()
        try:
            return to_dict(getattr(self.stub, method)(request, timeout=self.timeout))
        except grpc.RpcError as e:
            raise _error(e, self.target, self.timeout) from None

    def withdraw_site(self, site: str, reason: str,
                      on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Stream WithdrawSite, reporting progress; returns the final message as a dict."""
        try:
            stream: Iterator[apb.WithdrawSiteResponse] = self.stub.WithdrawSite(
                apb.WithdrawSiteRequest(site=site, reason=reason), timeout=WITHDRAW_TIMEOUT_S)
            for msg in stream:
                if msg.done:
                    return to_dict(msg)
                if on_progress is not None:
                    on_progress(msg.rounds_done, msg.rounds_total)
        except grpc.RpcError as e:
            raise _error(e, self.target) from None
        raise AdminClientError("INTERNAL", "the coordinator ended WithdrawSite without a result")


def _error(e: grpc.RpcError, target: str, timeout: float = WITHDRAW_TIMEOUT_S) -> AdminClientError:
    code = e.code().name if hasattr(e, "code") and e.code() is not None else "UNKNOWN"
    details = e.details() if hasattr(e, "details") else str(e)
    if code == "UNAVAILABLE":
        details = f"cannot reach the coordinator at {target} ({details})"
    elif code == "DEADLINE_EXCEEDED":  # a peer that accepts and never speaks (not a coordinator, or hung) ends here
        details = (f"no answer from the coordinator at {target} within {timeout:g} s (set ${ENV['timeout']} to wait "
                   "longer)")
    return AdminClientError(code, details or "")
