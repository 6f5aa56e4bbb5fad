"""The console in chromium, as its users meet it: a provider registers and publishes a model, the operator approves
it and credits a consumer, the consumer finds it, tries it (and streams a chat), makes a key and uses it with the
openai SDK, then sees that usage and the invoice; a training job started from the console shows live progress;
cross-site and cross-organisation attempts are refused; axe-core finds no serious or critical violation on any
page, in the light and the dark theme. A screenshot of each page is saved (see conftest)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from playwright.sync_api import expect

from tests.browser.conftest import AXE
from tests.helpers import ServerProcess, free_port, matmul_chain_model, unique

pytestmark = pytest.mark.browser

PASSWORD = "browser-test-password-1"
AXE_SOURCE = AXE.read_text()


@dataclass
class People:
    provider_org: str
    consumer_org: str
    provider: str
    consumer: str
    operator: str
    model: str = ""
    secret: str = ""
    violations: list[str] = field(default_factory=list)
    pages_checked: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def people(admin_http: httpx.Client) -> People:
    found = People(unique("provider"), unique("consumer"), f"{unique('prov')}@example.test",
                   f"{unique('cons')}@example.test", f"{unique('op')}@example.test")  # fmt: skip
    for org, email in ((found.provider_org, found.provider), (found.consumer_org, found.consumer)):
        assert admin_http.post("/api/orgs", json={"name": org}).status_code == 201
        r = admin_http.post(f"/api/orgs/{org}/members", json={"email": email, "role": "admin", "password": PASSWORD})
        assert r.status_code == 201, r.text
    assert admin_http.post("/api/users", json={"email": found.operator, "password": PASSWORD}).status_code == 201
    assert admin_http.patch(f"/api/users/{found.operator}", json={"platform_admin": True}).status_code == 200
    return found


class Session:
    """One person's browser context: pages, console errors, axe-core checks and screenshots."""

    def __init__(self, browser: Any, server: ServerProcess, people: People, shots: Path, scheme: str = "light"):
        self.context = browser.new_context(base_url=server.url, color_scheme=scheme)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.failed: list[str] = []
        self.page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        self.people = people
        self.shots = shots
        self.scheme = scheme

    def sign_in(self, email: str, org: str = "") -> None:
        self.page.goto("/console/sign-in")
        self.check("sign-in")
        self.page.fill("#email", email)
        self.page.fill("#password", PASSWORD)
        if org:
            self.page.fill("#org", org)
        self.page.click("button[type=submit]")
        self.page.wait_for_url("**/console")

    def visit(self, path: str, name: str) -> None:
        self.page.goto(path)
        self.check(name)

    def check(self, name: str) -> None:
        """axe-core on the page as it is now (serious and critical violations recorded), and a screenshot."""
        self.page.wait_for_load_state("networkidle")
        if not self.page.evaluate("typeof window.axe !== 'undefined'"):
            self.page.evaluate(AXE_SOURCE)  # evaluated by the test driver, not loaded by the page (CSP stays on)
        found = self.page.evaluate(
            """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
                 .filter(v => v.impact === 'serious' || v.impact === 'critical')
                 .map(v => `${v.id} (${v.impact}): ${v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', ')}`)"""
        )
        self.people.violations.extend(f"{name} [{self.scheme}]: {v}" for v in found)
        self.people.pages_checked.append(f"{name} [{self.scheme}]")
        self.page.screenshot(path=str(self.shots / f"{name}-{self.scheme}.png"), full_page=True)

    def expected_failures(self, since: int) -> None:
        """Forget the messages since ``since`` that report an error status the test asked for (the browser's
        "Failed to load resource", htmx's "Response Status Error Code")."""
        expected = ("Failed to load resource", "Response Status Error Code")
        self.errors[since:] = [e for e in self.errors[since:] if not e.startswith(expected)]

    def close(self) -> None:
        assert self.errors == [], (self.errors, self.failed)  # no CSP violation, no script error
        self.context.close()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("browser") / "doubler.onnx"
    matmul_chain_model(path, 4)
    return path


