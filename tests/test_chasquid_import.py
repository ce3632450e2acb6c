"""``tampu import chasquid``: a chasquid directory made with the real chasquid-util becomes a
tampu configuration that passes ``tampu check`` and serves the same users, passwords, aliases,
hook, certificate and MDA (and ``to_confd``'s mapping of every chasquid.conf field)."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import stat
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tampu.chasquid import CONFIG_SCHEMA, ChasquidConfig, parse_config, to_confd
from tampu.commands import import_chasquid
from tampu.config import load_config
from tampu.registry import available_entry_points, build_registry
from tampu.testing import context_for, default_ca
from tests.conftest import require_tool
from tests.helpers import RawClient, free_ports, run_tampu, serving

DOMAIN = "chasquid.test"
HOSTNAME = "mx.chasquid.test"
JOSE_PASSWORD = "secreto ñ 1"
ANA_PASSWORD = "ana's password"


def chasquid_util(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("chasquid-util"), f"-C={root}", *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL, cwd=root)


def chasquid_conf(root: Path, ports: dict[str, int], *, dovecot: bool, haproxy: bool) -> str:
    """A chasquid.conf where every field differs from chasquid's default."""
    return f"""\
# written for the test: every field set, none at its default
hostname: "{HOSTNAME}"
max_data_size_mb: 10
smtp_address: "127.0.0.1:{ports['smtp']}"
smtp_address: "127.0.0.2:{ports['smtp']}"
submission_address: "127.0.0.1:{ports['submission']}"
submission_over_tls_address: "127.0.0.1:{ports['submissions']}"
monitoring_address: "127.0.0.1:{ports['monitoring']}"
mail_delivery_agent_bin: "{root}/mda"
mail_delivery_agent_args: "%to_user%"
mail_delivery_agent_args: "%to_domain%"
mail_delivery_agent_args: "%from%"
data_dir: "data"
suffix_separators: "-+"
drop_characters: "._"
mail_log_path: "log/mail.log"
dovecot_auth: {str(dovecot).lower()}
dovecot_userdb_path: "{root}/dovecot/auth-userdb"
dovecot_client_path: "{root}/dovecot/auth-client"
haproxy_incoming: {str(haproxy).lower()}
max_queue_items: 50
give_up_send_after: "48h"
"""


