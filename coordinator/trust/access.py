"""Who may act as a site, decided per call: the certificate's role, revocations, the enrolment registry and the CRL.

:class:`SiteGate` holds the revoked names (durable in the store), the :class:`AccessList` (registry + CRL files,
reloaded when they change), and cuts off open calls: a revocation sets an event that every open upload stream
(:meth:`SiteGate.while_allowed`) and long-poll (through the engine's wake-up) re-checks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from coordinator.config import FederationConfig
from coordinator.errors import CertificateExpired, InvalidUpdate, PermissionDenied, Revoked
from coordinator.rounds.store import Store
from coordinator.trust.enrolment import AccessList, EnrolmentError
from coordinator.trust.pki import PeerIdentity

log = logging.getLogger(__name__)
T = TypeVar("T")
ACCESS_POLL_S = 0.5  # how often the registry / CRL files are checked for changes (open streams are cut then)


class SiteGate:
    """Per-call access control for site certificates.

    Args:
        config: The federation config (``enrolment_registry``, ``crl``, ``tls.ca``).
        store: Durable state (the ``revocations`` table).
        audit: Appends an audit record (the engine's ``_audit``).
        wake: Wakes everything waiting on the engine (long-polls re-check access then).
    """

    def __init__(self, config: FederationConfig, store: Store, audit: Callable[[str, dict[str, Any]], None],
                 wake: Callable[[], None]) -> None:
        self.store, self._audit, self._wake = store, audit, wake
        self.revoked: dict[str, str] = {r["name"]: r["reason"] for r in store.revocations()}
        self._revocation = asyncio.Event()
        self._refusals_seen: set[tuple[str, str, str]] = set()
        self.access: AccessList | None = None
        if config.enrolment_registry is not None or config.crl is not None:
            self.access = AccessList(config.tls.ca, config.enrolment_registry, config.crl)
            self._sync_registry_revocations()

    def require_site(self, peer: PeerIdentity) -> None:
        """Refuse (PERMISSION_DENIED) a non-site, revoked or unenrolled certificate; audited once per cause."""
        try:
            if peer.role != "site":
                raise PermissionDenied(f"certificate of {peer.name!r} has role {peer.role!r}, not 'site'")
            if peer.not_after_ms and peer.not_after_ms <= time.time() * 1000:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(peer.not_after_ms / 1000))
                raise CertificateExpired(f"the certificate of site {peer.name!r} expired at {when}; renew it "
                                         "(fedbridge-admin renew-site) and restart the site")
            if peer.name in self.revoked:
                raise Revoked(f"site {peer.name!r} was revoked: {self.revoked[peer.name] or 'no reason given'}")
            if self.access is not None:
                self.refresh()
                self.access.check(peer)
        except PermissionDenied as e:
            key = (peer.name, peer.fingerprint, type(e).__name__)
            if key not in self._refusals_seen:  # once per certificate and cause: a polling loop cannot flood the log
                self._refusals_seen.add(key)
                self._audit("access_refused", {"site": peer.name, "role": peer.role, "cert_sha256": peer.fingerprint,
                                               "reason": str(e)[:500]})
            raise

    def require_admin(self, peer: PeerIdentity) -> None:
        """Refuse (PERMISSION_DENIED) an admin certificate the CRL revokes or the registry does not list."""
        if self.access is None:
            return
        try:
            self.refresh()
            self.access.check_admin(peer)
        except PermissionDenied as e:
            key = (peer.name, peer.fingerprint, type(e).__name__)
            if key not in self._refusals_seen:
                self._refusals_seen.add(key)
                self._audit("admin_refused", {"admin": peer.name, "cert_sha256": peer.fingerprint,
                                              "reason": str(e)[:500]})
            raise

    def region(self, peer: PeerIdentity) -> str:
        """The site's region: from its certificate, else from the enrolment registry."""
        return peer.region or (self.access.region(peer.name) if self.access else "")

    def revoke(self, name: str, reason: str, actor: str) -> bool:
        """Revoke ``name`` durably; open calls of that site are cut off. False when it already was revoked."""
        if not name or len(name) > 64:
            raise InvalidUpdate(f"invalid site name {name!r}")
        if name in self.revoked:  # the first revocation's record stands; nothing new to audit
            log.info("[RoundEngine.revoke_site] site=%s already revoked (asked again by %s)", name, actor[:128])
            return False
        self._audit("site_revoked", {"site": name, "reason": reason[:500], "actor": actor[:128]})  # before it acts
        new = self.store.add_revocation(name, reason[:500], actor[:128])
        self.revoked.setdefault(name, reason[:500])
        log.warning("[RoundEngine.revoke_site] site=%s revoked by %s", name, actor[:128])
        self._changed()
        return new

    def _changed(self) -> None:
        self._revocation.set()
        self._revocation = asyncio.Event()
        self._wake()

    def _sync_registry_revocations(self) -> None:
        """Store (and audit) the registry's revocations that this coordinator has not recorded yet."""
        assert self.access is not None
        for e in self.access.sites.values():
            if e.revoked_ms and e.name not in self.revoked:
                self.store.add_revocation(e.name, e.revoke_reason, e.revoked_by or "registry")
                self.revoked[e.name] = e.revoke_reason
                self._audit("site_revoked", {"site": e.name, "reason": e.revoke_reason,
                                             "actor": e.revoked_by or "registry", "source": "registry/crl"})

    def refresh(self) -> None:
        """Reload the registry / CRL if either file changed; a file that cannot be read refuses every site."""
        if self.access is None:
            return
        try:
            changed = self.access.refresh()
        except EnrolmentError as e:
            raise PermissionDenied(f"the coordinator cannot read its access list: {e}") from None
        if changed:
            self._audit("access_list_reloaded", {"enrolled": len(self.access.sites),
                                                 "revoked_serials": len(self.access.revoked_serials)})
            self._sync_registry_revocations()
            self._changed()

    async def watch(self) -> None:
        """Notice registry / CRL changes even while no call arrives, so open streams and long-polls are cut off."""
        while True:
            await asyncio.sleep(ACCESS_POLL_S)
            with contextlib.suppress(PermissionDenied):
                self.refresh()

    async def while_allowed(self, peer: PeerIdentity, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """Pass ``items`` through while ``peer`` may act; a revocation ends the stream even while it stalls."""
        it = items.__aiter__()
        while True:
            self.require_site(peer)
            nxt: asyncio.Future[T] = asyncio.ensure_future(it.__anext__())
            try:
                while True:
                    gone = asyncio.ensure_future(self._revocation.wait())
                    try:
                        done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        gone.cancel()
                    if nxt in done:
                        break
                    self.require_site(peer)
            except BaseException:
                nxt.cancel()
                raise
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
