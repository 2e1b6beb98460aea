"""The guard against a hostile agent, through real server processes and real MCP clients.

Each test here stands for a finding of the adversarial pass (issue 11) and
fails on the code that had it: an argument that froze every client, secrets
that reached the database files, a prompt auto-answered by the agent's own
client.
"""

from __future__ import annotations

import base64
import json
import random
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import stdio_client as stdio_transport
from mcp.shared.exceptions import MCPError

from tests import hostile_client
from tests.support import ROOT, Workspace, call, call_error, http_server, stdio_params

pytestmark = pytest.mark.anyio

# The catastrophic pattern from the adversarial pass: Python's backtracking
# re needs ~2^n steps for n word characters followed by one that is not.
CATASTROPHIC = r"^(\w+\s?)+$"
FREEZE_POLICY = f"""\
default: allow
tools:
  spawn-task:
    rules:
      - action: deny
        reason: "titles are plain words"
        conditions:
          - {{path: args.title, op: not_regex, value: '{CATASTROPHIC}'}}
"""
HUGE = hostile_client.HUGE


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def list_latencies(client: Client, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call(client, "list-tasks", {"limit": 5})
        samples.append(time.perf_counter() - started)
    return samples


async def measure_beside(base: str, victim: Client, stop: Path, *mode: str) -> tuple[float, dict[str, int]]:
    """The victim's list-tasks p99 while another client process runs ``tests.hostile_client``."""
    other = subprocess.Popen(
        [sys.executable, "-m", "tests.hostile_client", f"{base}/mcp", str(stop), *mode],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert other.stderr is not None
        ready = await anyio.to_thread.run_sync(other.stderr.readline)
        assert "ready" in ready, ready
        await anyio.sleep(0.3)  # its first calls are in flight
        latency = p99(await list_latencies(victim, 100))
    finally:
        stop.touch()
        out, err = await anyio.to_thread.run_sync(lambda: other.communicate(timeout=180))
    assert other.returncode == 0, err
    return latency, json.loads(out)


async def test_no_argument_or_policy_regex_stalls_another_client(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(FREEZE_POLICY)
    ws = Workspace(tmp_path, policy=policy)
    ratios = []
    with anyio.fail_after(300):  # the old code stalled 95 s on one such call
        async with http_server(ws, "--allow-anonymous", "--no-inbox") as base:
            async with Client(f"{base}/mcp") as victim:
                await list_latencies(victim, 10)  # warm up
                # The baseline is the same calls at the same pace with ordinary
                # arguments, so the ratio is the cost of hostile arguments, not
                # of sharing two cores. Noise is real: up to three rounds.
                for round_ in range(3):
                    baseline, _ = await measure_beside(base, victim, tmp_path / f"calm-{round_}", "--benign")
                    attacked, refused = await measure_beside(base, victim, tmp_path / f"stop-{round_}")
                    assert set(refused) == {
                        "huge title: invalid_arguments",
                        "unknown tool: Unknown tool: no-such-tool",
                        "catastrophic regex: policy_denied",
                    }, refused
                    ratios.append(attacked / baseline)
                    print(f"list-tasks p99: baseline {baseline * 1000:.1f} ms, under attack "
                          f"{attacked * 1000:.1f} ms, ratio {ratios[-1]:.2f}; attacker calls {refused}",
                          file=sys.stderr)
                    if ratios[-1] <= 2.0:
                        break
    assert min(ratios) <= 2.0, f"another client's p99 grew {min(ratios):.1f}x under attack (rounds: {ratios})"
    # The refusals were audited, with what was sent cut to a bounded size.
    audit = [json.loads(line) for line in ws.cli("audit", "--json").stdout.splitlines() if line.strip()]
    unknown = next(r for r in audit if r["tool"] == "no-such-tool")
    assert unknown["args"]["token"] == "[REDACTED]"
    assert len(json.dumps(unknown["args"])) < 20_000
    invalid = next(r for r in audit if r["decision"] == "invalid_arguments")
    assert "sk-sk-" not in json.dumps(invalid["args"])
    assert len(invalid["reason"]) < 300


def test_policy_check_rejects_a_pattern_re2_cannot_run(tmp_path: Path) -> None:
    bad = tmp_path / "lookbehind.yaml"
    bad.write_text(
        "default: allow\ntools:\n  spawn-task:\n    rules:\n      - action: deny\n        conditions:\n"
        "          - {path: args.title, op: regex, value: '(?<=x)y'}\n"
    )
    out = Workspace(tmp_path).cli("policy", "check", str(bad), check=False)
    assert out.returncode == 1
    message = out.stdout + out.stderr
    assert f"{bad}:7: tools.spawn-task.rules[0].conditions[0].value" in message
    assert "RE2" in message and "(?<=x)y" in message
    # The catastrophic pattern is fine for RE2: it is linear whatever the input.
    good = tmp_path / "catastrophic.yaml"
    good.write_text(FREEZE_POLICY)
    assert Workspace(tmp_path).cli("policy", "check", str(good)).stdout.startswith("OK")


# -- secrets ------------------------------------------------------------------------


def sixteen_secrets(seed: int = 11) -> dict[str, tuple[str, str]]:
    """Realistic credentials in 16+ formats: name → (text sent, the secret part that must not be stored)."""
    r = random.Random(seed)

    def rnd(alphabet: str, n: int) -> str:
        return "".join(r.choice(alphabet) for _ in range(n))

    alnum = string.ascii_letters + string.digits
    b64 = lambda n: base64.b64encode(bytes(r.randrange(256) for _ in range(n))).decode()  # noqa: E731
    aws_secret, azure_key, pem_body = b64(30), b64(64), b64(300)
    sa_key_id = rnd("0123456789abcdef", 40)
    password, basic = rnd(string.ascii_lowercase, 7) + rnd(string.digits, 3), rnd(alnum, 16)
    slack_hook = f"T{rnd(string.ascii_uppercase + string.digits, 8)}/B{rnd(string.ascii_uppercase, 10)}/{rnd(alnum, 24)}"
    sa_json = json.dumps({
        "type": "service_account", "project_id": "demo-project", "private_key_id": sa_key_id,
        "private_key": f"-----BEGIN PRIVATE KEY-----\n{pem_body}\n-----END PRIVATE KEY-----\n",
        "client_email": "bot@demo-project.iam.gserviceaccount.com",
    })  # fmt: skip
    formats = {
        "aws secret access key, bare": aws_secret,
        "aws access key id": "AKIA" + rnd(string.ascii_uppercase + string.digits, 16),
        "gitlab personal access token": "glpat-" + rnd(alnum + "_-", 20),
        "hugging face token": "hf_" + rnd(alnum, 34),
        "slack bot token": f"xoxb-{rnd(string.digits, 12)}-{rnd(string.digits, 13)}-{rnd(alnum, 24)}",
        "slack webhook": f"https://hooks.slack.com/services/{slack_hook}",
        "stripe live key": "sk_live_" + rnd(alnum, 24),
        "twilio api key": "SK" + rnd("0123456789abcdef", 32),
        "twilio auth token": rnd("0123456789abcdef", 32),
        "npm token": "npm_" + rnd(alnum, 36),
        "pypi token": "pypi-AgEIcHlwaS5vcmc" + rnd(alnum + "_-", 70),
        "azure storage key": azure_key,
        "azure connection string": f"DefaultEndpointsProtocol=https;AccountName=demo;AccountKey={azure_key};EndpointSuffix=core.windows.net",
        "gcp service-account json": sa_json,
        "ssh private key": f"-----BEGIN OPENSSH PRIVATE KEY-----\n{pem_body}\n-----END OPENSSH PRIVATE KEY-----",
        "basic-auth url": f"https://deploy:{basic}@git.example.com/org/repo.git",
        "password phrase": f"the password is {password}",
        "openai key": "sk-proj-" + rnd(alnum, 40),
        "github token": "ghp_" + rnd(alnum, 36),
    }
    secret_part = {
        "slack webhook": slack_hook.rsplit("/", 1)[1],
        "azure connection string": azure_key,
        "gcp service-account json": pem_body[40:80],
        "ssh private key": pem_body[100:140],
        "basic-auth url": basic,
        "password phrase": password,
    }
    return {name: (text, secret_part.get(name, text)) for name, text in formats.items()}


SECRETS_POLICY = """\
default: allow
tools:
  send-task-message:
    rules:
      - action: deny
        reason: "messages are off in this test"
  cancel-task:
    rules:
      - action: require_approval
        reason: "Cancelling needs a human"
        approval: {wait_s: 0.1, expires_s: 300}
"""


async def test_sixteen_key_formats_never_reach_the_database_files_or_logs(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(SECRETS_POLICY)
    ws = Workspace(tmp_path, policy=policy)
    secrets = sixteen_secrets()
    assert len(secrets) >= 16
    # Under names that say nothing, so only the value net can catch them.
    notes = {f"note_{i}": f"for the deploy: {text} (keep it)" for i, (text, _) in enumerate(secrets.values())}
    blob = "\n".join(f"{name}: {text}" for name, (text, _) in secrets.items())
    stderr_path = tmp_path / "server-stderr.log"
    with stderr_path.open("w") as stderr:
        async with Client(stdio_transport(stdio_params(ws), errlog=stderr)) as client:
            # A denied call, a call with an unknown argument, an unknown tool: audited, never run.
            denied = await call_error(client, "send-task-message", {"task_id": "tsk_x", "body": blob})
            assert denied.structured_content["error"] == "policy_denied"
            invalid = await call_error(client, "spawn-task", {"prompt": "say hi", "notes": notes})
            assert invalid.structured_content["error"] == "invalid_arguments"
            with pytest.raises(MCPError):
                await client.call_tool("deploy-everything", {"config": notes, "text": blob})
            # Held calls: each one is an approval row too, shown to people in the inbox.
            for name, (text, _) in secrets.items():
                held = await call_error(client, "cancel-task", {"task_id": "tsk_x", "reason": f"{name}: {text}"[:2000]})
                assert held.structured_content["error"] == "approval_required"
    stored = json.dumps([*audit_rows(ws), *approval_rows(ws)])
    assert stored.count("[REDACTED]") >= 3 * len(secrets)
    places = [Path(f"{ws.db}{suffix}") for suffix in ("", "-wal", "-shm")] + [stderr_path]
    places += [p for p in tmp_path.rglob("*.log") if p not in places]
    assert ws.db.exists()
    leaks = []
    for place in places:
        if not place.exists():
            continue
        data = place.read_bytes()
        for name, (_, secret) in secrets.items():
            if secret.encode() in data:
                leaks.append(f"{name} in {place.name}")
    assert not leaks, leaks
    # Digests still tie the rows to the exact calls, through a key kept beside the database.
    key = Path(f"{ws.db}.key")
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600


def audit_rows(ws: Workspace) -> list[dict]:
    return [json.loads(line) for line in ws.cli("audit", "--json").stdout.splitlines() if line.strip()]


def approval_rows(ws: Workspace) -> list[dict]:
    return json.loads(ws.cli("approvals", "list", "--json").stdout)
