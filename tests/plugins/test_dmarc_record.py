"""dmarc: the record parser (RFC 7489 6.3, 6.4), with examples and hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tampu.plugins.dmarc.record import (
    POLICIES,
    DmarcRecord,
    RecordError,
    ReportUri,
    is_dmarc_record,
    parse_record,
)

# ---------------------------------------------------------------------------- examples


def test_rfc_7489_appendix_b_examples():
    r = parse_record("v=DMARC1; p=none; rua=mailto:dmarc-feedback@example.com")
    assert (r.p, r.sp, r.pct, r.adkim, r.aspf) == ("none", "none", 100, "r", "r")
    assert r.rua == (ReportUri("mailto:dmarc-feedback@example.com"),)
    r = parse_record("v=DMARC1; p=quarantine; rua=mailto:dmarc-feedback@example.com,"
                     "mailto:tld-test@thirdparty.example.net!10m; pct=25")
    assert r.p == "quarantine" and r.pct == 25
    assert r.rua[1] == ReportUri("mailto:tld-test@thirdparty.example.net", 10 * 2**20)
    r = parse_record("v=DMARC1; p=reject; sp=none; adkim=s; aspf=s; fo=1:d; rf=afrf; "
                     "ri=3600; ruf=mailto:f@example.com")
    assert (r.sp, r.sp_explicit, r.adkim, r.aspf, r.fo, r.ri) == \
        ("none", True, "s", "s", ("1", "d"), 3600)
    assert r.policy_for(True) == "none" and r.policy_for(False) == "reject"


@pytest.mark.parametrize("text", [
    "v=DMARC1;p=reject", "V = DMARC1 ; P = REJECT ;", "v=DMARC1; p=Reject; future=tag;",
    "v=DMARC1;; p=reject;;", "\tv=DMARC1; p=reject  ",
])
def test_lenient_spellings(text):
    assert parse_record(text).p == "reject"


@pytest.mark.parametrize("text,why", [
    ("v=DMARC1", "missing p="), ("v=DMARC1; p=", "invalid p="), ("v=DMARC1; p=always",
                                                                  "invalid p=always"),
    ("v=DMARC1; p=reject; sp=maybe", "invalid sp=maybe"),
    ("v=DMARC1; p=reject; p=none", "given twice"), ("v=DMARC1; p=reject; junk", "malformed"),
    ("v=DMARC1; p=reject; 1x=2", "malformed"), ("v=dmarc1; p=reject", "not a DMARC record"),
    ("p=reject; v=DMARC1", "not a DMARC record"), ("v=DMARC1 p=reject", "not a DMARC record"),
    ("v=DMARC10; p=reject", "not a DMARC record"), ("v=spf1 -all", "not a DMARC record"),
    ("v=DMARC1; p=ʀeject", "invalid p="), ("v=DMARC1; p=reject; rua=mailto:a@b\x00", "malformed"),
])
def test_invalid_records(text, why):
    with pytest.raises(RecordError, match=why):
        parse_record(text)


def test_invalid_policy_with_a_valid_rua_is_none():
    r = parse_record("v=DMARC1; p=bogus; rua=bad uri, mailto:d@example.com")
    assert (r.p, r.sp, r.fallback) == ("none", "none", True)
    r = parse_record("v=DMARC1; p=reject; sp=bogus; rua=mailto:d@example.com")
    assert (r.p, r.sp, r.fallback) == ("none", "none", True)
    with pytest.raises(RecordError):
        parse_record("v=DMARC1; p=bogus; rua=not-a-uri")


@pytest.mark.parametrize("tag,field,default", [
    ("pct=101", "pct", 100), ("pct=-1", "pct", 100), ("pct=ten", "pct", 100),
    ("adkim=x", "adkim", "r"), ("aspf=relaxed", "aspf", "r"), ("ri=4294967296", "ri", 86400),
    ("fo=2", "fo", ("0",)), ("rf=a+b", "rf", ("afrf",)), ("pct=５０", "pct", 100),
])
def test_other_invalid_values_fall_back_to_the_default(tag, field, default):
    r = parse_record(f"v=DMARC1; p=reject; {tag}")
    assert r.p == "reject" and getattr(r, field) == default and r.warnings


# ---------------------------------------------------------------------------- properties

WSP = st.text(alphabet=" \t", max_size=2)
KNOWN = {"v", "p", "sp", "pct", "adkim", "aspf", "rua", "ruf", "fo", "rf", "ri"}


def cased(word: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(word), max_size=len(word)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(word, flips, strict=True)))


uri = st.builds(lambda user, host, size: (f"mailto:{user}@{host}.example", size),
                st.from_regex(r"[a-z0-9.+-]{1,12}", fullmatch=True),
                st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
                st.one_of(st.none(), st.tuples(st.integers(0, 999), st.sampled_from("kmgt"))))
unknown_tag = st.tuples(
    st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: n not in KNOWN),
    st.from_regex(r"[!-:<-~]{0,10}", fullmatch=True))


@st.composite
def records(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """A valid record's text and what the parser must find in it."""
    want: dict[str, object] = {}
    tags: list[tuple[str, str]] = []
    p = draw(st.sampled_from(POLICIES))
    tags.append((draw(cased("p")), draw(cased(p))))
    want["p"] = want["sp"] = p
    want["sp_explicit"] = draw(st.booleans())
    if want["sp_explicit"]:
        sp = draw(st.sampled_from(POLICIES))
        tags.append(("sp", draw(cased(sp))))
        want["sp"] = sp
    for name in ("adkim", "aspf"):
        if draw(st.booleans()):
            mode = draw(st.sampled_from("rs"))
            tags.append((name, draw(cased(mode))))
            want[name] = mode
    if draw(st.booleans()):
        want["pct"] = draw(st.integers(0, 100))
        tags.append(("pct", str(want["pct"])))
    if draw(st.booleans()):
        want["ri"] = draw(st.integers(0, 2**32 - 1))
        tags.append(("ri", str(want["ri"])))
    for name in ("rua", "ruf"):
        if draw(st.booleans()):
            entries = draw(st.lists(uri, min_size=1, max_size=3))
            sep = draw(st.sampled_from([",", ", ", " , "]))
            tags.append((name, sep.join(u + (f"!{s[0]}{s[1]}" if s else "")
                                        for u, s in entries)))
            units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
            want[name] = tuple(ReportUri(u, s[0] * units[s[1]] if s else None)
                               for u, s in entries)
    if draw(st.booleans()):
        want["fo"] = tuple(draw(st.lists(st.sampled_from("01ds"), min_size=1, max_size=4)))
        tags.append(("fo", ":".join(want["fo"])))  # type: ignore[arg-type]
    names = {n.lower() for n, _ in tags}
    for name, value in draw(st.lists(unknown_tag, max_size=3, unique_by=lambda t: t[0])):
        if name not in names:
            tags.append((name, value))
    tags = draw(st.permutations(tags))
    text = draw(cased("v")) + draw(WSP) + "=" + draw(WSP) + "DMARC1"
    for name, value in tags:
        text += draw(WSP) + ";" + draw(WSP) + name + draw(WSP) + "=" + draw(WSP) + value
    if draw(st.booleans()):
        text += draw(WSP) + ";"
    return text + draw(WSP), want


