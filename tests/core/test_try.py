"""``tampu try``: a dry run of one envelope through the live configuration, writing nothing."""

from __future__ import annotations

import json
import os

from tampu.testing import make_config_dir, server_toml
from tests.helpers import run_tampu

USER = "user@example.test"
CONF = {
    "31-aliases.toml": "[plugins.aliases]\nenabled = true\n",
    "32-hooks.toml": "[plugins.hooks]\nenabled = true\n",
    "40-maildir.toml": "[plugins.delivery_maildir]\nenabled = true\n",
}


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root)
            for d, _, names in os.walk(root) for f in names}


def config(tmp_path):
    root = make_config_dir(tmp_path / "conf", conf=CONF, users={USER: "secret"},
                           base=server_toml(plugins=("auth", "localusers", "relay")))
    (root / "domains" / "example.test" / "aliases").write_text("team: user, someone@remote.test\n")
    hook = root / "hooks" / "post-data"
    hook.parent.mkdir()
    marker = tmp_path / "hook-ran"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\necho X-Hook: yes\n")
    hook.chmod(0o755)
    return root, marker


def test_routes_each_recipient_and_writes_nothing(tmp_path):
    root, marker = config(tmp_path)
    before = files_under(root)
    done = run_tampu("try", "--config-dir", str(root), "--from", "a@example.org",
                     "--to", "team@example.test", "--to", "nobody@example.test",
                     "--to", "x@remote.test", "--ip", "203.0.113.5", "--json")
    assert done.returncode == 1, done.stderr  # two recipients would be refused
    out = json.loads(done.stdout)
    steps = {(s["stage"], s["subject"]): s for s in out["steps"]}
    assert steps["rcpt", "team@example.test"]["plugin"] == "aliases"
    assert steps["rcpt", "nobody@example.test"]["outcome"] == "refused"
    assert "5.1.1" in steps["rcpt", "nobody@example.test"]["text"]
    assert steps["rcpt", "x@remote.test"]["plugin"] == "relay"
    assert steps["rcpt", "x@remote.test"]["outcome"] == "refused"
    # the alias expands to a local mailbox and a forward off the server
    expanded = [s["outcome"] for s in out["steps"] if s["stage"] == "expand"]
    assert expanded == ["user@example.test", "someone@remote.test"]
    route = steps["route", "user@example.test"]
    assert route["plugin"] == "delivery_maildir"
    assert str(root / "data" / "mail" / "example.test" / "user") in route["outcome"]
    assert ["smtp_data", "hooks"] in out["skipped"]
    assert not marker.exists(), "the post-data program ran during a dry run"
    # no queue file, no Maildir; only the forwarding key the server would make anyway
    assert files_under(root) - before <= {"data/aliases.key"}, "a dry run wrote files"


def test_text_output_names_skipped_hooks_and_success(tmp_path):
    root, _ = config(tmp_path)
    done = run_tampu("try", "--config-dir", str(root), "--from", "a@example.org",
                     "--to", USER)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert "RCPT TO user@example.test: accepted by localusers" in text
    assert "skipped hooks in smtp_data: unsafe for dry runs" in text
    assert "delivery_maildir" in text and "nothing was queued or delivered" in text


def test_authenticated_submission_may_relay(tmp_path):
    root, _ = config(tmp_path)
    done = run_tampu("try", "--config-dir", str(root), "--from", USER, "--auth", USER,
                     "--to", "x@remote.test", "--json")
    out = json.loads(done.stdout)
    rcpt = next(s for s in out["steps"] if s["stage"] == "rcpt")
    assert rcpt["outcome"] == "accepted", rcpt
    route = next(s for s in out["steps"] if s["stage"] == "route")
    assert route["subject"] == "x@remote.test" and route["outcome"] != "refused"


def test_bad_address_and_bad_config(tmp_path):
    root, _ = config(tmp_path)
    done = run_tampu("try", "--config-dir", str(root), "--from", "a@example.org",
                     "--to", "not an address")
    assert done.returncode == 1 and "501" in done.stdout
    (root / "conf.d" / "50-bad.toml").write_text("[server]\nmax_errors = -1\n")
    done = run_tampu("try", "--config-dir", str(root), "--to", USER)
    assert done.returncode == 2 and "50-bad.toml" in done.stderr


def test_remote_recipients_are_routed_to_their_mx(tmp_path, make_dns):
    dns = make_dns({"remote.test": {"MX": ["10 mx1.remote.test.", "20 mx2.remote.test."]}})
    root = make_config_dir(tmp_path / "conf", users={USER: "secret"}, conf={
        "45-remote.toml": "[plugins.delivery_smtp]\nenabled = true\n"},
        base=server_toml(extra=f'dns_servers = ["127.0.0.1:{dns.port}"]'))
    done = run_tampu("try", "--config-dir", str(root), "--from", USER, "--auth", USER,
                     "--to", "x@remote.test", "--json")
    route = next(s for s in json.loads(done.stdout)["steps"] if s["stage"] == "route")
    assert route["plugin"] == "delivery_smtp"
    assert route["outcome"] == "SMTP to the MX of remote.test: mx1.remote.test, mx2.remote.test"
