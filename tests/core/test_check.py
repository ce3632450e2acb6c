"""One configuration check: what ``tampu check`` calls valid, ``serve`` starts with, and what
it refuses, ``serve`` refuses the same way, without a traceback."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tampu.testing import make_config_dir, server_toml
from tests.helpers import run_tampu


def check(tmp_path, conf: dict[str, str] | None = None, base: str | None = None):
    root = make_config_dir(tmp_path / "conf", conf=conf, base=base)
    return root, run_tampu("check", "--config-dir", str(root))


@pytest.mark.parametrize(("text", "words"), [
    ('[server.listeners.other]\nkind = "smtp"\naddresses = ["127.0.0.1:2599"]\n'
     '[server.listeners.again]\nkind = "submission"\naddresses = ["127.0.0.1:2599"]\n',
     "listeners other and again both listen on 127.0.0.1:2599"),
    ('[server.listeners.other]\nkind = "smtp"\naddresses = ["*:2599"]\n',
     "server.listeners.other.addresses"),
    ('[server.listeners.other]\nkind = "smtp"\naddresses = ["::1:25"]\n',
     "write IPv6 addresses as [::1]:25"),
    ('[server]\ndns_servers = ["127.0.0.1:x"]\n', "server.dns_servers"),
    ('[server]\ndns_servers = ["dns.example"]\n', "must be an IP address"),
    ('[server]\nlocal_domains = ["bad_domain.test"]\n', "server.local_domains"),
    ('[server.listeners.submissions]\nproxy_protocol = true\n',
     "proxy_protocol is not supported on kind submissions"),
])
def test_static_rules_are_in_the_models(tmp_path, text, words):
    _, done = check(tmp_path, {"50-x.toml": text})
    assert done.returncode == 2
    assert words in done.stderr and "50-x.toml" in done.stderr, done.stderr


def test_data_dir_that_is_a_file(tmp_path):
    root, _ = check(tmp_path)
    (root / "data").rmdir() if (root / "data").is_dir() else None
    (root / "data").write_text("not a directory")
    done = run_tampu("check", "--config-dir", str(root))
    assert done.returncode == 2 and "is not a directory" in done.stderr
    assert "server.data_dir" in done.stderr


def test_malformed_aliases_file_is_reported_with_file_and_line(tmp_path):
    root = make_config_dir(tmp_path / "conf", conf={
        "31-aliases.toml": "[plugins.aliases]\nenabled = true\n"})
    aliases = root / "domains" / "example.test" / "aliases"
    aliases.write_text("pepe: jose   # a comment is fine\nbroken line\n")
    done = run_tampu("check", "--config-dir", str(root))
    assert done.returncode == 2
    assert f"{aliases}: line 2: missing ':'" in done.stderr
    resolved = run_tampu("aliases", "resolve", "--config-dir", str(root), "pepe@example.test")
    assert resolved.returncode == 2 and "line 2" in resolved.stderr


def test_serve_refuses_what_check_refuses_without_a_traceback(tmp_path):
    root = make_config_dir(tmp_path / "conf", conf={
        "31-aliases.toml": "[plugins.aliases]\nenabled = true\n"})
    (root / "domains" / "example.test" / "aliases").write_text("broken line\n")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tampu.cli", "serve", "--config-dir",
                           str(root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and time.monotonic() - start < 30
    assert "line 1: missing ':'" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_valid_configuration_is_valid_for_serve_too(tmp_path):
    root, done = check(tmp_path, base=server_toml())
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stdout