@given(records())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_valid_records_parse_to_what_they_say(case):
    text, want = case
    record = parse_record(text)
    for name, value in want.items():
        assert getattr(record, name) == value, (name, text)
    assert not record.fallback and not record.warnings


def check_invariants(record: DmarcRecord) -> None:
    assert record.p in POLICIES and record.sp in POLICIES
    assert 0 <= record.pct <= 100 and 0 <= record.ri < 2**32
    assert record.adkim in ("r", "s") and record.aspf in ("r", "s")
    assert record.fo and all(f in ("0", "1", "d", "s") for f in record.fo)
    assert all(":" in u.uri and "," not in u.uri for u in record.rua + record.ruf)
    if record.fallback:
        assert record.p == "none" and record.rua


ALPHABET = "vV=DMARC1;psctqunaejdkimfrlo0123456789:,!@.- \t\x00é"


@given(st.text(max_size=80) | st.text(alphabet=ALPHABET, max_size=80).map(
    lambda s: "v=DMARC1;" + s))
@settings(max_examples=500)
def test_any_text_gives_a_record_or_a_record_error(text):
    try:
        record = parse_record(text)
    except RecordError:
        return
    assert is_dmarc_record(text)
    check_invariants(record)


@given(records(), st.sampled_from(["p", "sp"]), st.from_regex(r"[a-z]{1,8}", fullmatch=True))
@settings(max_examples=200)
def test_a_bad_policy_is_rescued_only_by_a_valid_rua(case, tag, bad):
    text, want = case
    if bad in POLICIES:
        return
    specs = [s for s in text.split(";") if s.strip().split("=")[0].strip().lower() != tag]
    broken = ";".join(specs) + f"; {tag}={bad}"
    if want.get("rua"):
        record = parse_record(broken)
        assert record.fallback and record.p == record.sp == "none"
    else:
        with pytest.raises(RecordError):
            parse_record(broken)


@given(records())
@settings(max_examples=100)
def test_only_records_starting_with_the_version_are_dmarc(case):
    text, _ = case
    assert is_dmarc_record(text)
    moved = text.split(";", 1)[1] + "; v=DMARC1"
    assert not is_dmarc_record(moved)
    with pytest.raises(RecordError):
        parse_record(moved)