def test_a_provider_registers_a_model_prices_it_and_asks_for_review(
    browser: Any, console_server: ServerProcess, people: People, screenshots: Path, onnx_file: Path
) -> None:
    s = Session(browser, console_server, people, screenshots)
    s.sign_in(people.provider)
    s.visit("/console/provider", "provider")
    name = unique("doubler")
    s.page.fill("#m-name", name)
    s.page.set_input_files("#m-file", str(onnx_file))
    s.page.fill("#m-task", "tabular-regression")
    s.page.fill("#m-description", "Multiplies four numbers through a chain of matrices.")
    s.page.fill("#m-intended", "Demonstrations of the console.")
    s.page.fill("#m-data", "None: the weights are made by the test.")
    s.page.fill("#m-metrics", "rmse=0.0")
    s.page.fill("#m-limits", "Not a real model.")
    s.page.fill("#m-license", "Apache-2.0")
    s.page.fill("#m-privacy", "Keeps no inputs.")
    s.page.get_by_role("button", name="Register", exact=True).click()
    people.model = f"{people.provider_org}/{name}"
    s.page.wait_for_url(f"**/console/models/{people.model}")
    s.page.fill("#plan", "per-call")
    s.page.select_option("#kind", "usage")
    s.page.fill("#price", "0.01")
    s.page.get_by_role("button", name="Add plan", exact=True).click()
    s.page.wait_for_selector("text=per-call")
    s.page.select_option("#visibility", "public")
    s.page.get_by_role("button", name="Save", exact=True).click()
    s.page.wait_for_selector("text=review: pending")
    s.check("model-provider")
    s.close()


def test_the_operator_approves_it_and_credits_the_consumer(
    browser: Any, console_server: ServerProcess, people: People, screenshots: Path, admin_http: httpx.Client
) -> None:
    s = Session(browser, console_server, people, screenshots)
    s.sign_in(people.operator)
    s.visit("/console/operator", "operator")
    card = s.page.locator("article", has_text=people.model)
    card.locator("input[name=reason]").fill("Card complete.")
    card.locator("button[value=approve]").click()
    s.page.wait_for_url("**/console/operator")
    assert s.page.locator("article", has_text=people.model).count() == 0
    assert admin_http.get(f"/api/models/{people.model}").json()["review_state"] == "approved"
    s.visit(f"/console/operator/orgs/{people.consumer_org}", "operator-org")
    s.page.fill("#amount", "10")
    s.page.fill("#reference", unique("payment"))
    s.page.get_by_role("button", name="Add", exact=True).click()
    s.page.wait_for_selector("text=10.00")
    s.visit("/console/operator/audit", "operator-audit")
    assert "Hash chain: intact" in s.page.inner_text("main")
    s.close()


def test_a_consumer_finds_and_tries_it_then_uses_a_key_with_the_openai_sdk(
    browser: Any, console_server: ServerProcess, people: People, screenshots: Path
) -> None:
    s = Session(browser, console_server, people, screenshots)
    s.sign_in(people.consumer)
    s.check("overview-empty")
    s.visit("/console/models", "catalogue")
    s.page.fill("#q", people.model.split("/")[1])  # htmx filters the list as one types
    expect(s.page.locator("#model-list li.card")).to_have_count(1)
    s.page.click(f"text={people.model}")
    s.page.wait_for_url(f"**/console/models/{people.model}")
    s.check("model")
    s.page.get_by_role("link", name="Try it").click()
    s.page.wait_for_url(lambda url: "/console/playground?model=" in url)
    body = '{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}'
    s.page.fill("#body", body)
    s.page.get_by_role("button", name="Infer", exact=True).click()
    s.page.wait_for_selector("#result table")
    assert "FP32" in s.page.inner_text("#result")
    s.check("playground-tensors")
    before = len(s.errors)
    s.page.fill("#body", '{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}')
    s.page.get_by_role("button", name="Infer", exact=True).click()
    s.page.wait_for_selector("#result [role=alert]")  # the API's 400, shown where the answer would be
    assert "shape" in s.page.inner_text("#result [role=alert]")
    s.expected_failures(before)  # the 400 itself is logged by the browser as a failed resource

    s.visit("/console/playground?model=all-minilm-l6-v2", "playground-embeddings")
    s.page.get_by_role("button", name="Embed and compare", exact=True).click()
    s.page.wait_for_selector("#result table.matrix")
    s.check("playground-similarity")

    s.visit("/console/keys", "keys")
    s.page.fill("#name", "notebook")
    s.page.get_by_role("button", name="Create key", exact=True).click()
    s.page.wait_for_selector("#secret")
    people.secret = s.page.input_value("#secret")
    assert people.secret.startswith("om_")
    s.check("key-created")
    s.visit("/console/keys", "keys-listed")
    listed = s.page.inner_text("main")
    assert people.secret not in listed and f"{people.secret[:8]}…{people.secret[-4:]}" in listed

    client = OpenAI(base_url=f"{console_server.url}/v1", api_key=people.secret)
    out = client.embeddings.create(model="all-minilm-l6-v2", input=["a sentence from the SDK"])
    assert len(out.data[0].embedding) == 384

    s.visit("/console/usage", "usage")
    table = s.page.inner_text("table")
    assert "all-minilm-l6-v2" in table and people.model in table
    s.visit("/console/billing", "billing")
    text = s.page.inner_text("main")
    assert "10.00" in text or "9.99" in text  # the credit, less the one paid call
    assert people.model.split("/")[1] in text  # the call's wallet movement names the model
    s.page.goto(f"/api/orgs/{people.consumer_org}/invoices/draft?format=html")  # the invoice, on the session
    assert people.model in s.page.content()
    s.visit("/console", "overview")
    assert "all-minilm-l6-v2" in s.page.inner_text("main")
    s.close()


