"""auth: users of ``domains/<domain>/users`` managed by ``tampu user``, checked at AUTH."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from tampu.testing import make_config_dir
from tampu.users import UsersFileError, hash_password, read_users_file, verify_password
from tests.helpers import RawClient, add_user, run_tampu

USER = "alice@example.test"


def auth_plain(srv, login: str, password: str) -> int:
    with RawClient(srv.port("submissions"), tls=srv.client_tls()) as c:
        c.reply()
        c.cmd("EHLO client.test")
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return c.cmd(f"AUTH PLAIN {blob}")[0]


@pytest.fixture
def root(tmp_path, tampu_ca):
    return make_config_dir(tmp_path / "conf", ca=tampu_ca, conf={
        "50-auth.toml": "[plugins.auth]\nscrypt_log_n = 10\n"})


def test_cli_add_list_remove(root):
    add_user(root, USER, "first password")
    add_user(root, "Bob@Example.TEST", "bob password")
    users_file = root / "domains" / "example.test" / "users"
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    text = users_file.read_text()
    assert "first password" not in text and "bob password" not in text
    assert "$scrypt$ln=10,r=8,p=1$" in text  # [plugins.auth] scrypt_log_n is used
    listed = run_tampu("user", "list", "--config-dir", str(root))
    assert listed.returncode == 0
    assert listed.stdout.split() == ["alice@example.test", "bob@example.test"]
    # the form with --config-dir before the subcommand works too
    removed = run_tampu("user", "--config-dir", str(root), "remove", "bob@example.test")
    assert removed.returncode == 0, removed.stderr
    assert "bob" not in users_file.read_text()
    missing = run_tampu("user", "remove", "--config-dir", str(root), "bob@example.test")
    assert missing.returncode == 1 and "no user bob@example.test" in missing.stderr


def test_cli_refuses_bad_input(root):
    bad = run_tampu("user", "add", "--config-dir", str(root), "no-domain", "--password-stdin",
                    stdin="pw\n")
    assert bad.returncode == 2 and "not user@domain" in bad.stderr
    empty = run_tampu("user", "add", "--config-dir", str(root), USER, "--password-stdin",
                      stdin="\n")
    assert empty.returncode != 0 and "empty password" in empty.stderr
    assert not (root / "domains" / "example.test" / "users").exists()


def test_running_server_sees_cli_changes(tampu_server, root):
    add_user(root, USER, "first password")
    srv = tampu_server(config_dir=root)
    assert auth_plain(srv, USER, "first password") == 235
    add_user(root, USER, "second password")  # change the password while it runs
    assert auth_plain(srv, USER, "first password") == 535
    assert auth_plain(srv, USER, "second password") == 235
    assert run_tampu("user", "remove", "--config-dir", str(root), USER).returncode == 0
    assert auth_plain(srv, USER, "second password") == 535


def test_unknown_domain_and_malformed_login(tampu_server, root):
    add_user(root, USER, "pw one")
    srv = tampu_server(config_dir=root)
    assert auth_plain(srv, "alice@other.test", "pw one") == 535
    assert auth_plain(srv, "alice", "pw one") == 535
    assert auth_plain(srv, "@example.test", "pw one") == 535
    assert auth_plain(srv, "Alice@EXAMPLE.test", "pw one") == 235


def test_userdb_hash_and_comments(tmp_path):
    encoded = hash_password("s3cret", log_n=10)
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert not verify_password("s3cret", "$bcrypt$whatever")
    assert not verify_password("s3cret", "garbage")
    path = tmp_path / "users"
    path.write_text(f"# comment\n\nAlice:{encoded}\n")
    fmt, records = read_users_file(path)
    assert fmt == "tampu" and list(records) == ["alice"] and records["alice"].secret == encoded
    path.write_text(f"# comment\n\nAlice:{encoded}\nbroken line\n")
    with pytest.raises(UsersFileError, match=r"users: line 4: expected user:\$scrypt"):
        read_users_file(path)


def test_malformed_users_file_is_a_configuration_error(root):
    users = root / "domains" / "example.test" / "users"
    users.write_text("alice:not-a-hash\n")
    check = run_tampu("check", "--config-dir", str(root))
    assert check.returncode == 2
    assert f"{users}: line 1" in check.stderr
    assert run_tampu("users", "check", "--config-dir", str(root)).returncode == 1


def test_user_add_keeps_the_files_mode_and_group(root):
    add_user(root, USER, "first password")
    users = root / "domains" / "example.test" / "users"
    os.chown(users, 0, 12345)  # root:a group that the server runs as
    os.chmod(users, 0o640)
    add_user(root, "bob@example.test", "bob password")
    st = users.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, 12345)
    assert "bob:" in users.read_text()


def test_user_check_tests_a_password(root):
    add_user(root, USER, "right one")
    ok = run_tampu("user", "check", "--config-dir", str(root), USER, "--password-stdin",
                   stdin="right one\n")
    assert ok.returncode == 0 and "password correct" in ok.stdout
    bad = run_tampu("user", "check", "--config-dir", str(root), USER, "--password-stdin",
                    stdin="wrong\n")
    assert bad.returncode == 1 and "wrong password" in bad.stdout
