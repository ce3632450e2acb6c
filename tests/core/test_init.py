"""``tampu init``: a production configuration that validates, and serves once pointed at
loopback ports (the real ones, 25/587/465 on all addresses, are checked in the settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tampu.config import load_config
from tampu.testing import default_ca
from tampu.users import UserRecord, hash_password, write_users_file


def tampu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tampu.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_init_writes_a_valid_production_configuration(tmp_path):
    cdir = tmp_path / "etc-tampu"
    done = tampu("init", str(cdir), "--domain", "Example.COM")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "certs/README.txt" in done.stdout
    config = load_config(cdir)
    server = config.server
    assert server.hostname == "mail.example.com"
    assert server.data_dir == "/var/lib/tampu" and server.local_domains == ["example.com"]
    assert not server.self_signed_cert
    ports = {name: lst.endpoints() for name, lst in server.listeners.items()}
    assert ports == {"smtp": [("", 25)], "submission": [("", 587)],
                     "submissions": [("", 465)]}  # every address
    enabled = {name for name, table in config.plugins.items() if table.enabled}
    assert {"auth", "localusers", "relay", "metrics", "maillog", "ratelimit"} <= enabled
    assert (cdir / "certs" / "mail.example.com").is_dir()
    readme = (cdir / "certs" / "README.txt").read_text()
    assert "/etc/letsencrypt/live/mail.example.com/fullchain.pem" in readme
    assert "tampu reload" in readme
    assert "docs/operations.md" in (cdir / "conf.d" / "00-server.toml").read_text()
    check = tampu("check", "--config-dir", str(cdir))
    # the certificate is not there yet: check says so, naming the listener and the folder
    assert check.returncode == 2 and "listener submissions" in check.stderr
    assert "certs" in check.stderr
    cert = default_ca().issue_cert("mail.example.com")
    cert.private_key_pem.write_to_path(str(cdir / "certs" / "mail.example.com" / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(
        str(cdir / "certs" / "mail.example.com" / "fullchain.pem"))
    toml = cdir / "conf.d" / "00-server.toml"
    toml.write_text(toml.read_text().replace('"/var/lib/tampu"', f'"{tmp_path / "data"}"'))
    check = tampu("check", "--config-dir", str(cdir))
    assert check.returncode == 0, check.stderr


def test_init_refuses_to_overwrite_and_bad_domains(tmp_path):
    cdir = tmp_path / "c"
    assert tampu("init", str(cdir), "--domain", "example.com").returncode == 0
    again = tampu("init", str(cdir), "--domain", "example.com")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert tampu("init", str(cdir), "--domain", "example.com", "--force").returncode == 0
    bad = tampu("init", str(tmp_path / "d"), "--domain", "not a domain")
    assert bad.returncode == 2 and ("is not a domain name" in bad.stderr
                                   or "invalid domain" in bad.stderr)


def test_initialised_configuration_serves(tmp_path, tampu_server, tampu_ca, make_dns):
    cdir = tmp_path / "c"
    assert tampu("init", str(cdir), "--domain", "example.com", "--data-dir",
                 str(tmp_path / "data")).returncode == 0
    cert = tampu_ca.issue_cert("mail.example.com")
    cert.private_key_pem.write_to_path(str(cdir / "certs" / "mail.example.com" / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(cdir / "certs" / "mail.example.com" /
                                              "fullchain.pem"))
    write_users_file(cdir / "domains" / "example.com" / "users",
                     {"ana": UserRecord("ana", hash_password("pw", log_n=10))}, "tampu")
    dns = make_dns({})
    loopback = "".join(f'[server.listeners.{k}]\naddresses = ["127.0.0.1:0"]\n'
                       for k in ("smtp", "submission", "submissions"))
    (cdir / "conf.d" / "99-test.toml").write_text(
        f'[server]\ndns_servers = ["127.0.0.1:{dns.port}"]\ndns_timeout = 1\n{loopback}'
        '[plugins.metrics]\naddress = "127.0.0.1:0"\n')
    srv = tampu_server(config_dir=cdir)
    with srv.smtp() as c:
        c.ehlo("client.test")
        assert c.has_extn("starttls")
        assert c.sendmail("x@example.org", ["ana@example.com"], b"Subject: hi\r\n\r\nx\r\n") \
            == {}
    assert len(srv.queue_items()) == 1
    assert (tmp_path / "data" / "queue").is_dir()


def test_init_writes_every_plugin_table_of_the_default_configuration(tmp_path):
    cdir = tmp_path / "etc"
    assert tampu("init", str(cdir), "--domain", "Bücher.Example").returncode == 0
    repo_confd = Path(__file__).resolve().parents[2] / "conf.d"
    for default in repo_confd.glob("[1-9]*.toml"):  # the repository's defaults, one owner
        written = cdir / "conf.d" / default.name
        assert written.read_text() == default.read_text(), default.name
    config = load_config(cdir)
    assert config.server.local_domains == ["bücher.example"]  # IDN: the canonical form
    assert config.server.hostname == "mail.xn--bcher-kva.example"  # a host name: A-labels
    assert (cdir / "domains" / "bücher.example").is_dir()
    for plugin in ("hooks", "delivery_mda", "domaininfo", "dkim", "aliases", "delivery_smtp"):
        assert config.plugins[plugin].enabled, plugin
