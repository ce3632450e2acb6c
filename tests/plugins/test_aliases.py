"""aliases: the file format, the resolver's rules, hook programs, and end to end over SMTP."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from tampu.cli import main as tampu_main
from tampu.plugins.aliases import srs
from tampu.plugins.aliases.parser import (
    AliasesError,
    Kind,
    Target,
    parse_aliases,
    parse_rhs,
    remove_drop_characters,
    remove_drops_and_suffix,
)
from tampu.plugins.aliases.resolver import AliasFiles, HookPrograms, Resolver
from tampu.testing import server_toml, wait_for
from tests.plugins.remote_kit import MXFarm, free_port

D = "example.test"

# ------------------------------------------------------------------------------ the file format


def test_parse_basic_rules():
    aliases = parse_aliases("""
# a comment
pepe: jose
flowers: rose@backgarden, lilly@pond,
  Mixed.Case : Someone@Example.ORG
null: | cat -u  --x
relay: far@remote.test via mx1.remote.test/[192.0.2.1]:2525
*: *@other.test, pepe
pepe: juan
ñandú: josé
""", D)
    assert aliases["pepe@example.test"] == [Target(Kind.EMAIL, "juan@example.test")]  # override
    assert aliases["flowers@example.test"] == [Target(Kind.EMAIL, "rose@backgarden"),
                                               Target(Kind.EMAIL, "lilly@pond")]
    assert aliases["mixedcase@example.test"] == [Target(Kind.EMAIL, "someone@example.org")]
    assert aliases["null@example.test"] == [Target(Kind.PIPE, "cat -u  --x")]
    assert aliases["relay@example.test"] == [
        Target(Kind.FORWARD, "far@remote.test", ("mx1.remote.test", "[192.0.2.1]:2525"))]
    assert aliases["*@example.test"] == [Target(Kind.EMAIL, "*@other.test"),
                                         Target(Kind.EMAIL, "pepe@example.test")]
    assert aliases["ñandú@example.test"] == [Target(Kind.EMAIL, "josé@example.test")]
    assert len(aliases) == 7


def test_trailing_comments_as_the_docs_write_them():
    aliases = parse_aliases("pepe: jose                    # to jose\n"
                            "null: | cat   # a pipe, commented\n"
                            "hash: x#y\n", D)
    assert aliases["pepe@example.test"] == [Target(Kind.EMAIL, "jose@example.test")]
    assert aliases["null@example.test"] == [Target(Kind.PIPE, "cat")]
    assert aliases["hash@example.test"] == [Target(Kind.EMAIL, "x#y@example.test")]


def test_idn_domains_have_one_form():
    aliases = parse_aliases("Ñandú: Pepe@XN--FA-HIA.de\n", "xn--and-6ma2c.test")
    assert aliases == {"ñandú@ñandú.test": [Target(Kind.EMAIL, "pepe@faß.de")]}


def test_parse_drop_characters_and_suffixes_on_the_left():
    aliases = parse_aliases("juana.perez: juana\njuana.perez+fruta: fruta\n", D)
    assert set(aliases) == {"juanaperez@example.test", "juanaperez+fruta@example.test"}


@pytest.mark.parametrize("text,problem", [
    ("pepe jose", "line 1: missing ':'"),
    ("# ok\n\npepe:", "line 3: missing address or alias"),
    (": jose", "missing address or alias"),
    ("pepe@example.test: jose", "left-side: cannot contain @"),
    ("ok: fine\nnull: |", "line 2: right-side: the pipe alias is missing a command"),
    ("f: far@x via a//b", "empty server in via list"),
    ("f:  via a", "invalid address"),
])
def test_parse_errors_name_the_line(text, problem):
    with pytest.raises(AliasesError, match=problem.replace("|", r"\|")):
        parse_aliases(text, D)


def test_rhs_of_hook_output():
    assert parse_rhs("", D) == []
    assert parse_rhs(" a, b@x.test \n", D) == [Target(Kind.EMAIL, "a@example.test"),
                                                Target(Kind.EMAIL, "b@x.test")]
    assert parse_rhs("| /bin/handler arg", D) == [Target(Kind.PIPE, "/bin/handler arg")]


def test_drop_and_suffix_helpers():
    assert remove_drop_characters("Ju.Ana+Fru.ta@Example.Test", ".", "+") == \
        "juana+fru.ta@example.test"
    assert remove_drops_and_suffix("ju.ana+fruta@example.test", ".", "+-") == \
        "juana@example.test"
    assert remove_drops_and_suffix("ju.ana-x+y@example.test", ".", "+-") == "juana@example.test"


KEY = b"k" * 32


def test_rewrite_sender_keeps_chasquids_form_with_a_tag():
    got = srs.rewrite("bob@far.test", "list+x@example.test", "+", KEY)
    assert re.fullmatch(r"list\+x\+fwd_from=bob=far\.test=[a-z2-7]{6}@example\.test", got), got
    assert srs.rewrite("bob@far.test", "a@ñandú.test", "-", KEY).startswith(
        "a-fwd_from=bob=far.test=")


def test_rewriting_a_rewritten_sender_never_nests():
    once = srs.rewrite("bob@far.test", "a@one.test", "+", KEY)
    twice = srs.rewrite(once, "b@two.test", "+", KEY)  # forwarded again, elsewhere
    assert srs.original_sender(twice) == "bob@far.test"
    assert twice.startswith("b+fwd_from=bob=far.test=") and "fwd_from" not in twice[9:]
    chasquid = "list+fwd_from=bob=far.test@other.test"  # chasquid's form, no tag
    assert srs.original_sender(chasquid) == "bob@far.test"
    for _ in range(20):  # a forwarding loop: the length stays put
        once = srs.rewrite(once, "a@one.test", "+", KEY)
    assert len(once) < 64 + 20


def test_too_long_a_rewrite_is_not_used():
    long_sender = "x" * 50 + "@far.test"
    assert srs.rewrite(long_sender, "a@one.test", "+", KEY) is None


def test_bounce_target_needs_our_tag_and_a_recent_day():
    now = 1_800_000_000.0
    rewritten = srs.rewrite("bob@far.test", "a@one.test", "+", KEY, now=now)
    assert srs.bounce_target(rewritten, "+", KEY, now=now) == "bob@far.test"
    assert srs.bounce_target(rewritten, "+", KEY, now=now + 5 * 86400) == "bob@far.test"
    assert srs.bounce_target(rewritten, "+", KEY, now=now + 30 * 86400) is None  # too old
    assert srs.bounce_target(rewritten, "+", b"other key" * 4, now=now) is None
    forged = "a+fwd_from=victim=example.org=aaaaaa@one.test"
    assert srs.bounce_target(forged, "+", KEY, now=now) is None  # no backscatter relay
    assert srs.bounce_target("a@one.test", "+", KEY, now=now) is None


# ------------------------------------------------------------------------------ the resolver


def make_resolver(tmp_path: Path, aliases: str, users: tuple[str, ...] = (), *,
                  hooks: dict[str, str] | None = None, timeout: float = 5.0,
                  max_depth: int = 10) -> Resolver:
    domains = tmp_path / "domains"
    (domains / D).mkdir(parents=True, exist_ok=True)
    (domains / D / "aliases").write_text(aliases, encoding="utf-8")
    for name, script in (hooks or {}).items():
        path = tmp_path / "hooks" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(script)
        path.chmod(0o755)
    return Resolver(AliasFiles(lambda d: domains / d, ".", "+"), HookPrograms(tmp_path, timeout),
                    lambda d: d.lower() == D, lambda u, d: u in users, max_depth)


def resolve(resolver: Resolver, address: str) -> list[tuple[str, str]]:
    return [(f.kind.value, f.value) for f in asyncio.run(resolver.resolve(address))]


CHASQUID_TABLE = "juana.perez: juana\njuana.perez+fruta: fruta\n"


@pytest.mark.parametrize("address,final", [
    ("juana.perez", "juana"), ("juanaperez", "juana"), ("ju.ana.pe.rez", "juana"),
    ("juana.perez+abc", "juana"), ("juanaperez+abc", "juana"),
    ("juana.perez+fruta", "fruta"), ("juanaperez+fruta", "fruta"), ("JUANA.Perez", "juana"),
])
def test_chasquid_drop_and_suffix_table(tmp_path, address, final):
    resolver = make_resolver(tmp_path, CHASQUID_TABLE, users=("juana", "fruta"))
    assert resolve(resolver, f"{address}@{D}") == [("email", f"{final}@{D}")]


def test_recursion_pipes_forwards_and_remote(tmp_path):
    resolver = make_resolver(tmp_path, """