def make_chasquid_dir(root: Path, *, dovecot: bool = False, haproxy: bool = True
                      ) -> dict[str, int]:
    """A chasquid configuration as chasquid's own tools make it; returns the ports."""
    ports = dict(zip(("smtp", "submission", "submissions", "monitoring"), free_ports(4),
                     strict=True))
    root.mkdir(parents=True)
    (root / "chasquid.conf").write_text(chasquid_conf(root, ports, dovecot=dovecot,
                                                      haproxy=haproxy))
    for address, password in ((f"jose@{DOMAIN}", JOSE_PASSWORD),
                              ("ana@other.test", ANA_PASSWORD)):
        done = chasquid_util(root, "user-add", address, f"--password={password}")
        assert done.returncode == 0, done.stdout + done.stderr
    users = root / "domains" / DOMAIN / "users"
    done = chasquid_util(root, "user-add", f"rose@{DOMAIN}", "--receive_only")
    if done.returncode != 0:  # Debian's chasquid 1.11 predates --receive_only (1.13)
        users.write_text(users.read_text() + 'users: {\n  key: "rose"\n  value: {\n'
                         "    denied: {}\n  }\n}\n")
    (root / "domains" / DOMAIN / "aliases").write_text("# chasquid aliases\npepe: jose\n")
    done = subprocess.run([require_tool("openssl"), "genpkey", "-algorithm", "RSA", "-pkeyopt",
                           "rsa_keygen_bits:2048", "-out", str(root / "domains" / DOMAIN /
                                                               "dkim:sel1.pem")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr  # a DKIM key as chasquid 1.14+ signs with
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "post-data").write_text('#!/bin/sh\ncat > /dev/null\necho "X-Chasquid-Hook: '
                                     'ran for $RCPT_TO"\n')
    # whole or not at all: the test reads the file as soon as it exists
    (root / "mda").write_text(f'#!/bin/sh\n{{ echo "from=$3"; cat; }} > "{root}/.$1@$2.$$" && '
                              f'mv "{root}/.$1@$2.$$" "{root}/delivered/$1@$2"\n')
    for program in (hooks / "post-data", root / "mda"):
        program.chmod(0o755)
    (root / "delivered").mkdir()
    certs = root / "certs" / HOSTNAME
    certs.mkdir(parents=True)
    done = subprocess.run(
        [require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={HOSTNAME}", "-addext", f"subjectAltName=DNS:{HOSTNAME}",
         "-keyout", str(certs / "privkey.pem"), "-out", str(certs / "fullchain.pem")],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    info = root / "data" / "domaininfo"
    info.mkdir(parents=True)
    (info / "s:example.org").write_text('name: "example.org"\nincoming_sec_level: TLS_CLIENT\n'
                                        "outgoing_sec_level: TLS_SECURE\n")
    (root / "data" / "queue").mkdir()
    (root / "data" / "queue" / "m:0123abcd").write_text("chasquid queue item\n")
    return ports


def client_tls(root: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(root / "certs" / HOSTNAME / "fullchain.pem"))
    return ctx


def proxied(port: int, *, tls: ssl.SSLContext | None = None) -> RawClient:
    """A connection as HAProxy makes it: PROXY v1 header first (haproxy_incoming)."""
    c = RawClient(port, tls=tls, server_hostname=HOSTNAME)
    if tls is None:
        c.send_raw(f"PROXY TCP4 192.0.2.7 127.0.0.1 40000 {port}\r\n".encode())
    return c


def auth_plain(c: RawClient, login: str, password: str) -> int:
    blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return c.cmd(f"AUTH PLAIN {blob}")[0]


def submission_login(root: Path, port: int, login: str, password: str) -> int:
    with proxied(port) as c:
        assert c.reply()[0] == 220
        code, lines = c.cmd("EHLO client.test")
        assert code == 250 and "STARTTLS" in lines
        c.starttls(client_tls(root), server_hostname=HOSTNAME)
        code, lines = c.cmd("EHLO client.test")
        assert code == 250 and any(ln.startswith("AUTH") for ln in lines)
        return auth_plain(c, login, password)


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{path} did not appear within {timeout}s")


# ------------------------------------------------------------------------------ end to end


def test_import_check_serve_and_log_in_with_chasquids_passwords(tmp_path, dns_server):
    root = tmp_path / "chasquid"
    ports = make_chasquid_dir(root, haproxy=True)
    done = run_tampu("import", "chasquid", str(root))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in CONFIG_SCHEMA:  # every field is reported, mapped or not
        assert f"  {name}" in out, name
    assert "haproxy_incoming: not on the submissions listener" in out
    assert "DKIM" in out and "1 message(s) in chasquid's queue" in out
    assert f"domains/{DOMAIN}: users: 2 (1 receive-only), aliases" in out
    assert f"certs/{HOSTNAME}/" in out and "hooks/post-data" in out
    assert "domaininfo: 1 domain(s) converted" in out
    assert "is valid" in out  # the import ran tampu check itself
    confd = root / "conf.d"
    assert (confd / "00-server.toml").exists() and (confd / "40-delivery-local.toml").exists()
    assert not (root / "domains" / "example.org").exists()
    converted = json.loads((root / "data" / "domaininfo" / "example.org.json").read_text())
    assert converted == {"domain": "example.org", "incoming": "tls_unverified",
                         "outgoing": "tls_verified"}
    assert (root / "data" / "domaininfo" / "s:example.org").exists()  # chasquid's is kept

    check = run_tampu("check", "--config-dir", str(root))
    assert check.returncode == 0, check.stdout + check.stderr

    # a second import does not overwrite the conf.d, unless --force (which keeps the old one)
    again = run_tampu("import", "chasquid", str(root))
    assert again.returncode == 2 and "--force" in again.stderr
    forced = run_tampu("import", "chasquid", str(root), "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(list(root.glob("conf.d.before-import-*/00-server.toml"))) == 1

    (confd / "99-test-dns.toml").write_text(f'[server]\ndns_servers = ["{dns_server.address}"]'
                                            "\nfile_check_interval = 0\n")
    with serving(root, ports["submissions"]) as (proc, log):
        # submission (587-style, behind HAProxy): STARTTLS, then AUTH PLAIN with the password
        # given to chasquid-util
        assert submission_login(root, ports["submission"], f"jose@{DOMAIN}",
                                JOSE_PASSWORD) == 235
        assert submission_login(root, ports["submission"], f"jose@{DOMAIN}", "wrong") == 535
        assert submission_login(root, ports["submission"], f"rose@{DOMAIN}", "") == 535
        assert submission_login(root, ports["submission"], f"rose@{DOMAIN}", "x") == 535
        # submissions (implicit TLS, no PROXY header) for the other domain
        with RawClient(ports["submissions"], tls=client_tls(root),
                       server_hostname=HOSTNAME) as c:
            assert c.reply()[0] == 220
            c.cmd("EHLO client.test")
            assert auth_plain(c, "ana@other.test", ANA_PASSWORD) == 235

        # incoming mail on both smtp addresses: users, receive-only, aliases, suffix and drop
        for host in ("127.0.0.1", "127.0.0.2"):
            with RawClient(ports["smtp"], host=host) as c:
                c.send_raw(f"PROXY TCP4 192.0.2.7 {host} 40000 {ports['smtp']}\r\n".encode())
                greeting = c.reply()
                assert greeting[0] == 220 and HOSTNAME in greeting[1][0]
                code, lines = c.cmd("EHLO sender.example.org")
                assert code == 250 and f"SIZE {10 * 1024 * 1024}" in lines
                assert c.cmd("MAIL FROM:<someone@example.org>")[0] == 250
                assert c.cmd(f"RCPT TO:<nobody@{DOMAIN}>")[0] == 550
                assert c.cmd(f"RCPT TO:<rose@{DOMAIN}>")[0] == 250
                if host == "127.0.0.1":
                    assert c.cmd(f"RCPT TO:<J.o_se-tag@{DOMAIN}>")[0] == 250
                    assert c.cmd(f"RCPT TO:<pepe+x@{DOMAIN}>")[0] == 250
                    assert c.cmd("DATA")[0] == 354
                    c.send_raw(b"Subject: from chasquid's world\r\n\r\nhola\r\n.\r\n")
                    assert c.reply()[0] == 250
                c.cmd("QUIT")
        # delivered through the MDA (not a Maildir), with the hook's header
        jose = wait_for(root / "delivered" / f"jose@{DOMAIN}")
        assert jose.startswith("from=someone@example.org\n")
        assert "X-Chasquid-Hook: ran for" in jose and "hola" in jose
        assert "hola" in wait_for(root / "delivered" / f"rose@{DOMAIN}")
        assert not (root / "data" / "mail").exists()
        # monitoring_address serves tampu's metrics; mail_log_path has the mail log
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['monitoring']}/metrics",
                                    timeout=10) as resp:
            assert resp.status == 200 and b"tampu" in resp.read()
        assert "someone@example.org" in wait_for(root / "log" / "mail.log")
        assert proc.poll() is None, log.read_text()


def test_every_field_non_default_passes_tampu_check(tmp_path):
    """All 18 fields set (dovecot_auth and haproxy_incoming on), imported into another
    directory with --to: the result passes ``tampu check``."""
    root = tmp_path / "chasquid"
    make_chasquid_dir(root, dovecot=True, haproxy=True)
    sockets = []
    (root / "dovecot").mkdir()
    for name in ("auth-userdb", "auth-client"):  # real sockets where chasquid.conf says
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(root / "dovecot" / name))
        sock.listen()
        sockets.append(sock)
    try:
        target = tmp_path / "tampu"
        rc = import_chasquid.main(["chasquid", str(root), "--to", str(target)])
        assert rc == 0
        for name in ("domains", "certs", "hooks"):  # chasquid's files stay where they are
            assert (target / name).is_symlink()
            assert (target / name).resolve() == (root / name).resolve()
        config = load_config(target)
        assert config.server.hostname == HOSTNAME
        assert config.data_dir == (root / "data").resolve()
        assert config.plugins["maillog"].values["path"] == str((root / "log" /
                                                                "mail.log").resolve())
        dovecot = "dovecot_auth" in config.plugins
        installed = "dovecot_auth" in available_entry_points()
        assert dovecot == installed
        check = run_tampu("check", "--config-dir", str(target))
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        for sock in sockets:
            sock.close()


