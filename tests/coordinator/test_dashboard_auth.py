"""Who may see the dashboard: loopback by default; elsewhere only with a token or an admin client certificate."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import httpx
import pytest
from coord_helpers import LORA, config

from coordinator.config import DashboardSpec, TlsSpec
from coordinator.dashboard import DashboardError, start_dashboard
from coordinator.dashboard.app import create_app
from coordinator.rounds.adapter import init_adapter
from coordinator.rounds.engine import RoundEngine
from coordinator.rounds.store import Store
from coordinator.trust.pki import create_dev_pki
from fedcommon.manifest import Manifest
from fedcommon.tomlconfig import ConfigError

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RoundEngine:
    tmp = tmp_path_factory.mktemp("dash")
    cfg = config(tmp, tiny_model_dir, rounds=2, min_sites=1)
    return RoundEngine(cfg, Store(cfg.state_dir), Manifest.of_dir(tiny_model_dir).sha256, init_adapter(tiny_model_dir, LORA))


def test_non_loopback_listen_needs_a_token_or_the_admin_cert(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Execute / Assert: refused at config load, naming the field ...
    with pytest.raises(ConfigError, match="dashboard.listen"):
        config(tmp_path, tiny_model_dir, dashboard={"listen": "0.0.0.0:8080"})
    # ... and accepted with either protection, or on loopback.
    assert config(tmp_path, tiny_model_dir, dashboard={"listen": "0.0.0.0:0", "token_env": "T"}).dashboard.token_env
    assert DashboardSpec(listen="10.0.0.5:0", require_admin_cert=True).require_admin_cert
    assert DashboardSpec(listen="[::1]:0").listen == "[::1]:0"


def test_token_is_required_on_every_route(engine: RoundEngine) -> None:
    # Prepare
    from starlette.testclient import TestClient

    client = TestClient(create_app(engine, TOKEN))
    # Execute / Assert
    for path in ("/", "/api/status", "/metrics"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    assert client.get("/static/app.js").status_code == 200  # the page's own code loads without the token
    assert TOKEN not in client.get("/api/snapshot", headers={"Authorization": f"Bearer {TOKEN}"}).text


def test_token_in_the_url_is_refused_and_the_login_form_sets_an_httponly_cookie(engine: RoundEngine) -> None:
    # Prepare
    from starlette.testclient import TestClient

    client = TestClient(create_app(engine, TOKEN))
    # Execute / Assert: the right token in the query string is refused (URLs are logged and leak via Referer) ...
    r = client.get(f"/api/status?token={TOKEN}")
    assert r.status_code == 400 and "not accepted in the URL" in r.json()["error"]
    assert client.get(f"/?token={TOKEN}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 400
    # ... a wrong login sets nothing; the right one sets an HttpOnly, SameSite=Strict cookie that then authorises
    assert client.post("/login", data={"token": "wrong"}).status_code == 401
    assert client.get("/api/status").status_code == 401
    r = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    cookie = r.headers["set-cookie"].lower()
    assert r.status_code == 303 and "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/status").json()["federation_id"] == "fed"


def test_missing_token_variable_refuses_to_start(engine: RoundEngine, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    # Prepare
    monkeypatch.delenv("FEDBRIDGE_TEST_DASH_TOKEN", raising=False)
    spec = DashboardSpec(listen="127.0.0.1:0", token_env="FEDBRIDGE_TEST_DASH_TOKEN")
    tls = TlsSpec(tmp_path / "ca", tmp_path / "c", tmp_path / "k")
    # Execute / Assert
    with pytest.raises(DashboardError, match="FEDBRIDGE_TEST_DASH_TOKEN"):
        asyncio.run(start_dashboard(spec, engine, tls, tmp_path))


def test_admin_cert_mode_serves_admins_only(engine: RoundEngine, tmp_path: Path) -> None:
    # Prepare: a dev PKI; the dashboard uses the coordinator's TLS material and requires client certificates.
    pki = create_dev_pki(tmp_path / "pki", ["site-a"])
    tls = TlsSpec(pki.ca_cert, pki.server_cert, pki.server_key)
    spec = DashboardSpec(listen="127.0.0.1:0", require_admin_cert=True)

    def get(port: int, cert: tuple[Path, Path] | None) -> int:
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        if cert:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        with httpx.Client(verify=ctx, timeout=10) as c:
            return c.get(f"https://127.0.0.1:{port}/api/status").status_code

    async def main() -> tuple[int, list[str]]:
        dash = await start_dashboard(spec, engine, tls, tmp_path)
        try:
            ok = await asyncio.to_thread(get, dash.port, (pki.admin_cert, pki.admin_key))
            refused = []
            for cert in (None, (pki.sites["site-a"].cert, pki.sites["site-a"].key)):
                try:
                    await asyncio.to_thread(get, dash.port, cert)
                except (httpx.HTTPError, ssl.SSLError) as e:
                    refused.append(type(e).__name__)
            return ok, refused
        finally:
            await dash.stop()

    # Execute
    ok, refused = asyncio.run(main())
    # Assert: the admin gets the page; no certificate and a site certificate get no HTTP answer at all.
    assert ok == 200
    assert len(refused) == 2, refused
    assert (tmp_path / "dashboard.port").exists()


def test_events_stream_a_snapshot_and_stop_with_a_client_connected(engine: RoundEngine, tmp_path: Path) -> None:
    # Prepare
    spec = DashboardSpec(listen="127.0.0.1:0")
    tls = TlsSpec(tmp_path / "ca", tmp_path / "c", tmp_path / "k")

    def first_event(port: int) -> str:
        with httpx.Client(timeout=10) as c, c.stream("GET", f"http://127.0.0.1:{port}/api/events") as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    return "\n".join(lines)
        return ""

    async def main() -> tuple[str, float]:
        dash = await start_dashboard(spec, engine, tls, tmp_path)
        event = await asyncio.to_thread(first_event, dash.port)
        # A second client stays connected while the dashboard stops.
        reader = asyncio.create_task(asyncio.to_thread(first_event, dash.port))
        await asyncio.sleep(0.5)
        t0 = asyncio.get_running_loop().time()
        await dash.stop()
        stopped_in = asyncio.get_running_loop().time() - t0
        await asyncio.wait_for(reader, 10)
        return event, stopped_in

    # Execute
    event, stopped_in = asyncio.run(main())
    # Assert
    assert event.startswith("event: snapshot\ndata: ")
    doc = json.loads(event.split("data: ", 1)[1])
    assert doc["status"]["federation_id"] == "fed" and set(doc) >= {"sites", "rounds", "train_loss", "releases"}
    assert stopped_in < 5