def test_a_training_job_started_from_the_console_shows_live_progress(
    browser: Any, console_server: ServerProcess, people: People, screenshots: Path, tmp_path: Path
) -> None:
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame
    csv = tmp_path / "iris.csv"
    frame.to_csv(csv, index=False)
    s = Session(browser, console_server, people, screenshots)
    s.sign_in(people.consumer)
    s.visit("/console/jobs", "jobs")
    s.page.set_input_files("#ds-file", str(csv))
    s.page.fill("#ds-name", "iris")
    s.page.get_by_role("button", name="Upload", exact=True).click()
    s.page.wait_for_selector("td:has-text('iris')")
    s.page.select_option("#task", "tabular-classification")
    s.page.fill("#target", "target")
    s.page.fill("#epochs", "40")
    s.page.fill("#output_model", unique("iris"))
    s.page.get_by_role("button", name="Start training", exact=True).click()
    s.page.wait_for_url("**/console/jobs/*")
    s.page.evaluate("window.__stayed = true")  # gone if the page reloads: progress must arrive by htmx
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = s.page.inner_text("#job-status")
        if not seen or seen[-1] != status:
            seen.append(status)
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert seen[-1] == "succeeded", (seen, s.page.inner_text("main"))
    assert len(seen) >= 2, seen  # the state changed on screen while we watched
    assert s.page.evaluate("window.__stayed === true")
    s.page.wait_for_selector("img[alt^='Training curves']")
    s.check("job")
    s.close()


