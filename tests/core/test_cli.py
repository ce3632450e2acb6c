"""The real ``tampu`` command in subprocesses: check, plugins, and serve (SIGTERM, default
configuration)."""

from __future__ import annotations

import ast
import asyncio
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tampu.testing import make_config_dir, server_toml
from tests.conftest import require_tool
from tests.dnsserver import DNSServer
from tests.helpers import RawClient, free_ports, run_tampu, serving

REPO = Path(__file__).resolve().parents[2]


def test_check_accepts_a_valid_configuration(tmp_path):
    root = make_config_dir(tmp_path / "conf")
    done = run_tampu("check", "--config-dir", str(root))
    assert done.returncode == 0, done.stderr
    assert "is valid (1 file(s), 4 plugin(s) enabled)" in done.stdout
    assert done.stderr == ""


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("unknown-plugin", "[plugins.antivirus]\nenabled = true\n",
     r"key plugins\.antivirus: unknown plugin 'antivirus' \(available: .*auth.*localusers.*\)"),
    ("unknown-key", "[plugins.relay]\nenabled = true\nopen = true\n",
     r"key plugins\.relay\.open: unknown key"),
    ("wrong-type", "[server]\nmax_message_size = \"big\"\n",
     r"key server\.max_message_size: Input should be a valid integer"),
    ("invalid-toml", "[server\nhostname = 'x'\n", r"not valid TOML: .*line 1"),
    ("unreadable", None, r"cannot read: No such file or directory"),
])
def test_check_reports_problems(tmp_path, name, text, expected):
    root = make_config_dir(tmp_path / "conf")
    bad = root / "conf.d" / f"50-{name}.toml"
    if text is None:
        bad.symlink_to(tmp_path / "missing.toml")
    else:
        bad.write_text(text)
    done = run_tampu("check", "--config-dir", str(root))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("tampu: the configuration has problems:\n")
    line = done.stderr.splitlines()[1]
    assert line.startswith(f"  - {bad}: "), line
    assert re.search(expected, line), line


def test_serve_refuses_a_bad_configuration(tmp_path):
    root = make_config_dir(tmp_path / "conf", conf={"50-x.toml": "[server]\nworkerz = 2\n"})
    done = run_tampu("serve", "--config-dir", str(root), timeout=30)
    assert done.returncode == 2
    assert "50-x.toml: key server.workerz: unknown key" in done.stderr


def test_plugins_lists_distribution_and_order_per_hook(tmp_path):
    root = make_config_dir(tmp_path / "conf", base=server_toml(
        plugins=("relay", "localusers", "auth", "loopdetect")),
        conf={"50-p.toml": "[plugins.loopdetect]\nenabled = false\n"
                           "[plugins.auth]\npriority = 5\n"})
    done = run_tampu("plugins", "--config-dir", str(root))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert re.match(r"  auth +enabled +built-in +tampu \S+ +priority=5 +hooks: smtp_auth$",
                    lines["auth"]), lines["auth"]
    assert re.match(r"  relay +enabled +built-in +tampu \S+ +priority=100 +hooks: "
                    r"smtp_connect, smtp_rcpt_to",
                    lines["relay"])
    assert re.match(r"  loopdetect +disabled +built-in +tampu ", lines["loopdetect"])
    plugin_part, _, order_part = out.partition("Order per hook:\n")
    # enabled first, by priority then conf.d order
    names = [ln.split()[0] for ln in plugin_part.splitlines()[1:]]
    assert names[:3] == ["auth", "relay", "localusers"]
    assert re.search(r"^  smtp_rcpt_to +relay -> localusers$", order_part, re.M), order_part
    assert re.search(r"^  smtp_auth +auth$", order_part, re.M)
    assert "smtp_data" not in order_part  # loopdetect is disabled: nobody implements it


# ------------------------------------------------------------------------------ serve


def _serve_confdir(root: Path, ports: list[int]) -> Path:
    base = server_toml()
    for kind, port in zip(("smtp", "submission", "submissions"), ports, strict=True):
        base = base.replace(f'[server.listeners.{kind}]\nkind = "{kind}"\n'
                            'addresses = ["127.0.0.1:0"]',
                            f'[server.listeners.{kind}]\nkind = "{kind}"\n'
                            f'addresses = ["127.0.0.1:{port}"]')
    assert "127.0.0.1:0" not in base
    return make_config_dir(root, base=base, users={"user@example.test": "secret"}, conf={
        "10-serve.toml": "[server]\nself_signed_cert = true\nshutdown_timeout = 5\n"})