team: pepe, ops
ops: | /usr/bin/pager --all
pepe: jose, far@remote.test
jose: juan
fwd: out@remote.test via 127.0.0.2:2525
""", users=("juan",))
    assert resolve(resolver, f"team@{D}") == [
        ("email", f"juan@{D}"), ("email", "far@remote.test"), ("pipe", "/usr/bin/pager --all")]
    finals = asyncio.run(resolver.resolve(f"fwd@{D}"))
    assert finals[0].kind is Kind.FORWARD and finals[0].via == ("127.0.0.2:2525",)
    assert finals[0].path == (f"fwd@{D}",)
    pepe = asyncio.run(resolver.resolve(f"team@{D}"))[0]
    assert pepe.path == (f"team@{D}", f"pepe@{D}", f"jose@{D}", f"juan@{D}")


def test_catch_all_only_for_unknown_users(tmp_path):
    resolver = make_resolver(tmp_path, "pepe: jose\n*: postmaster, *@other.test\n",
                             users=("jose", "real", "postmaster"))
    assert resolve(resolver, f"real@{D}") == [("email", f"real@{D}")]
    assert resolve(resolver, f"pepe@{D}") == [("email", f"jose@{D}")]
    # '*' on the right takes the user exactly as given (suffix and dots kept)
    assert resolve(resolver, f"Lil.ly+x@{D}") == [("email", f"postmaster@{D}"),
                                                   ("email", "Lil.ly+x@other.test")]
    assert asyncio.run(resolver.exists(f"anything@{D}"))


def test_unknown_without_catch_all_is_final_as_given(tmp_path):
    resolver = make_resolver(tmp_path, "pepe: jose\n")
    assert resolve(resolver, f"Nobody+x@{D}") == [("email", f"Nobody+x@{D}")]
    assert not asyncio.run(resolver.exists(f"nobody@{D}"))
    assert asyncio.run(resolver.exists(f"p.epe+tag@{D}"))
    assert not asyncio.run(resolver.exists("pepe@elsewhere.test"))


def test_loops_are_cut_and_depth_is_limited(tmp_path):
    resolver = make_resolver(tmp_path, "pepe: pepe, jose\na: b\nb: a\nc: c, jose\n",
                             users=("jose", "pepe"))
    assert resolve(resolver, f"pepe@{D}") == [("email", f"pepe@{D}"), ("email", f"jose@{D}")]
    # a cycle with no real user in it: a temporary failure, never a mailbox nobody owns
    for looping in ("a", "c"):
        with pytest.raises(AliasesError, match="alias loop without a user"):
            asyncio.run(resolver.resolve(f"{looping}@{D}"))
    chain = "".join(f"l{i}: l{i + 1}\n" for i in range(12))
    deep = make_resolver(tmp_path, chain, users=("l12",), max_depth=10)
    with pytest.raises(AliasesError, match="recursion limit"):
        asyncio.run(deep.resolve(f"l0@{D}"))
    nine = "".join(f"l{i}: l{i + 1}\n" for i in range(9))  # l0 -> ... -> l9: 10 levels
    assert resolve(make_resolver(tmp_path, nine), f"l0@{D}") == [("email", f"l9@{D}")]


def test_file_changes_are_picked_up(tmp_path):
    resolver = make_resolver(tmp_path, "pepe: jose\n", users=("jose", "juan"))
    assert resolve(resolver, f"pepe@{D}") == [("email", f"jose@{D}")]
    path = tmp_path / "domains" / D / "aliases"
    path.write_text("pepe: juan, jose\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert resolve(resolver, f"pepe@{D}") == [("email", f"juan@{D}"), ("email", f"jose@{D}")]
    path.write_text("pepe juan\n")  # broken: the previous version stays
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert resolve(resolver, f"pepe@{D}") == [("email", f"juan@{D}"), ("email", f"jose@{D}")]


RESOLVE_HOOK = """#!/bin/sh
echo "$1" >> "$(dirname "$0")/calls"
case "$1" in
  dyn@example.test) echo "jose, far@remote.test" ;;
  pipe@example.test) echo "| /bin/cat -v" ;;
  bad@example.test) echo "oops"; exit 3 ;;
  ghost@example.test) exit 1 ;;
  slow@example.test) sleep 10 ;;
