"""Address parsing and normalization: examples and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tampu.addresses import (
    AddressError,
    PathError,
    domain_to_ascii,
    lookup_key,
    normalize_domain,
    normalize_user,
    parse_path,
)


@pytest.mark.parametrize(("given_", "canonical"), [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("faß.de", "faß.de"),
    ("FAß.DE", "faß.de"),
    ("xn--fa-hia.de", "faß.de"),
    ("XN--BCHER-KVA.de", "bücher.de"),
    ("bu\u0308cher.de", "bücher.de"),  # NFD input
    ("[192.0.2.1]", "[192.0.2.1]"),
    ("[IPv6:2001:DB8:0::1]", "[IPv6:2001:db8::1]"),
])
def test_canonical_domains(given_, canonical):
    assert normalize_domain(given_) == canonical


def test_ascii_form_keeps_eszett():
    assert domain_to_ascii("faß.de") == "xn--fa-hia.de"
    assert domain_to_ascii("xn--fa-hia.de") == "xn--fa-hia.de"


@pytest.mark.parametrize("bad", ["a..b", "-a.de", "xn--zz.de", "ex_ample.com", "[1.2.3]",
                                 "[IPv6:zz]", "a" * 64 + ".de"])
def test_invalid_domains(bad):
    with pytest.raises(AddressError):
        normalize_domain(bad)


def test_users():
    assert normalize_user("John.Doe") == "john.doe"
    assert normalize_user("ＪＯＨＮ") == "john"  # full-width letters
    assert lookup_key("John.Doe+news") == "johndoe"
    assert lookup_key("+tag") == "+tag"  # a leading separator is not a suffix
    assert lookup_key("a-b_c", separators="-_", drop="") == "a"


@pytest.mark.parametrize(("arg", "address"), [
    ("<user@example.com>", "user@example.com"),
    ("<user@Example.COM> SIZE=10", "user@example.com"),
    (" <user@example.com>", "user@example.com"),
    ("user@example.com", "user@example.com"),
    ("<@relay.example:user@example.com>", "user@example.com"),
    ('<"john doe"@example.com>', '"john doe"@example.com'),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]"),
    ("<>", ""),
])
def test_valid_reverse_paths(arg, address):
    assert parse_path(arg, sender=True).address == address


@pytest.mark.parametrize(("arg", "code", "status"), [
    ("<user@example.com", 501, "5.1.7"),
    ("<user>", 501, "5.1.7"),
    ("<user@>", 501, "5.1.7"),
    ("<@example.com>", 501, "5.1.7"),
    ("<us er@example.com>", 501, "5.1.7"),
    ("<user@exa_mple.com>", 553, "5.1.8"),
    ("<user@xn--zz.com>", 553, "5.1.8"),
    ("<user@exa\x00mple.com>", 501, "5.1.7"),
    ("<jösé@example.com>", 553, "5.6.7"),
    (f"<{'a' * 65}@example.com>", 501, "5.1.7"),
    (f"<a@{'b' * 60}.{'c' * 60}.{'d' * 60}.{'e' * 60}.{'f' * 20}.com>", 501, "5.1.7"),
    ("<user@example.com> SIZE", None, None),
    ("<user@example.com> B@D=1", 555, "5.5.4"),
    ("<user@example.com>x", 501, "5.1.7"),
])
def test_refused_reverse_paths(arg, code, status):
    if code is None:
        assert parse_path(arg, sender=True).params == {"SIZE": True}
        return
    with pytest.raises(PathError) as info:
        parse_path(arg, sender=True)
    assert (info.value.reply.code, info.value.reply.status) == (code, status)


def test_forward_paths():
    assert parse_path("<Postmaster>", sender=False, postmaster_domain="example.com").address \
        == "postmaster@example.com"
    with pytest.raises(PathError) as info:
        parse_path("<>", sender=False)
    assert info.value.reply.status == "5.1.3"
    with pytest.raises(PathError) as info:
        parse_path("<bob>", sender=False)
    assert info.value.reply.status == "5.1.3"
    assert parse_path("<jösé@faß.de> SMTPUTF8", sender=True).address == "jösé@faß.de"
    assert parse_path("<a@xn--fa-hia.de>", sender=False).address == "a@faß.de"


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


@given(domains)
def test_canonical_form_is_idempotent_and_case_blind(domain):
    canonical = normalize_domain(domain)
    assert normalize_domain(canonical) == canonical
    assert normalize_domain(domain.upper()) == canonical
    assert normalize_domain(domain_to_ascii(canonical)) == canonical


@given(st.text(min_size=1, max_size=20))
def test_unicode_domains_never_crash(text):
    try:
        canonical = normalize_domain(text)
    except AddressError:
        return
    assert normalize_domain(canonical) == canonical
    assert normalize_domain(domain_to_ascii(canonical)) == canonical


@given(st.text(max_size=300))
def test_paths_parse_or_refuse_cleanly(text):
    for sender in (True, False):
        try:
            path = parse_path(text, sender=sender)
        except PathError as exc:
            assert exc.reply.code in (501, 553, 555)
            continue
        assert "\x00" not in path.address and "\r" not in path.address


@given(st.text(max_size=30))
def test_user_forms_are_idempotent(user):
    once = normalize_user(user)
    assert normalize_user(once) == once