def test_sigterm_stops_gracefully(tmp_path):
    ports = free_ports(3)
    root = _serve_confdir(tmp_path / "conf", ports)
    with serving(root, ports[0]) as (proc, log), RawClient(ports[0]) as idle, \
            RawClient(ports[0]) as busy:
        assert (root / "data" / "tampu.pid").read_text().strip() == str(proc.pid)
        for c in (idle, busy):
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.test")[0] == 250
        assert busy.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert busy.cmd("RCPT TO:<user@example.test>")[0] == 250
        proc.send_signal(signal.SIGTERM)
        code, lines = idle.reply()
        assert (code, lines[0][:6]) == (421, "4.3.2 "), lines
        assert idle.closed_by_server()
        # the open transaction may finish, then it is told goodbye too
        assert busy.cmd("DATA")[0] == 354
        busy.send_raw(b"Subject: last one\r\n\r\nbye\r\n.\r\n")
        code, lines = busy.reply()
        assert code == 250, lines
        code, lines = busy.reply()
        assert code == 421, lines
        rc = proc.wait(timeout=20)
        assert rc == 0, log.read_text()
        assert "tampu stopped" in log.read_text()
        assert not (root / "data" / "tampu.pid").exists()


def _shipped_confdir(root: Path) -> int:
    """The repository's conf.d as shipped, each listener on a free port; the smtp port."""
    shutil.copytree(REPO / "conf.d", root / "conf.d")
    used: list[int] = []
    for path in sorted((root / "conf.d").glob("*.toml")):
        text = path.read_text()

        def fresh(match: re.Match[str]) -> str:
            port = free_ports(1)[0]
            used.append(port)
            return f"127.0.0.1:{port}"

        lines = [re.sub(r"127\.0\.0\.1:\d+", fresh, ln) if not ln.lstrip().startswith("#")
                 else ln for ln in text.splitlines(keepends=True)]
        path.write_text("".join(lines))
    smtp_port = used[0]  # 00-server.toml: the smtp listener comes first
    assert f"127.0.0.1:{smtp_port}" in (root / "conf.d" / "00-server.toml").read_text()
    return smtp_port


def test_serve_default_configuration_accepts_mail_for_postmaster(tmp_path):
    swaks = require_tool("swaks")
    root = tmp_path / "conf"
    smtp_port = _shipped_confdir(root)
    with serving(root, smtp_port) as (proc, log):
        done = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(smtp_port), "--from", "",
             "--to", "postmaster@localhost", "--helo", "client.test", "--timeout", "20"],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr + log.read_text()
        assert "<-  250 2.0.0 Queued as" in done.stdout
        # the self-signed certificate was made by a child interpreter: cryptography is not
        # in the server's memory
        assert "made a self-signed certificate for" in log.read_text()
        assert list((root / "data" / "selfsigned").glob("*/fullchain.pem"))
        assert "cryptography" not in Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()


def test_the_server_log_has_one_line_per_transaction_and_per_delivery_at_info(tmp_path):
    """The shipped configuration at its default level: a message that SPF, DMARC and the
    aliases all look at leaves one server-log line for its transaction and one per delivery
    (their verdicts go into its headers, the mail log and the decision journal)."""
    root = tmp_path / "conf"
    smtp_port = _shipped_confdir(root)
    (root / "domains" / "localhost").mkdir(parents=True)
    (root / "domains" / "localhost" / "aliases").write_text("team: postmaster, abuse\n")
    with DNSServer() as dns:
        dns.spf("example.org", "ip4:127.0.0.1 -all")
        dns.dmarc("example.org", "none")
        (root / "conf.d" / "99-test.toml").write_text(f"[server]\n{dns.conf_line}\n")
        with serving(root, smtp_port) as (proc, log), RawClient(smtp_port) as c:
            assert c.reply()[0] == 220
            assert c.cmd("EHLO client.test")[0] == 250
            for _ in range(2):  # the first loads the aliases file (a line of its own, once)
                start = len(log.read_text().splitlines())
                assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
                assert c.cmd("RCPT TO:<team@localhost>")[0] == 250
                assert c.cmd("DATA")[0] == 354
                c.send_raw(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n.\r\n")
                code, lines = c.reply()
                assert code == 250, lines
                qid = lines[-1].rpartition(" ")[2]
                deadline = time.monotonic() + 30
                while log.read_text().count(f"qid={qid} ") < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.3)  # anything logged late about the message is here by now
            new = log.read_text().splitlines()[start:]
        assert len(new) == 3, new
        assert sum(" INFO tampu.smtp: " in ln and f"qid={qid} " in ln for ln in new) == 1, new
        assert sum(" INFO tampu.delivery: " in ln and f"qid={qid} " in ln
                   and "status=sent" in ln for ln in new) == 2, new
    delivered = list((root / "data" / "mail" / "localhost" / "postmaster" / "new").iterdir())
    head = delivered[0].read_text().split("\n\n")[0]
    assert "received-spf: pass" in head.lower() and "dmarc=pass" in head  # the checks ran


