"""conf.d loading (core/config.py) and plugin validation (core/registry.py): merging, order,
and errors that name the file, the key and the problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tampu.config import load_config
from tampu.errors import ConfigError
from tampu.registry import available_entry_points
from tampu.testing import make_config_dir, runtime_for, server_toml

BUILTINS = ("auth", "localusers", "relay", "loopdetect")


def confdir(tmp_path: Path, files: dict[str, str], base: str | None = None) -> Path:
    return make_config_dir(tmp_path / "conf", conf=files, base=base)


def problems_of(root: Path, *, registry: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config = load_config(root)
        if registry:
            runtime_for(config).registry
    assert info.value.problems
    return info.value.problems


def test_files_merge_in_lexical_order(tmp_path):
    root = confdir(tmp_path, {
        "10-a.toml": "[server]\nmax_recipients = 7\nlocal_domains = ['a.test']\n"
                     "[plugins.loopdetect]\nmax_received = 9\n",
        "20-b.toml": "[server]\nmax_recipients = 8\n[plugins.loopdetect]\npriority = 3\n",
        ".hidden.toml": "this is not toml",
        "notes.txt": "ignored",
    })
    config = load_config(root)
    assert config.server.max_recipients == 8  # the later file wins
    assert config.server.local_domains == ["a.test"]  # other keys stay
    assert config.server.command_timeout == 30  # from 00-test.toml
    table = config.plugins["loopdetect"]
    assert table.values == {"enabled": True, "max_received": 9, "priority": 3}
    assert [p.name for p in table.files] == ["00-test.toml", "10-a.toml", "20-b.toml"]
    assert [p.name for p in config.files] == ["00-test.toml", "10-a.toml", "20-b.toml"]
    assert config.origin_of(("server", "max_recipients")).name == "20-b.toml"
    assert config.origin_of(("server", "local_domains")).name == "10-a.toml"
    # plugin order: first appearance in conf.d
    assert list(config.plugins) == list(BUILTINS)
    assert [config.plugins[n].order for n in BUILTINS] == [0, 1, 2, 3]
    assert config.data_dir == (root / "data").resolve()


def test_a_plugin_table_in_a_later_file_keeps_its_first_place(tmp_path):
    root = confdir(tmp_path, {"50-x.toml": "[plugins.relay]\npriority = 5\n"},
                   base=server_toml(plugins=("relay", "localusers")))
    config = load_config(root)
    assert [(n, t.order) for n, t in config.plugins.items()] == [("relay", 0),
                                                                 ("localusers", 1)]


def test_invalid_toml_names_the_file_and_line(tmp_path):
    root = confdir(tmp_path, {"30-bad.toml": "[server]\nmax_recipients = = 3\n"})
    (problem,) = problems_of(root)
    assert str(root / "conf.d" / "30-bad.toml") in problem
    assert "not valid TOML" in problem and "line 2" in problem


def test_unreadable_files(tmp_path):
    root = confdir(tmp_path, {})
    (root / "conf.d" / "40-dir.toml").mkdir()
    os.symlink(tmp_path / "nowhere.toml", root / "conf.d" / "41-dangling.toml")
    problems = problems_of(root)
    assert len(problems) == 2
    assert problems[0].startswith(f"{root / 'conf.d' / '40-dir.toml'}: cannot read: ")
    assert problems[1] == (f"{root / 'conf.d' / '41-dangling.toml'}: cannot read: "
                           "No such file or directory")


def test_missing_confd(tmp_path):
    (problem,) = problems_of(tmp_path)
    assert str(tmp_path / "conf.d") in problem and "no such directory" in problem


def test_unknown_server_key_and_section(tmp_path):
    root = confdir(tmp_path, {"30-x.toml": "[server]\nmax_recipents = 3\n[srever]\nx = 1\n"})
    problems = problems_of(root)
    assert any(p == f"{root / 'conf.d' / '30-x.toml'}: key srever: unknown section (expected "
               "[server] or [plugins.NAME])" for p in problems), problems
    root2 = confdir(tmp_path / "2", {"30-x.toml": "[server]\nmax_recipents = 3\n"})
    assert problems_of(root2) == [
        f"{root2 / 'conf.d' / '30-x.toml'}: key server.max_recipents: unknown key"]


@pytest.mark.parametrize(("setting", "words"), [
    ('max_recipients = "many"', "valid integer"),
    ("hostname = 12", "valid string"),
    ('log_level = "loud"', "'debug', 'info', 'warning' or 'error'"),
    ("local_domains = 'a.test'", "valid list"),
    ("command_timeout = [1]", "valid number"),
])
def test_wrong_type_in_server(tmp_path, setting, words):
    root = confdir(tmp_path, {"30-x.toml": f"[server]\n{setting}\n"})
    (problem,) = problems_of(root)
    key = setting.split()[0]
    assert problem.startswith(f"{root / 'conf.d' / '30-x.toml'}: key server.{key}: "), problem
    assert words in problem


def test_bad_listener_address_names_the_listener(tmp_path):
    root = confdir(tmp_path, {"30-x.toml": '[server.listeners.mx]\nkind = "smtp"\n'
                                           'addresses = ["localhost"]\n'})
    (problem,) = problems_of(root)
    assert "30-x.toml: key server.listeners.mx.addresses" in problem
    assert "'localhost' is not host:port" in problem


def test_every_problem_is_reported_at_once(tmp_path):
    root = confdir(tmp_path, {
        "30-a.toml": "[server\n",
        "31-b.toml": "[plugins]\nauth = 3\n",
    })
    problems = problems_of(root)
    assert len(problems) == 2
    assert "30-a.toml: not valid TOML" in problems[0]
    assert "31-b.toml: key plugins.auth: must be a table" in problems[1]


# ------------------------------------------------------------------------------ plugins


def test_unknown_plugin_lists_the_available_ones(tmp_path):
    root = confdir(tmp_path, {"30-p.toml": "[plugins.spamfilter]\nenabled = true\n"})
    (problem,) = problems_of(root, registry=True)
    assert problem.startswith(f"{root / 'conf.d' / '30-p.toml'}: key plugins.spamfilter: "
                              "unknown plugin 'spamfilter' (available: ")
    available = problem.rpartition("(available: ")[2].rstrip(")").split(", ")
    assert set(BUILTINS) <= set(available)
    assert available == sorted(available_entry_points())


def test_unknown_and_mistyped_plugin_keys(tmp_path):
    root = confdir(tmp_path, {"30-p.toml": "[plugins.loopdetect]\nmax_recieved = 3\n"
                                           "[plugins.auth]\nscrypt_log_n = 'fast'\n"
                                           "[plugins.relay]\nenabled = 'maybe'\n"})
    problems = problems_of(root, registry=True)
    f = root / "conf.d" / "30-p.toml"
    assert f"{f}: key plugins.loopdetect.max_recieved: unknown key" in problems
    assert any(p.startswith(f"{f}: key plugins.auth.scrypt_log_n: ") and "integer" in p
               for p in problems), problems
    assert any(p.startswith(f"{f}: key plugins.relay.enabled: ") and "boolean" in p
               for p in problems), problems
    assert len(problems) == 3


def test_secrets_from_env_and_file(tmp_path, monkeypatch):
    root = confdir(tmp_path, {"30-p.toml": '[plugins.loopdetect]\nmax_received = '
                                           '{"$env" = "TAMPU_TEST_MAXRCV"}\n'
                                           '[plugins.auth]\nscrypt_log_n = '
                                           '{"$file" = "secret.txt"}\n'})
    (root / "secret.txt").write_text("11\n")
    monkeypatch.setenv("TAMPU_TEST_MAXRCV", "12")
    config = load_config(root)
    registry = runtime_for(config).registry
    assert registry.plugins["loopdetect"].settings.max_received == 12
    assert registry.plugins["auth"].settings.scrypt_log_n == 11
    monkeypatch.delenv("TAMPU_TEST_MAXRCV")
    (root / "secret.txt").unlink()
    problems = problems_of(root, registry=True)
    assert any("plugins.loopdetect" in p and "TAMPU_TEST_MAXRCV is not set" in p
               for p in problems), problems
    assert any("plugins.auth" in p and "cannot read" in p and "secret.txt" in p
               for p in problems), problems


def test_disabled_plugins_are_not_loaded(tmp_path):
    root = confdir(tmp_path, {"30-p.toml": "[plugins.relay]\nenabled = false\n"
                                           "[plugins.auth]\npriority = 7\n"})
    config = load_config(root)
    runtime = runtime_for(config)
    registry = runtime.registry
    assert registry.pm.is_blocked("relay") and registry.plugins["relay"].obj is None
    assert not registry.plugins["relay"].enabled
    assert runtime.hook_order()["smtp_rcpt_to"] == ["localusers"]
    auth = registry.plugins["auth"]
    assert auth.enabled and auth.priority == 7 and auth.hooks == ["smtp_auth"]
    assert auth.distribution == "tampu" and auth.builtin