esac
"""
EXISTS_HOOK = """#!/bin/sh
[ "$1" = "ghost@example.test" ]
"""


def test_alias_resolve_hook(tmp_path):
    resolver = make_resolver(tmp_path, "dyn: juan\n", users=("jose", "juan"),
                             hooks={"alias-resolve": RESOLVE_HOOK}, timeout=0.5)
    # file results first, hook results appended
    assert resolve(resolver, f"dyn@{D}") == [
        ("email", f"juan@{D}"), ("email", f"jose@{D}"), ("email", "far@remote.test")]
    assert resolve(resolver, f"pipe@{D}") == [("pipe", "/bin/cat -v")]
    assert (tmp_path / "hooks" / "calls").read_text().splitlines()[0] == f"dyn@{D}"
    with pytest.raises(AliasesError, match="exited with 3"):
        asyncio.run(resolver.resolve(f"bad@{D}"))
    start = time.monotonic()
    with pytest.raises(AliasesError, match="timed out"):
        asyncio.run(resolver.resolve(f"slow@{D}"))
    assert time.monotonic() - start < 3
    assert asyncio.run(resolver.exists(f"pipe@{D}"))  # the hook's output counts
    assert not asyncio.run(resolver.exists(f"bad@{D}"))  # a failing hook: no alias


def test_alias_exists_hook(tmp_path):
    resolver = make_resolver(tmp_path, "", hooks={"alias-exists": EXISTS_HOOK})
    assert asyncio.run(resolver.exists(f"ghost@{D}"))
    assert not asyncio.run(resolver.exists(f"other@{D}"))


# ------------------------------------------------------------------------------ end to end

USER, PASSWORD = f"jose@{D}", "secret"

ALIASES = """\
# aliases for the end-to-end tests
pepe: jose
juana.perez: juana
juana.perez+fruta: fruta
team: pepe, juana, piper
piper: | {pipe}
out: friend@remote.test via 127.0.0.2:{port}
ext: far@remote.test
"""


@pytest.fixture
def e2e(tampu_server, make_dns, tmp_path):
    port = free_port()
    farm = MXFarm(port)
    dns = make_dns({"remote.test": {"MX": ["10 mx.remote.test."]},
                    "mx.remote.test": {"A": ["127.0.0.2"]}})
    piped = tmp_path / "piped"

    def start(aliases: str = ALIASES, conf: str = "", hooks: dict[str, str] | None = None):
        conf_text = f"""
