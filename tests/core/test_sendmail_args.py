"""``sendmail``'s command line and message handling, without a server."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tampu.commands.sendmail import (
    Options,
    UsageError,
    code_for,
    complete,
    parse_args,
    read_message,
    remainder,
)


def test_options_in_both_spellings():
    opts = parse_args(["-fjoe@example.org", "-F", "Joe Cron", "-oi", "-t", "-odi", "-oem",
                       "-N", "failure,delay", "-Rhdrs", "-V", "env1", "a@example.com", "--",
                       "-b@example.com"])
    assert opts.sender == "joe@example.org" and opts.full_name == "Joe Cron"
    assert opts.ignore_dots and opts.from_headers
    assert opts.notify == "DELAY,FAILURE" and opts.ret == "HDRS" and opts.envid == "env1"
    assert opts.recipients == ["a@example.com", "-b@example.com"]


@pytest.mark.parametrize("argv", [["-bs"], ["-bp"], ["-q"], ["-Z"], ["-f"], ["-N", "never,delay"],
                                  ["-R", "most"]])
def test_unsupported_or_bad_options(argv):
    with pytest.raises(UsageError):
        parse_args(argv)


def test_tampu_command_line_is_passed_through():
    assert remainder(["sendmail", "-t"]) == ["-t"]
    assert remainder(["--config-dir", "/etc/x", "sendmail", "a@b.c"]) == \
        ["--config-dir=/etc/x", "a@b.c"]
    assert remainder(["queue", "list"]) is None
    assert remainder(["--config-dir", "sendmail", "check"]) is None  # a directory named so


def test_a_lone_dot_ends_input_unless_i():
    data = b"Subject: x\n\nline\n.\nafter\n"
    assert read_message(io.BytesIO(data), ignore_dots=False) == b"Subject: x\r\n\r\nline\r\n"
    assert read_message(io.BytesIO(data), ignore_dots=True).endswith(b".\r\nafter\r\n")


def test_headers_are_completed_and_bcc_removed():
    opts = Options(from_headers=True, full_name="Cron Daemon")
    data = b"To: a@example.com, B <b@example.com>\r\nBcc: hidden@example.com\r\n" \
           b"  , more@example.com\r\nSubject: s\r\n\r\nbody\r\n"
    message, found = complete(data, opts, "root@example.com", "mail.example.com")
    assert found == ["a@example.com", "b@example.com", "hidden@example.com", "more@example.com"]
    head = message.split(b"\r\n\r\n")[0]
    assert b"Bcc" not in head and b"hidden" not in head
    assert b"From: Cron Daemon <root@example.com>" in head
    assert b"Date: " in head and b"Message-ID: <" in head and b"@mail.example.com>" in head
    assert message.endswith(b"\r\n\r\nbody\r\n")


def test_a_message_without_headers_gets_them():
    message, _ = complete(b"just text\r\n", Options(), "root@example.com", "h.example")
    head, _, body = message.partition(b"\r\n\r\n")
    assert head.startswith(b"From: root@example.com") and body == b"just text\r\n"


def test_exit_codes():
    assert code_for(451, "4.3.0") == 75
    assert code_for(550, "5.1.1") == 67
    assert code_for(550, "5.7.1") == 69
    assert code_for(554, "") == 69


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"],
                                               blacklist_characters="\r\n"), max_size=40),
                max_size=30))
def test_message_lines_survive(lines):
    raw = "".join(f"{line}\n" for line in lines).encode()
    out = read_message(io.BytesIO(raw), ignore_dots=True)
    assert out == "".join(f"{line}\r\n" for line in lines).encode()
    message, _ = complete(out, Options(), "a@example.com", "h.example")
    assert message.endswith(out.partition(b"\r\n\r\n")[2]) or b"\r\n\r\n" not in out
