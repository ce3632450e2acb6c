"""The one reader of address headers (dmarc and sender_policy judge From: through it)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tampu.address_header import MAX_HEADER, parse_address_header


def test_one_mailbox() -> None:
    header = parse_address_header("from", 'Alice <"a b"@Example.org>')
    assert header.clean
    assert [(m.local, m.domain, m.addr_spec) for m in header.addresses] == \
        [("a b", "Example.org", '"a b"@Example.org')]


def test_a_group_that_crashes_the_stdlib_parser_is_unclean() -> None:
    # Python's header registry raises AttributeError on this value (a group as a mailbox)
    header = parse_address_header("from", ":;0")
    assert not header.clean
    assert header.addresses == ()


def test_repaired_and_overlong_values_are_unclean() -> None:
    assert not parse_address_header("from", "a@b.example, <c@").clean
    long = parse_address_header("from", "a" * (MAX_HEADER + 1) + "@example.org")
    assert long.too_long and not long.clean


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80))
def test_never_raises(value: str) -> None:
    header = parse_address_header("from", value)  # any text: a result, never an exception
    for mailbox in header.addresses:
        assert mailbox.addr_spec.endswith(mailbox.domain)


def _stdlib(value: str) -> tuple[tuple[str, str, str], ...]:
    import email.policy

    header = email.policy.default.header_factory("from", value)
    return tuple((str(a.username), str(a.domain), str(a.addr_spec)) for a in header.addresses)


_ATEXT = st.sampled_from("abcXYZ019!#$%&'*+/=?^_`{|}~-")
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,5}[a-z0-9])?", fullmatch=True)
_LOCAL = st.lists(st.text(_ATEXT, min_size=1, max_size=6), min_size=1, max_size=3).map(".".join)
_NAME = st.lists(st.from_regex(r"[A-Za-z0-9_+-]{1,6}", fullmatch=True), max_size=3).map(" ".join)


@given(_NAME, _LOCAL, st.lists(_LABEL, min_size=1, max_size=3).map(".".join), st.booleans())
def test_the_fast_path_agrees_with_the_email_parser(name: str, local: str, domain: str,
                                                    bracket: bool) -> None:
    value = f"{name} <{local}@{domain}>".lstrip() if name or bracket else f"{local}@{domain}"
    header = parse_address_header("from", value)
    assert header.clean
    assert tuple((m.local, m.domain, m.addr_spec) for m in header.addresses) == _stdlib(value)