def test_streaming_chat_shows_tokens_as_they_arrive(
    browser: Any, console_server: ServerProcess, people: People, screenshots: Path, admin_http: httpx.Client
) -> None:
    deadline = time.monotonic() + 600
    while admin_http.get("/api/models/gemma-3-270m").json().get("ready") is not True:  # converted to int8
        assert time.monotonic() < deadline, "the bundled Gemma did not become ready"
        time.sleep(2)
    s = Session(browser, console_server, people, screenshots)
    s.sign_in(people.consumer)
    # One short call on the member's session first, so the model's first load (seconds, longer on a busy machine)
    # is not mistaken for a stream that shows nothing; it fails here, with the server's answer, if the call does.
    warm = s.context.request.post(
        "/v1/chat/completions",
        data={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers={"Origin": console_server.url},
        timeout=300_000,
    )
    assert warm.status == 200, (warm.status, warm.text(), server_log_tail(console_server))
    s.visit("/console/playground?model=gemma-3-270m", "playground-chat")
    s.page.fill("#prompt", "Write two sentences about the sea.")
    s.page.fill("#max_tokens", "40")
    # Greedy: at the form's default temperature the base model sometimes samples a stop sequence or its end token
    # first, and the reply stays empty (seen once here and once in CI); greedy decoding answers the same each run.
    s.page.fill("#temperature", "0")
    s.page.click("#send")
    lengths: list[int] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        lengths.append(len(s.page.inner_text("#reply")))
        if s.page.is_disabled("#stop") and lengths[-1] > 0:
            break
        time.sleep(0.02)
    grew = sorted({n for n in lengths if n > 0})
    state = {"reply": s.page.inner_text("#reply"), "usage": s.page.inner_text("#reply-usage"),
             "stop_disabled": s.page.is_disabled("#stop"), "samples": len(lengths), "errors": s.errors,
             "failed": s.failed}  # fmt: skip
    assert len(grew) >= 3, (grew, state, server_log_tail(console_server))  # text appeared in steps, not at once
    s.page.wait_for_selector("#reply-usage:has-text('completion tokens')")
    s.check("playground-chat-reply")
    # Text completion on the same form: /v1/completions, streamed into the same reply.
    s.page.select_option("#mode", "completion")
    s.page.fill("#prompt", "The capital of France is")
    s.page.fill("#max_tokens", "8")
    s.page.fill("#temperature", "0")
    with s.page.expect_response("**/v1/completions") as answer:
        s.page.click("#send")
    assert answer.value.status == 200
    s.page.wait_for_selector("#stop:disabled")
    s.page.wait_for_selector("#reply-usage:has-text('completion tokens')")
    same = s.context.request.post(
        "/v1/completions",
        data={"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0},
        headers={"Origin": console_server.url},
        timeout=300_000,
    )
    assert same.status == 200, same.text()
    assert s.page.inner_text("#reply").strip() == same.json()["choices"][0]["text"].strip() != ""
    s.close()


def server_log_tail(server: ServerProcess, lines: int = 40) -> str:
    """The server's last log lines, minus the test's own polling, for a failure message."""
    kept = [line for line in server.log().splitlines() if '"path":"/api/models/gemma-3-270m"' not in line]
    return "\n".join(kept[-lines:])


@pytest.fixture
def evil_site(console_server: ServerProcess) -> Iterator[str]:
    """A page on another origin (same host, other port: the browser sends the session cookie along) whose form
    posts to the console."""
    page = (f'<html><body><form id="f" method="post" action="{console_server.url}/console/keys">'
            '<input name="name" value="evil"><input name="scopes" value="inference"></form>'
            '<script>document.getElementById("f").submit()</script></body></html>').encode()  # fmt: skip

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            return None

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/"
    httpd.shutdown()
    httpd.server_close()


def test_cross_site_and_cross_organisation_attempts_are_refused(
    browser: Any, console_server: ServerProcess, people: People, screenshots: Path, admin_http: httpx.Client,
    evil_site: str,
) -> None:  # fmt: skip
    s = Session(browser, console_server, people, screenshots)
    s.sign_in(people.consumer)
    response = s.page.goto(evil_site)
    s.page.wait_for_url(f"{console_server.url}/console/keys")
    assert response is not None
    assert "cross-site request refused" in s.page.inner_text("main")
    keys = admin_http.get(f"/api/orgs/{people.consumer_org}/keys").json()["keys"]
    assert "evil" not in [k["name"] for k in keys]
    for path in ("/console/operator", f"/console/operator/orgs/{people.provider_org}"):
        s.page.goto(path)
        assert "Not found" in s.page.inner_text("h1")
    s.check("not-found")
    s.expected_failures(0)  # the refused pages' status codes show as console errors; nothing else may
    s.close()


def test_every_page_in_the_dark_theme_and_axe_found_nothing_serious(
    browser: Any, console_server: ServerProcess, people: People, screenshots: Path
) -> None:
    s = Session(browser, console_server, people, screenshots, scheme="dark")
    s.sign_in(people.consumer)
    for path, name in (("/console", "overview"), ("/console/models", "catalogue"),
                       (f"/console/models/{people.model}", "model"), ("/console/playground", "playground"),
                       ("/console/keys", "keys"), ("/console/usage", "usage"), ("/console/billing", "billing"),
                       ("/console/jobs", "jobs"), ("/console/batches", "batches"),
                       ("/console/provider", "provider")):  # fmt: skip
        s.visit(path, name)
    s.close()
    o = Session(browser, console_server, people, screenshots, scheme="dark")
    o.sign_in(people.operator)
    o.visit("/console/operator", "operator")
    o.close()
    assert people.violations == [], "\n".join(people.violations)
    assert len(people.pages_checked) >= 25