def test_refusals(tmp_path, capsys):
    missing = import_chasquid.main(["chasquid", str(tmp_path / "nothing")])
    assert missing == 2 and "cannot read" in capsys.readouterr().err
    root = tmp_path / "c"
    root.mkdir()
    (root / "chasquid.conf").write_text('hostname: "a"\n\nsmtp_adress: ":25"\n')
    assert import_chasquid.main(["chasquid", str(root)]) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "unknown field 'smtp_adress'" in err
    assert not (root / "conf.d").exists()


# ------------------------------------------------------------------------------ to_confd


def confd_config(tmp_path: Path, files: dict[str, str]):
    confd = tmp_path / "conf.d"
    confd.mkdir(parents=True)
    for name, text in files.items():
        tomllib.loads(text)  # each file is valid TOML on its own
        (confd / name).write_text(text)
    config = load_config(tmp_path)
    build_registry(config, context_for(config))
    return config


def accounted(mapped: list[str], unmapped: list[tuple[str, str]]) -> set[str]:
    names = {line.split(" ", 1)[0] for line in mapped} | {name for name, _ in unmapped}
    return names & set(CONFIG_SCHEMA)


def test_defaults_map_to_chasquid_behaviour(tmp_path):
    cfg = parse_config("", system_hostname="host.test")
    files, mapped, unmapped = to_confd(cfg, tmp_path, available_plugins=set())
    assert accounted(mapped, unmapped) == set(CONFIG_SCHEMA)
    assert unmapped == []
    config = confd_config(tmp_path, files)
    s = config.server
    assert s.hostname == "host.test" and s.data_dir == "/var/lib/chasquid"
    assert s.local_domains == ["localhost"] and s.max_message_size == 50 * 1024 * 1024
    assert (s.suffix_separators, s.drop_characters) == ("+", ".")
    assert s.max_queue_items == 200 and s.give_up_after == 20 * 3600
    assert {n: (v.kind, v.addresses, v.proxy_protocol) for n, v in s.listeners.items()} == {
        "smtp": ("smtp", [":25"], False), "submission": ("submission", [":587"], False),
        "submissions": ("submissions", [":465"], False)}
    p = {name: t.values for name, t in config.plugins.items()}
    assert p["delivery_mda"] == {"enabled": True, "command": "maildrop",
                                 "args": ["-f", "%from%", "-d", "%to_user%"], "timeout": 30.0}
    assert p["delivery_maildir"] == {"enabled": False}
    assert p["maillog"] == {"enabled": True, "syslog": True}
    assert p["metrics"] == {"enabled": False}
    for name in ("auth", "localusers", "relay", "loopdetect", "spf", "aliases", "hooks",
                 "delivery_smtp", "domaininfo", "dsn"):
        assert p[name]["enabled"] is True, name
    assert "dovecot_auth" not in p and "ratelimit" not in p  # not installed (given set())