def test_serve_builds_only_the_core_commands_so_it_imports_no_other_command():
    """Memory: the command line of ``serve`` (and of the workers it forks) imports neither
    the other commands' modules nor every plugin for its CLI; ``--help`` still lists all."""
    import sys

    code = ("import sys; from tampu.cli import build_parser, command_of; "
            "build_parser(command_of(sys.argv[1:])); "
            "print(sorted(m for m in sys.modules if m.startswith(('tampu.commands.', "
            "'tampu.chasquid', 'tampu.plugins.'))))")
    lean = subprocess.run([sys.executable, "-c", code, "--config-dir", "serve", "serve"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert lean.stdout.strip() == "[]", lean.stdout
    full = subprocess.run([sys.executable, "-c", code, "queue", "list"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert "tampu.commands.import_chasquid" in full.stdout
    assert "tampu.plugins.queue_postgres" in full.stdout
    listed = run_tampu("--help").stdout
    assert "serve" in listed and "sendmail" in listed and "dkim" in listed


def test_serve_imports_the_configured_plugins_and_the_store_before_the_workers_fork(tmp_path):
    """What the lean command line no longer imports by chance, ``preload`` imports on
    purpose before the fork, so that the workers share those pages with the main process:
    every plugin conf.d names (enabled or not: the registry checks them all) and the store."""
    import sys

    root = tmp_path / "conf"
    _shipped_confdir(root)
    code = ("import sys; from tampu.config import load_config; from tampu.runtime import "
            "preload; preload(load_config(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.startswith('tampu.plugins.') "
            "and m.count('.') == 2)); print('tampu.store_files' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True,
                          text=True, check=True, timeout=60)
    plugins, store = done.stdout.splitlines()
    named = re.findall(r"^\[plugins\.(\w+)\]", "".join(
        p.read_text() for p in (root / "conf.d").glob("*.toml")), re.M)
    assert {f"tampu.plugins.{n}" for n in named} <= set(ast.literal_eval(plugins)), named
    assert "tampu.plugins.dovecot_auth" in plugins  # named, not enabled: loaded all the same
    assert store == "True"


def test_config_show_gives_each_value_and_its_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("TAMPU_TEST_PW", "hunter2")
    root = make_config_dir(tmp_path / "conf", conf={
        "50-x.toml": '[server]\nmax_recipients = 7\n[plugins.loopdetect]\nmax_received = 9\n'
                     '[plugins.delivery_smtp]\nenabled = true\n'
                     '[plugins.delivery_smtp.smarthost]\nhost = "relay.example.test:587"\n'
                     'username = "me"\npassword = {"$env" = "TAMPU_TEST_PW"}\n'})
    done = run_tampu("config", "show", "--config-dir", str(root))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "max_recipients = 7    # conf.d/50-x.toml" in out
    assert "max_message_size = 52428800    # (default)" in out
    assert "[plugins.loopdetect]" in out and "max_received = 9    # conf.d/50-x.toml" in out
    assert "hunter2" not in out  # secrets never shown
    changed = run_tampu("config", "show", "--changed", "--config-dir", str(root)).stdout
    assert "max_recipients = 7" in changed and "(default)" not in changed


def test_every_subcommand_takes_config_dir_in_the_same_place(tmp_path, monkeypatch):
    root = make_config_dir(tmp_path / "conf")
    for args in (["queue", "list"], ["user", "list"], ["users", "check"], ["check"],
                 ["plugins"], ["config", "show"], ["domaininfo", "show"]):
        before = run_tampu(*args[:1], "--config-dir", str(root), *args[1:])
        after = run_tampu(*args, "--config-dir", str(root))
        assert before.returncode == after.returncode == 0, (args, before.stderr, after.stderr)
    env_default = run_tampu("queue", "list", env={"TAMPU_CONFIG_DIR": str(root)})
    assert env_default.returncode == 0 and "queue is empty" in env_default.stdout
    version = run_tampu("--version")
    assert version.returncode == 0 and version.stdout.startswith("tampu 0.")


def test_domaininfo_show_and_remove(tmp_path):
    from tampu.plugins.domaininfo.store import DomainInfoStore, SecLevel

    root = make_config_dir(tmp_path / "conf")
    store = DomainInfoStore(root / "data" / "domaininfo")
    asyncio.run(store.check_outgoing("Example.ORG", SecLevel.TLS_VERIFIED))
    shown = run_tampu("domaininfo", "show", "--config-dir", str(root))
    assert "example.org  incoming=plain  outgoing=tls_verified" in shown.stdout
    assert run_tampu("domaininfo", "remove", "example.org", "--config-dir",
                     str(root)).returncode == 0
    assert run_tampu("domaininfo", "remove", "example.org", "--config-dir",
                     str(root)).returncode == 1
    assert "no domain known" in run_tampu("domaininfo", "show", "--config-dir",
                                          str(root)).stdout
