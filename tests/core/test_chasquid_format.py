"""tampu.chasquid: the protobuf text format, chasquid's users / config / domaininfo files.

Real files come from the installed chasquid (Debian's chasquid-util), so these tests check
the format against chasquid itself, not against our reading of it.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tampu.chasquid import (
    CONFIG_SCHEMA,
    DOMAININFO_SCHEMA,
    USERDB_SCHEMA,
    ChasquidConfig,
    ChasquidError,
    DomainInfo,
    TextFormatError,
    UserEntry,
    format_text,
    format_users,
    from_tampu_hash,
    looks_like_users_file,
    parse_config,
    parse_duration,
    parse_message,
    parse_text,
    parse_users,
    read_config,
    read_domaininfo,
    read_users,
    tampu_domaininfo,
    write_tampu_domaininfo,
    write_users,
)
from tampu.chasquid.confd import toml_string
from tampu.chasquid.prototext import MAX_DEPTH
from tampu.chasquid.prototext_format import quote_bytes
from tampu.users import (
    UserRecord,
    hash_password,
    read_users_file,
    verify_password,
    write_users_file,
)
from tests.conftest import require_tool

# ------------------------------------------------------------------------------ parser


def test_scalars_strings_and_structure():
    tree = parse_text(b"""
        # a comment
        i: 42 h: 0x1F o: 017 n: -7 z: 0   # trailing comment
        f: 1.5 g: 1e3 k: .25 m: 5f ninf: -inf
        s: "a\\101\\x42\\n\\t\\"'" 'q"\\'' "con" 'cat'
        u: "\\u00e9\\U0001F600\\ud83d\\ude00"
        id: SOME_ENUM
        msg { a: 1; b: 2, }
        angle: < c: "x" >
        colon_msg: { }
        list: [1, 2, 3]
        msgs: [{a: 1}, <a: 2>]
        empty_list: []
    """)
    assert tree["i"] == [42] and tree["h"] == [31] and tree["o"] == [15]
    assert tree["n"] == [-7] and tree["z"] == [0]
    assert tree["f"] == [1.5] and tree["g"] == [1000.0] and tree["k"] == [0.25]
    assert tree["m"] == [5.0] and tree["ninf"] == [-math.inf]
    assert tree["s"] == [b"aAB\n\t\"'q\"'concat"]  # adjacent literals are one string
    assert tree["u"] == ["é😀😀".encode()]
    assert tree["id"] == ["SOME_ENUM"]
    assert tree["msg"] == [{"a": [1], "b": [2]}]
    assert tree["angle"] == [{"c": [b"x"]}]
    assert tree["colon_msg"] == [{}]
    assert tree["list"] == [1, 2, 3]
    assert tree["msgs"] == [{"a": [1]}, {"a": [2]}]
    assert "empty_list" not in tree


@pytest.mark.parametrize(("text", "line", "message"), [
    ("a: 1\nb 2\n", 2, "missing ':'"),
    ("a: 1\n\nb: \"open\n", 3, "invalid character"),
    ("a: \"never closed", 1, "unterminated string"),
    ("x {\n y: 1\n", 3, "missing '}'"),
    ("x { y: 1 >", 1, "expected a field name"),
    ("}", 1, "expected a field name"),
    ("a: 08", 1, "invalid number"),
    ("a: 12abc", 1, "invalid number"),
    ("a: \"\\400\"", 1, "octal"),
    ("a: \"\\x\"", 1, "hex escape"),
    ("a: \"\\u12\"", 1, "Unicode escape"),
    ("a: \"\\ud800\"", 1, "Unicode escape"),
    ("a: \"\\q\"", 1, "invalid escape"),
    ("[ext.field]: 1", 1, "not supported"),
    ("a: -", 1, "number"),
    ("a: [1 2]", 1, "expected ','"),
    ("a: :", 1, "expected a value"),
    ("\n\n  @", 3, "unexpected character"),
    ("a: " + "9" * 5000, 1, "number too long"),
])
def test_errors_carry_the_line(text, line, message):
    with pytest.raises(TextFormatError) as exc:
        parse_text(text)
    assert exc.value.line == line, exc.value
    assert message in exc.value.message
    assert str(exc.value).startswith(f"line {line}: ")


def test_invalid_utf8_and_nesting_limit():
    with pytest.raises(TextFormatError) as exc:
        parse_text(b"a: 1\nb: \"\xff\"\n")
    assert exc.value.line == 2 and "UTF-8" in exc.value.message
    deep = "a {" * (MAX_DEPTH + 5) + "}" * (MAX_DEPTH + 5)
    with pytest.raises(TextFormatError, match="nested deeper"):
        parse_text(deep)
    ok = "a {" * MAX_DEPTH + "}" * MAX_DEPTH
    assert parse_text(ok)["a"]


def test_schema_checks_like_go_prototext():
    schema = DOMAININFO_SCHEMA
    assert parse_message('name: "x" incoming_sec_level: TLS_CLIENT outgoing_sec_level: 3',
                         schema) == {"name": "x", "incoming_sec_level": "TLS_CLIENT",
                                     "outgoing_sec_level": "TLS_SECURE"}
    cases = [
        ('name: "x"\nbogus: 1', 2, "unknown field 'bogus'"),
        ('name: "x"\nname: "y"', 2, "non-repeated field 'name' is repeated"),
        ("name: 5", 1, "expected a quoted string"),
        ('name: "\\xff"', 1, "not valid UTF-8"),
        ("incoming_sec_level: WHAT", 1, "is not one of"),
        ("name { }", 1, "expected a string value"),
    ]
    for text, line, message in cases:
        with pytest.raises(TextFormatError) as exc:
            parse_message(text, schema)
        assert (exc.value.line, message in exc.value.message) == (line, True), exc.value
    # ranges, bools, oneofs
    with pytest.raises(TextFormatError, match="out of range for int32"):
        parse_message("users { value { scrypt { r: 2147483648 } } }", USERDB_SCHEMA)
    with pytest.raises(TextFormatError, match="out of range for uint64"):
        parse_message("users { value { scrypt { logN: -1 } } }", USERDB_SCHEMA)
    with pytest.raises(TextFormatError, match="oneof 'scheme' is already set"):
        parse_message("users { value { denied {} plain {} } }", USERDB_SCHEMA)
    for word, value in (("true", True), ("t", True), ("False", False), ("0", False)):
        assert parse_message(f"dovecot_auth: {word}", CONFIG_SCHEMA) == {"dovecot_auth": value}
    with pytest.raises(TextFormatError, match="expected true or false"):
        parse_message("dovecot_auth: yes", CONFIG_SCHEMA)


def test_map_entries_last_key_wins_and_defaults():
    db = parse_message('users { key: "a" value { plain { password: "1" } } }\n'
                       'users: { key: "a" value: { plain: { password: "2" } } }\n'
                       "users: { value: { denied: {} } }\n"
                       'users: < key: "b" >', USERDB_SCHEMA)
    assert db["users"] == {"a": {"plain": {"password": b"2"}}, "": {"denied": {}}, "b": {}}


def test_quote_bytes_is_gos_escaping():
    assert quote_bytes(b'a"b\\c\n\r\t\x00\x7f\xfe') == '"a\\"b\\\\c\\n\\r\\t\\x00\\x7f\\xfe"'
    assert quote_bytes("é\u0085".encode()) == '"é\\u0085"'


# ------------------------------------------------------------------------------ properties

_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
_scalars = st.one_of(
    st.binary(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    _names,
)
_trees = st.recursive(
    st.dictionaries(_names, st.lists(_scalars, min_size=1, max_size=3), max_size=4),
    lambda inner: st.dictionaries(_names, st.lists(st.one_of(_scalars, inner), min_size=1,
                                                   max_size=3), max_size=4),
    max_leaves=20,
)


@given(_trees)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_with_the_writer(tree):
    assert parse_text(format_text(tree)) == tree


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_random_text_only_raises_the_parsers_error(text):
    try:
        parse_text(text)
        parse_message(text, USERDB_SCHEMA)
    except TextFormatError as exc:
        assert exc.line >= 1


_SOUP = st.lists(st.sampled_from(
    ["users", "key", "value", "scrypt", "denied", "plain", "logN", "salt", "password", ":",
     "{", "}", "<", ">", "[", "]", ",", ";", "#c\n", "\n", " ", '"a\\x41"', "'b'", "1", "-",
     "0x1f", "017", "1.5", "inf", "true", '"\\u00e9"', '"\\377"', '"\\', "_x9"]), max_size=60)


@given(_SOUP, st.binary(max_size=30))
@settings(max_examples=800)
def test_token_soup_only_raises_the_parsers_error(tokens, junk):
    text = "".join(tokens)
    for data in (text, text.encode() + junk):
        for schema in (None, USERDB_SCHEMA, CONFIG_SCHEMA):
            try:
                if schema is None:
                    parse_text(data)
                else:
                    parse_message(data, schema)
            except TextFormatError as exc:
                assert exc.line >= 1


_user_names = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
                      min_size=1, max_size=12)
_entries = st.one_of(
    st.builds(UserEntry, st.just("scrypt"), st.integers(1, 20), st.integers(1, 16),
              st.integers(1, 4), st.integers(16, 64), st.binary(max_size=16),
              st.binary(max_size=64)),
    st.builds(lambda pw: UserEntry("plain", password=pw), st.binary(max_size=20)),
    st.just(UserEntry("denied")),
)


@given(st.dictionaries(_user_names, _entries, max_size=5))
@settings(max_examples=200)
def test_users_round_trip(entries):
    text = format_users(entries)
    assert looks_like_users_file(text) or not entries
    assert parse_users(text) == entries
    for name, entry in entries.items():  # and through tampu's users-table encoding
        assert from_tampu_hash(entry.to_tampu_hash()) == entry, name


@given(st.text(max_size=40))
def test_toml_strings_round_trip(value):
    value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert tomllib.loads(f"k = {toml_string(value)}")["k"] == value


# ------------------------------------------------------------------------------ users


def chasquid_util(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("chasquid-util")
    return subprocess.run([tool, f"-C={config_dir}", *args], capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL, cwd=config_dir)


def receive_only_supported() -> bool:
    tool = require_tool("chasquid-util")
    done = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30,
                          check=False)
    return "receive_only" in done.stdout + done.stderr


@pytest.fixture
def chasquid_dir(tmp_path):
    root = tmp_path / "chasquid"
    (root / "domains" / "example.test").mkdir(parents=True)
    (root / "chasquid.conf").write_text('data_dir: "data"\n')
    return root


def test_reads_users_written_by_chasquid_util(chasquid_dir):
    for address, password in (("jose@example.test", "secreto"),
                              ("Ñandú@example.test", 'pä ss"\\x'),
                              ("rose@example.test", "flores")):
        done = chasquid_util(chasquid_dir, "user-add", address, f"--password={password}")
        assert done.returncode == 0, done.stderr
    path = chasquid_dir / "domains" / "example.test" / "users"
    users = read_users(path)
    assert set(users) == {"jose", "ñandú", "rose"}  # chasquid-util normalizes (PRECIS)
    jose = users["jose"]
    assert (jose.scheme, jose.log_n, jose.r, jose.p, jose.key_len) == ("scrypt", 14, 8, 1, 32)
    assert len(jose.salt) == 16 and len(jose.encrypted) == 32
    assert jose.verify("secreto") and not jose.verify("Secreto") and not jose.verify("")
    assert users["ñandú"].verify('pä ss"\\x')
    # the writer gives back chasquid-util's bytes exactly
    assert format_users(users).encode() == path.read_bytes()
    assert "secreto" not in repr(users)


def test_chasquid_reads_what_we_write(chasquid_dir):
    path = chasquid_dir / "domains" / "example.test" / "users"
    write_users(path, {"ana": UserEntry.new_scrypt("ana pw"),
                       "big": UserEntry.new_scrypt("big pw", log_n=10, key_len=64),
                       "plainy": UserEntry.new_plain('pl"ain\\'),
                       "ctl\x01": UserEntry.new_scrypt("x", log_n=10)})
    assert oct(path.stat().st_mode & 0o777) == "0o660"  # as chasquid-util writes it
    for user, password in (("ana", "ana pw"), ("big", "big pw"), ("plainy", 'pl"ain\\')):
        ok = chasquid_util(chasquid_dir, "authenticate", f"{user}@example.test",
                           f"--password={password}")
        assert ok.returncode == 0 and "succeeded" in ok.stdout, (user, ok.stdout, ok.stderr)
        bad = chasquid_util(chasquid_dir, "authenticate", f"{user}@example.test",
                            "--password=wrong")
        assert bad.returncode == 1
    assert chasquid_util(chasquid_dir, "check-userdb", "example.test").returncode == 0
    # chasquid-util loads our file, adds a user and writes it back: everything survives
    assert chasquid_util(chasquid_dir, "user-add", "new@example.test",
                         "--password=n").returncode == 0
    users = read_users(path)
    assert set(users) == {"ana", "big", "plainy", "ctl\x01", "new"}
    assert users["big"].key_len == 64 and users["big"].verify("big pw")
    assert users["plainy"].verify('pl"ain\\') and users["new"].verify("n")


def test_receive_only_users(chasquid_dir):
    path = chasquid_dir / "domains" / "example.test" / "users"
    assert chasquid_util(chasquid_dir, "user-add", "jose@example.test",
                         "--password=j").returncode == 0
    if receive_only_supported():  # chasquid >= 1.13
        assert chasquid_util(chasquid_dir, "user-add", "rose@example.test",
                             "--receive_only").returncode == 0
    else:  # Debian's 1.11 predates it: add the entry as chasquid 1.13+ writes it
        path.write_text(path.read_text() + 'users: {\n  key: "rose"\n  value: {\n'
                        "    denied: {}\n  }\n}\n")
    users = read_users(path)
    rose = users["rose"]
    assert rose.scheme == "denied" and rose.receive_only and not rose.verify("")
    assert not users["jose"].receive_only
    assert "denied: {}" in format_users(users)
    assert parse_users(format_users(users)) == users
    # an entry with no scheme at all exists too, and never authenticates (as in chasquid)
    none = parse_users('users { key: "x" value { } }')["x"]
    assert none.scheme == "none" and none.receive_only and not none.verify("")


def test_bad_scrypt_parameters_never_authenticate():
    for entry in (UserEntry("scrypt", 0, 8, 1, 32, b"s", b""),
                  UserEntry("scrypt", 14, 8, 1, 0, b"s", b""),   # Go: empty key == empty
                  UserEntry("scrypt", 40, 8, 1, 32, b"s", b"x" * 32),
                  UserEntry("scrypt", 14, 0, 1, 32, b"s", b"x" * 32),
                  UserEntry("scrypt", 20, 1 << 20, 1, 32, b"s", b"x" * 32)):  # 128 TiB
        assert not entry.verify(""), entry


def test_users_file_detection():
    assert looks_like_users_file('# c\n\n  users: {\n')
    assert looks_like_users_file("users {")
    assert looks_like_users_file("users<")
    assert looks_like_users_file("users")
    assert looks_like_users_file("users:\n{")
    assert looks_like_users_file("users: [{key: 'a'}]")
    assert not looks_like_users_file("# tampu users\nusers:$scrypt$ln=14,r=8,p=1$a$b\n")
    assert not looks_like_users_file("usersx: {")
    assert not looks_like_users_file("jose:$scrypt$ln=14,r=8,p=1$a$b\n")
    assert not looks_like_users_file("# only a comment\n")


def test_auth_userdb_reads_and_keeps_chasquid_format(chasquid_dir):
    assert chasquid_util(chasquid_dir, "user-add", "jose@example.test",
                         "--password=secreto").returncode == 0
    path = chasquid_dir / "domains" / "example.test" / "users"
    users = read_users(path)
    users["rose"] = UserEntry.new_denied()
    users["plainy"] = UserEntry.new_plain("pp")
    users["big"] = UserEntry.new_scrypt("bb", log_n=10, key_len=48)
    write_users(path, users)
    fmt, table = read_users_file(path)
    assert fmt == "chasquid"
    assert set(table) == {"jose", "rose", "plainy", "big"}
    assert table["jose"].secret.startswith("$scrypt$ln=14,r=8,p=1$")
    assert table["jose"].verify("secreto") and not table["jose"].verify("x")
    assert table["plainy"].verify("pp") and table["big"].verify("bb")
    assert table["rose"].receive_only and not table["rose"].verify("")
    # `tampu user add` on a chasquid file keeps chasquid's format, which chasquid still reads
    # (without the receive-only entry when chasquid-util is older than 1.13: it has no Denied)
    table = {k: v for k, v in table.items() if receive_only_supported() or k != "rose"}
    table["ana"] = UserRecord("ana", hash_password("ana pw", log_n=10))
    write_users_file(path, table, fmt)
    assert looks_like_users_file(path.read_text())
    for user, password in (("ana", "ana pw"), ("jose", "secreto"), ("big", "bb")):
        done = chasquid_util(chasquid_dir, "authenticate", f"{user}@example.test",
                             f"--password={password}")
        assert done.returncode == 0, (user, done.stdout)
    _, table = read_users_file(path)
    table["rose"] = UserRecord("rose", "", receive_only=True)
    write_users_file(path, table, "chasquid")
    assert read_users(path)["rose"].receive_only
    assert set(read_users_file(path)[1]) == {"jose", "rose", "plainy", "big", "ana"}
    assert verify_password("ana pw", read_users_file(path)[1]["ana"].secret)


# ------------------------------------------------------------------------------ config


def test_go_durations():
    assert parse_duration("20h") == 72000
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400
    assert parse_duration("360m") == 21600
    assert parse_duration("-5m") == -300
    assert parse_duration("0") == 0
    assert parse_duration("300ms") == pytest.approx(0.3)
    assert parse_duration("1h0.5s") == 3600.5
    for bad in ("", "5", "1d", "h", ".h", "1h 2m", "--1h", "1.2.3h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_debian_default_config_is_all_defaults():
    path = Path("/etc/chasquid/chasquid.conf")
    if not path.exists():
        pytest.skip("chasquid's package is not installed")
    cfg = read_config(path)
    assert cfg.explicit == frozenset()
    assert cfg == ChasquidConfig(hostname=cfg.hostname)
    assert cfg.hostname == os.uname().nodename


FULL_CONF = """\
# every field of config.proto, none at its default
hostname: "mx.chasquid.test"
max_data_size_mb: 10
smtp_address: "127.0.0.1:2525"
smtp_address: "[::1]:2525"
submission_address: ":2587"
submission_over_tls_address: "127.0.0.1:2465"
monitoring_address: "127.0.0.1:1099"
mail_delivery_agent_bin: "/usr/lib/dovecot/deliver"
mail_delivery_agent_args: "-d"
mail_delivery_agent_args: "%to_user%@%to_domain%"
mail_delivery_agent_args: "-f"
mail_delivery_agent_args: "%from%"
data_dir: "data"
suffix_separators: "-+"
drop_characters: ""
mail_log_path: "log/mail.log"
dovecot_auth: true
dovecot_userdb_path: "/run/dovecot/auth-userdb"
dovecot_client_path: "/run/dovecot/auth-client"
haproxy_incoming: true
max_queue_items: 50
give_up_send_after: "48h"
"""


def test_every_config_field():
    cfg = parse_config(FULL_CONF)
    assert cfg.explicit == frozenset(CONFIG_SCHEMA)
    assert cfg == ChasquidConfig(
        hostname="mx.chasquid.test", max_data_size_mb=10,
        smtp_address=("127.0.0.1:2525", "[::1]:2525"), submission_address=(":2587",),
        submission_over_tls_address=("127.0.0.1:2465",), monitoring_address="127.0.0.1:1099",
        mail_delivery_agent_bin="/usr/lib/dovecot/deliver",
        mail_delivery_agent_args=("-d", "%to_user%@%to_domain%", "-f", "%from%"),
        data_dir="data", suffix_separators="-+", drop_characters="",
        mail_log_path="log/mail.log", dovecot_auth=True,
        dovecot_userdb_path="/run/dovecot/auth-userdb",
        dovecot_client_path="/run/dovecot/auth-client", haproxy_incoming=True,
        max_queue_items=50, give_up_send_after="48h", explicit=cfg.explicit)
    assert cfg.give_up_seconds == 48 * 3600


def test_zero_values_do_not_override_like_chasquid():
    cfg = parse_config('max_data_size_mb: -3 hostname: "" data_dir: "" dovecot_auth: false '
                       "max_queue_items: 0 smtp_address: []", system_hostname="sys.test")
    assert cfg == ChasquidConfig(hostname="sys.test")
    assert cfg.explicit == frozenset()
    cfg = parse_config('suffix_separators: "" drop_characters: ""')  # optional: "" is a value
    assert (cfg.suffix_separators, cfg.drop_characters) == ("", "")


def test_config_errors_name_file_and_line(tmp_path):
    path = tmp_path / "chasquid.conf"
    path.write_text('hostname: "a"\n\nno_such_field: 1\n')
    with pytest.raises(TextFormatError) as exc:
        read_config(path)
    assert exc.value.line == 3 and str(path) in str(exc.value)
    path.write_text('give_up_send_after: "2 days"\n')
    with pytest.raises(ChasquidError, match="give_up_send_after"):
        read_config(path)


def test_config_agrees_with_chasquid_util_print_config(tmp_path):
    """chasquid-util print-config prints the effective configuration (defaults filled in) in
    text format: our reading of a file must be what chasquid makes of it."""
    root = tmp_path / "c"
    root.mkdir()
    (root / "chasquid.conf").write_text("")
    defaults = chasquid_util(root, "print-config")
    assert defaults.returncode == 0, defaults.stderr
    known = set(parse_message(defaults.stdout, CONFIG_SCHEMA)) | {
        "monitoring_address", "dovecot_auth", "dovecot_userdb_path", "dovecot_client_path",
        "haproxy_incoming"}  # proto3 zero values are not printed
    lines = [ln for ln in FULL_CONF.splitlines() if ln.split(":")[0] in known or
             ln.startswith("#")]
    text = "\n".join(lines) + "\n"
    for conf in ("", text, 'max_data_size_mb: 0\nsuffix_separators: ""\nhostname: "h.test"\n'):
        (root / "chasquid.conf").write_text(conf)
        done = chasquid_util(root, "print-config")
        assert done.returncode == 0, done.stderr
        theirs = parse_config(done.stdout, system_hostname="unused")
        ours = parse_config(conf, system_hostname=os.uname().nodename)
        for name in known:
            assert getattr(ours, name) == getattr(theirs, name), (name, conf)


# ------------------------------------------------------------------------------ domaininfo


def test_domaininfo_store(tmp_path):
    folder = tmp_path / "data" / "domaininfo"
    folder.mkdir(parents=True)
    (folder / "s:example.org").write_text('name: "example.org"\n'
                                          "incoming_sec_level: TLS_CLIENT\n"
                                          "outgoing_sec_level: TLS_SECURE\n")
    (folder / "s:ex%C3%A4mple.net").write_text('name: "exämple.net"\n'
                                               "outgoing_sec_level: TLS_INSECURE\n")
    (folder / "s:plain.test").write_text('name: "plain.test"\n')
    (folder / "s:broken.test").write_text("name: ")
    (folder / "not-ours").write_text("x")
    infos, problems = read_domaininfo(folder)
    assert infos == {
        "example.org": DomainInfo("example.org", "TLS_CLIENT", "TLS_SECURE"),
        "exämple.net": DomainInfo("exämple.net", "PLAIN", "TLS_INSECURE"),
        "plain.test": DomainInfo("plain.test"),
    }
    assert len(problems) == 1 and "s:broken.test" in problems[0]
    assert tampu_domaininfo(infos["example.org"]) == {
        "domain": "example.org", "incoming": "tls_unverified", "outgoing": "tls_verified"}
    assert tampu_domaininfo(infos["exämple.net"]) == {
        "domain": "exämple.net", "incoming": "plain", "outgoing": "tls_unverified"}
    # what tampu learned already is never lowered
    assert tampu_domaininfo(infos["plain.test"], {"outgoing": "tls_verified"})["outgoing"] \
        == "tls_verified"
    written = write_tampu_domaininfo(folder, infos)
    assert sorted(p.name for p in written) == ["ex%C3%A4mple.net.json", "example.org.json",
                                               "plain.test.json"]
    from tampu.plugins.domaininfo.store import DomainInfoStore, SecLevel

    store = DomainInfoStore(folder)  # the plugin reads the converted files
    assert asyncio.run(store.outgoing("example.org")) == SecLevel.TLS_VERIFIED
    assert asyncio.run(store.incoming("example.org")) == SecLevel.TLS_UNVERIFIED
    assert asyncio.run(store.outgoing("exämple.net")) == SecLevel.TLS_UNVERIFIED
    assert not asyncio.run(store.check_outgoing("example.org", SecLevel.PLAIN))


def test_domaininfo_file_names_are_chasquids(tmp_path):
    """Debian's chasquid-util (1.11) removes <data_dir>/domaininfo/s:<QueryEscape(domain)>
    itself: it finds the file we read for a domain that needs escaping."""
    root = tmp_path / "c"
    folder = root / "data" / "domaininfo"
    folder.mkdir(parents=True)
    (root / "chasquid.conf").write_text('data_dir: "data"\n')
    name = "s:ex%C3%A4mple+x.org"
    (folder / name).write_text('outgoing_sec_level: TLS_SECURE\n')
    infos, _ = read_domaininfo(folder)
    assert list(infos) == ["exämple x.org"]  # QueryEscape's + is a space
    done = chasquid_util(root, "domaininfo-remove", "exämple x.org")
    if done.returncode != 0 and "removing file" not in done.stdout + done.stderr:
        pytest.skip(f"chasquid-util 1.12+ asks the running chasquid instead: {done.stdout}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (folder / name).exists()