def test_non_default_values(tmp_path):
    root = tmp_path / "c"
    text = chasquid_conf(root, {"smtp": 2525, "submission": 2587, "submissions": 2465,
                                "monitoring": 1099}, dovecot=True, haproxy=True)
    cfg = parse_config(text)
    assert cfg.explicit == frozenset(CONFIG_SCHEMA)
    files, mapped, unmapped = to_confd(cfg, root, available_plugins={"dovecot_auth"})
    assert accounted(mapped, unmapped) == set(CONFIG_SCHEMA)
    server = tomllib.loads(files["00-server.toml"])["server"]
    assert server["hostname"] == HOSTNAME and server["data_dir"] == "data"
    assert server["max_message_size"] == 10 * 1024 * 1024
    assert (server["suffix_separators"], server["drop_characters"]) == ("-+", "._")
    assert server["max_queue_items"] == 50 and server["give_up_after"] == 48 * 3600
    lst = server["listeners"]
    assert lst["smtp"] == {"kind": "smtp", "addresses": ["127.0.0.1:2525", "127.0.0.2:2525"],
                           "proxy_protocol": True}
    assert lst["submission"]["proxy_protocol"] is True
    assert "proxy_protocol" not in lst["submissions"]
    assert [n for n, _ in unmapped] == ["haproxy_incoming"]
    mda = tomllib.loads(files["40-delivery-local.toml"])["plugins"]
    assert mda["delivery_mda"]["command"] == f"{root}/mda"
    assert mda["delivery_mda"]["args"] == ["%to_user%", "%to_domain%", "%from%"]
    assert tomllib.loads(files["60-metrics.toml"])["plugins"]["metrics"] == {
        "enabled": True, "address": "127.0.0.1:1099"}
    assert tomllib.loads(files["61-maillog.toml"])["plugins"]["maillog"]["path"] == str(
        root.resolve() / "log" / "mail.log")
    assert tomllib.loads(files["70-dovecot-auth.toml"])["plugins"]["dovecot_auth"] == {
        "enabled": True, "userdb_path": f"{root}/dovecot/auth-userdb",
        "client_path": f"{root}/dovecot/auth-client"}
    # without the dovecot_auth plugin the three fields are reported, and no table is written
    files, mapped, unmapped = to_confd(cfg, root, available_plugins=set())
    assert "70-dovecot-auth.toml" not in files
    assert {n for n, _ in unmapped} == {"haproxy_incoming", "dovecot_auth",
                                        "dovecot_userdb_path", "dovecot_client_path"}


