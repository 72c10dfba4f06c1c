"""The coordinator's dashboard in a real browser, and its Prometheus /metrics, during a real federation (issue 6,
items 4 and 5).

Headless Debian chromium driven by Playwright opens the dashboard of a demo-sized federation (2 real sites, 3
rounds), sees the round number advance and a training-loss curve drawn, and saves a screenshot to
``test-artifacts/dashboard.png``. ``deploy/setup.sh`` installs chromium for the dev extra; without it this test
fails (it does not skip). /metrics is scraped while the federation runs and after a refused upload.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fedcommon.tomlconfig import dumps, load_toml
from protos.fedbridge.v1 import federation_service_pb2 as pb
from protos.fedbridge.v1 import federation_service_pb2_grpc as pb_grpc
from sandbox import localfed

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"
TOKEN = "dashboard-token-for-the-browser-test"


@pytest.fixture
def fed(tiny_model_dir: Path, tmp_path: Path) -> Iterator[localfed.LocalFederation]:
    """A coordinator (no sites yet) of a 2-site, 3-round federation that stays up after its last round.

    One per test: the browser test must open the page before any site starts, the metrics test counts a whole run.
    """
    fed = localfed.prepare(tmp_path, tiny_model_dir, n_sites=2, rounds=3,
                           training={"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3},
                           lora={"rank": 4, "alpha": 8.0}, n_train=16, n_heldout=4,
                           publish={"site_regions": {"site-a": "EU/DE"}},
                           shared_eval={"every_k_rounds": 2, "max_new_tokens": 4, "limit": 2})
    cfg = load_toml(fed.federation_toml)
    cfg["exit_when_done"] = False
    cfg["dashboard"] = {"token_env": "FEDBRIDGE_DASH_TOKEN"}  # the browser signs in through /login (cookie)
    fed.federation_toml.write_text(dumps(cfg))
    with fed:
        fed.start_coordinator(env={"FEDBRIDGE_DASH_TOKEN": TOKEN})
        yield fed


def get(fed: localfed.LocalFederation, path: str) -> bytes:
    req = urllib.request.Request(dashboard_url(fed) + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def dashboard_url(fed: localfed.LocalFederation) -> str:
    return f"http://127.0.0.1:{int((fed.state_dir / 'dashboard.port').read_text())}"


def scrape(fed: localfed.LocalFederation) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = get(fed, "/metrics").decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_dashboard_in_a_real_browser(fed: localfed.LocalFederation) -> None:
    # Prepare: the browser (installed by deploy/setup.sh; a missing one is a set-up failure, not a skip).
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run deploy/setup.sh (it installs Debian's chromium for the dev extra) "
                    "or `apt-get install -y chromium`")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as e:
        pytest.fail(f"playwright is not installed ({e}): pip install -e '.[dev]'")
    url = dashboard_url(fed)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            # The token in the URL is refused; the page sends the operator to the login form, which sets the cookie.
            assert page.goto(url + f"/?token={TOKEN}").status == 400
            page.goto(url + "/", wait_until="domcontentloaded")
            expect(page).to_have_url(url + "/login")
            page.fill("input[name=token]", TOKEN)
            page.click("button[type=submit]")
            # Execute: open the page (signed in) before any site runs, then start the sites.
            page.wait_for_url(url + "/")
            expect(page.locator("#round-number")).to_have_text("1", timeout=30_000)
            expect(page.locator("#federation-id")).to_have_text("demo")
            for s in fed.sites:
                fed.start_site(s)
            # Assert: the round number advances live (SSE) ...
            expect(page.locator("#round-number")).to_have_text("2", timeout=300_000)
            during = scrape(fed)
            # ... and a per-site training-loss curve with points of two rounds is drawn.
            curve = page.locator("#loss-chart path.series[data-points='2'], #loss-chart path.series[data-points='3']")
            expect(curve.first).to_be_visible(timeout=300_000)
            d = curve.first.get_attribute("d") or ""
            assert d.startswith("M") and d.count("L") >= 1, d
            expect(page.locator("#round-number")).to_have_text("3", timeout=300_000)
            expect(page.locator("#state")).to_have_text("finished", timeout=300_000)
            expect(page.locator("#sites tbody tr")).to_have_count(2)
            expect(page.locator("#sites tbody tr").first).to_contain_text("EU/DE")
            expect(page.locator("#sites tbody tr").nth(1)).to_contain_text("—")
            expect(page.locator("#error-chart rect.meter")).to_have_count(3)
            expect(page.locator("#releases tbody")).to_contain_text("v1")
            # Shared-benchmark scores of the evaluated rounds (2 and the last) are plotted per benchmark.
            expect(page.locator("#evals tbody tr")).to_have_count(2)
            expect(page.locator("#eval-chart path.series[data-points='2']").first).to_be_attached()
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            print(f"dashboard screenshot: {SCREENSHOT}")
        finally:
            browser.close()
    # Nothing outside the coordinator was requested (no CDN).
    assert requests and all(r.startswith(url + "/") for r in requests), requests
    assert not any("token=" in r for r in requests[1:]), requests  # after the refused probe, never in a URL
    assert SCREENSHOT.stat().st_size > 10_000
    # /metrics mid-federation: round 2 or later, both sites connected, updates and bytes counted.
    assert during[("fedbridge_round", ())] >= 2
    assert during[("fedbridge_sites_connected", ())] == 2
    assert during[("fedbridge_updates_accepted_total", ())] >= 2
    assert during[("fedbridge_upload_bytes_received_total", ())] > 0


def test_metrics_count_accepted_and_refused_updates(fed: localfed.LocalFederation) -> None:
    # Prepare: start the sites and let the federation finish its 3 rounds (2 sites each).
    for s in fed.sites:
        fed.start_site(s)
    deadline = time.monotonic() + 600
    while json.loads(get(fed, "/api/status"))["state"] != "finished":
        assert time.monotonic() < deadline, localfed._tail(fed.log_path("coordinator"))
        time.sleep(1)
    before = scrape(fed)
    # Execute: an upload with the admin certificate (not a site) is refused with PERMISSION_DENIED.
    pki = fed.root / "pki"
    creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), (pki / "admin" / "admin.key").read_bytes(),
                                         (pki / "admin" / "admin.pem").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{fed.port}", creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.FederationServiceStub(ch).UploadUpdate(iter([pb.UploadUpdateRequest(
                envelope=pb.SignedEnvelope(), offset=0, data=b"x" * 10)]), timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    after = scrape(fed)
    # Assert
    assert after[("fedbridge_round", ())] == 3
    assert after[("fedbridge_updates_accepted_total", ())] == 6
    assert after[("fedbridge_upload_bytes_received_total", ())] >= 6 * 10_000
    refused = ("fedbridge_updates_refused_total", (("status", "PERMISSION_DENIED"),))
    assert after[refused] == before.get(refused, 0) + 1
    assert after[("fedbridge_federation_state", (("state", "finished"),))] == 1
    assert after[("fedbridge_sites_joined", ())] == 2