[plugins.aliases]
enabled = true
{conf}

[plugins.delivery_maildir]
enabled = true

[plugins.delivery_mda]
enabled = true
command = "false"
args = []

[plugins.delivery_smtp]
enabled = true
port = {port}
connect_timeout = 3
command_timeout = 3
data_timeout = 3
"""
        base = server_toml(extra=f'dns_servers = ["127.0.0.1:{dns.port}"]')
        users = {USER: PASSWORD, f"juana@{D}": "x", f"fruta@{D}": "x"}
        srv = tampu_server(base=base, conf={"31-aliases.toml": conf_text}, users=users,
                           deliver=True)
        (srv.config_dir / "domains" / D / "aliases").write_text(
            aliases.format(pipe=f"cat > {piped}", port=port), encoding="utf-8")
        for name, script in (hooks or {}).items():
            path = srv.config_dir / "hooks" / name
            path.parent.mkdir(exist_ok=True)
            path.write_text(script)
            path.chmod(0o755)
        return srv

    start.farm = farm
    start.piped = piped
    yield start
    farm.stop_all()


def mailbox(srv, user: str) -> list[bytes]:
    new = srv.server.config.data_dir / "mail" / D / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def smtp_send(srv, sender: str, rcpts: list[str], body: bytes = b"Subject: a\r\n\r\nhi\r\n"):
    with srv.smtp() as c:
        c.ehlo()
        assert c.mail(sender)[0] == 250
        replies = [c.rcpt(r) for r in rcpts]
        data = c.data(body) if any(code == 250 for code, _ in replies) else None
    return replies, data


def test_rcpt_checks_aliases_before_localusers(e2e):
    srv = e2e()
    replies, data = smtp_send(srv, "a@far.test", [f"pepe@{D}", f"Juana.Perez+xyz@{D}",
                                                  f"nobody@{D}", f"jose@{D}"])
    assert [code for code, _ in replies] == [250, 250, 550, 250]
    assert replies[2][1].startswith(b"5.1.1")
    assert data[0] == 250


def test_expansion_delivers_to_maildirs_and_pipes(e2e):
    srv = e2e()
    smtp_send(srv, "a@far.test", [f"team@{D}", f"juanaperez+fruta@{D}"],
              b"Subject: team\r\n\r\nhello team\r\n")
    wait_for(lambda: mailbox(srv, "jose") and mailbox(srv, "juana") and mailbox(srv, "fruta"),
             what="maildir deliveries")
    assert b"hello team" in mailbox(srv, "jose")[0]
    assert wait_for(lambda: e2e.piped.exists() and b"hello team" in e2e.piped.read_bytes(),
                    what="pipe delivery")
    wait_for(lambda: not srv.queue_items(), what="queue empty")
    assert mailbox(srv, "pepe") == [] and mailbox(srv, "team") == []


def test_forward_via_hosts_rewrites_the_sender(e2e):
    srv = e2e()
    sink = e2e.farm.start("127.0.0.2")
    smtp_send(srv, "bob@far.test", [f"out@{D}", f"ext@{D}"])
    got = wait_for(lambda: len(sink.received) >= 2 and sink.received, what="forwards")
    by_rcpt = {r.rcpt_tos[0]: r for r in got}
    assert re.fullmatch(r"out\+fwd_from=bob=far\.test=\w{6}@example\.test",
                        by_rcpt["friend@remote.test"].mail_from)
    assert re.fullmatch(r"ext\+fwd_from=bob=far\.test=\w{6}@example\.test",
                        by_rcpt["far@remote.test"].mail_from)


def test_forward_from_a_local_sender_keeps_it(e2e):
    srv = e2e()
    sink = e2e.farm.start("127.0.0.2")
    smtp_send(srv, f"jose@{D}", [f"ext@{D}"])
    got = wait_for(lambda: sink.received, what="forward")
    assert got[0].mail_from == f"jose@{D}"


def test_catch_all_and_star_user(e2e):
    srv = e2e(ALIASES + "*: *@remote.test\n")
    sink = e2e.farm.start("127.0.0.2")
    replies, data = smtp_send(srv, "a@far.test", [f"Some.One+x@{D}"])
    assert replies[0][0] == 250 and data[0] == 250
    got = wait_for(lambda: sink.received, what="catch-all forward")
    assert got[0].rcpt_tos == ["Some.One+x@remote.test"]


def test_reload_on_change_and_on_sighup(e2e):
    srv = e2e()
    path = srv.config_dir / "domains" / D / "aliases"
    assert smtp_send(srv, "a@far.test", [f"new@{D}"])[0][0][0] == 550
    path.write_text(ALIASES.format(pipe="cat", port=1) + "new: jose\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert smtp_send(srv, "a@far.test", [f"new@{D}"])[0][0][0] == 250
    assert srv.call(srv.server.reload()) is True  # what SIGHUP does
    assert smtp_send(srv, "a@far.test", [f"new@{D}"])[0][0][0] == 250


def test_hooks_end_to_end(e2e):
    srv = e2e(hooks={"alias-resolve": RESOLVE_HOOK, "alias-exists": EXISTS_HOOK},
              conf="program_timeout = 1")
    sink = e2e.farm.start("127.0.0.2")
    replies, data = smtp_send(srv, "a@far.test", [f"dyn@{D}"])
    assert replies[0][0] == 250 and data[0] == 250
    wait_for(lambda: mailbox(srv, "jose"), what="hook-resolved delivery")
    assert wait_for(lambda: sink.received, what="forward")[0].rcpt_tos == ["far@remote.test"]
    wait_for(lambda: not srv.queue_items(), what="queue empty")
    # ghost@ exists for alias-exists, but alias-resolve fails for it: resolution fails at
    # queueing, so nothing is queued and the client is told to retry (chasquid: 451)
    with srv.smtp() as c:
        c.ehlo()
        c.mail("a@far.test")
        assert c.rcpt(f"ghost@{D}")[0] == 250
        code, msg = c.data(b"Subject: x\r\n\r\nbody\r\n")
    assert code == 451 and msg.startswith(b"4.3.0")
    assert not srv.queue_items()


def test_cli_resolve(e2e, capsys):
    srv = e2e()
    assert tampu_main(["aliases", "--config-dir", str(srv.config_dir), "resolve",
                       f"team@{D}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"jose@{D}\tlocal, reached by team@{D} -> pepe@{D} -> jose@{D}")
    assert out[1] == f"juana@{D}\tlocal, reached by team@{D} -> juana@{D}"
    assert out[2].startswith("| cat > ")
    assert out[2].endswith(f"pipe, reached by team@{D} -> piper@{D}")
    tampu_main(["aliases", "--config-dir", str(srv.config_dir), "resolve", f"out@{D}"])
    assert "forward via 127.0.0.2:" in capsys.readouterr().out
    tampu_main(["aliases", "--config-dir", str(srv.config_dir), "resolve", f"ext@{D}"])
    assert capsys.readouterr().out == \
        f"far@remote.test\tremote (forwarded), reached by ext@{D} -> far@remote.test\n"
    tampu_main(["aliases", "resolve", "--config-dir", str(srv.config_dir), f"jose@{D}"])
    assert capsys.readouterr().out == f"jose@{D}\tlocal, no alias\n"