@pytest.mark.parametrize(("conf", "field", "why"), [
    ('mail_log_path: "<stderr>"', "mail_log_path", "file or to syslog"),
    ('give_up_send_after: "-1h"', "give_up_send_after", "not a positive duration"),
    ('smtp_address: "1.2.3.4"', "smtp_address", "not host:port"),
    ('smtp_address: ":nosuchservice"', "smtp_address", "unknown port"),
    ('smtp_address: "::1:25"', "smtp_address", "needs brackets"),
    ('monitoring_address: "nowhere"', "monitoring_address", "not host:port"),
    ('mail_delivery_agent_args: "%user%"', "mail_delivery_agent_args", "%user%"),
])
def test_what_cannot_be_mapped_is_said_and_still_loads(tmp_path, conf, field, why):
    cfg = parse_config(conf, system_hostname="h.test")
    files, mapped, unmapped = to_confd(cfg, tmp_path, available_plugins=set())
    reasons = " | ".join(w for n, w in unmapped if n == field)
    assert why in reasons, unmapped
    assert accounted(mapped, unmapped) == set(CONFIG_SCHEMA)
    config = confd_config(tmp_path, files)  # still a valid configuration
    if field == "smtp_address":
        assert "smtp" not in config.server.listeners  # no usable address: no listener
    if field == "mail_delivery_agent_args":  # fail closed: local mail waits in the queue
        assert config.plugins["delivery_mda"].values["enabled"] is False
        assert config.plugins["delivery_maildir"].values["enabled"] is False


def test_service_names_and_systemd_mix(tmp_path):
    cfg = parse_config('smtp_address: "systemd" smtp_address: "127.0.0.1:smtp" '
                       'submission_address: "[::1]:587"', system_hostname="h.test")
    files, mapped, unmapped = to_confd(cfg, tmp_path, available_plugins=set())
    lst = tomllib.loads(files["00-server.toml"])["server"]["listeners"]
    assert lst["smtp"]["addresses"] == [":25", "127.0.0.1:25"]
    assert lst["submission"]["addresses"] == ["[::1]:587"]
    assert unmapped == []


def test_paths_become_absolute_when_written_elsewhere(tmp_path):
    cfg = parse_config('data_dir: "var" mail_log_path: "/var/log/mail.log"',
                       system_hostname="h.test")
    src = tmp_path / "etc"
    files, _, _ = to_confd(cfg, src, target_dir=tmp_path / "elsewhere",
                           available_plugins=set())
    server = tomllib.loads(files["00-server.toml"])["server"]
    assert server["data_dir"] == str(src.resolve() / "var")
    assert server["certs_dir"] == str(src.resolve() / "certs")
    assert tomllib.loads(files["32-hooks.toml"])["plugins"]["hooks"]["program"] == str(
        src.resolve() / "hooks" / "post-data")
    assert tomllib.loads(files["61-maillog.toml"])["plugins"]["maillog"]["path"] == \
        "/var/log/mail.log"


def test_unchanged_chasquid_directory_for_the_loader(tmp_path):
    from tampu.chasquid import confd_for_chasquid_dir

    assert confd_for_chasquid_dir(tmp_path) is None  # no chasquid.conf
    (tmp_path / "chasquid.conf").write_text('hostname: "x.test"\n')
    files = confd_for_chasquid_dir(tmp_path)
    assert files is not None
    assert tomllib.loads(files["00-server.toml"])["server"]["hostname"] == "x.test"
    (tmp_path / "conf.d").mkdir()
    assert confd_for_chasquid_dir(tmp_path) is None  # a conf.d wins


def test_default_config_dataclass_matches_schema():
    assert {f for f in ChasquidConfig.__dataclass_fields__ if f != "explicit"} == set(
        CONFIG_SCHEMA)


def test_minimal_directory_imports_in_place(tmp_path, capsys):
    root = tmp_path / "c"
    root.mkdir()
    (root / "chasquid.conf").write_text('data_dir: "data"\nsmtp_address: "127.0.0.1:0"\n')
    certs = root / "certs" / "x.test"  # chasquid needs a certificate too
    certs.mkdir(parents=True)
    cert = default_ca().issue_cert("x.test")
    cert.private_key_pem.write_to_path(str(certs / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(certs / "fullchain.pem"))
    assert import_chasquid.main(["chasquid", str(root)]) == 0
    out = capsys.readouterr().out
    assert "domaininfo: nothing to convert" in out and "is valid" in out
    names = sorted(p.name for p in (root / "conf.d").iterdir())
    assert names[0] == "00-server.toml" and "40-delivery-local.toml" in names
    for path in (root / "conf.d").iterdir():  # readable by the user tampu runs as
        assert stat.S_IMODE(path.stat().st_mode) & 0o004, path


def test_an_unchanged_chasquid_directory_is_served_as_it_is(tmp_path):
    """No import at all: ``tampu serve --config-dir`` on chasquid's own directory."""
    root = tmp_path / "chasquid"
    ports = make_chasquid_dir(root, haproxy=True)
    check = run_tampu("check", "--config-dir", str(root))
    assert check.returncode == 0, check.stdout + check.stderr
    assert not (root / "conf.d").exists()  # nothing was written
    with serving(root, ports["submissions"]) as (proc, log):
        assert submission_login(root, ports["submission"], f"jose@{DOMAIN}",
                                JOSE_PASSWORD) == 235
        with RawClient(ports["smtp"]) as c:
            c.send_raw(f"PROXY TCP4 192.0.2.7 127.0.0.1 40000 {ports['smtp']}\r\n".encode())
            assert c.reply()[0] == 220
            assert c.cmd("EHLO sender.example.org")[0] == 250
            assert c.cmd("MAIL FROM:<someone@example.org>")[0] == 250
            assert c.cmd(f"RCPT TO:<pepe@{DOMAIN}>")[0] == 250  # chasquid's aliases file
            assert c.cmd("DATA")[0] == 354
            c.send_raw(b"Subject: unchanged\r\n\r\nhola\r\n.\r\n")
            assert c.reply()[0] == 250
        assert "unchanged" in wait_for(root / "delivered" / f"jose@{DOMAIN}")
        assert proc.poll() is None, log.read_text()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "chasquid.conf").write_text("hostname: \n")
    done = run_tampu("check", "--config-dir", str(broken))
    assert done.returncode == 2 and "chasquid.conf" in done.stderr
