"""The checks of ``tampu doctor DOMAIN``, each giving :class:`~.report.Finding` objects.

Every lookup goes through the configured resolver (``[server] dns_servers``), and the checks
reuse the plugins that do the same work in the server: SPF is evaluated by the spf plugin's
checker, DKIM keys are read by the dkim plugin, DMARC records are found and parsed by the
dmarc plugin, the MTA-STS policy is fetched and parsed by delivery_smtp's code, and the
certificate is the one the server would present (:mod:`.cert`).

"This host" is ``[server] hostname``: the MX must point at it, its A/AAAA addresses must
have PTR records naming it, and the domain's SPF must pass for each of them.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import dkim.util
import dns.reversename

from tampu.addresses import domain_to_ascii, normalize_domain
from tampu.config import Config
from tampu.dns import Answer, DnsTempError, Resolver, to_ascii
from tampu.plugins.delivery_smtp.mta_sts import (
    FetchError,
    Policy,
    PolicyError,
    PolicyFetcher,
    parse_policy,
    parse_txt,
)
from tampu.plugins.delivery_smtp.tls_policy import verified_context
from tampu.plugins.dkim.keys import DkimKey, KeyFileError, domain_folder, key_files, load_key
from tampu.plugins.dmarc.evaluate import discover_policy
from tampu.plugins.doctor.cert import check_certificate
from tampu.plugins.doctor.report import Finding, fail, ok, txt_record, warn
from tampu.plugins.doctor.settings import DoctorSettings
from tampu.plugins.spf.check import SpfChecker
from tampu.users import Domains

SPF_TIMEOUT: Final = 20.0
"""Seconds one SPF evaluation may take (RFC 7208 4.6.4 suggests at least 20)."""
WELL_KNOWN: Final = "/.well-known/mta-sts.txt"


@dataclass(frozen=True, slots=True)
class Target:
    """The domain being checked, in both forms."""

    name: str
    """Canonical (Unicode) form, as the configuration knows it."""
    dns: str
    """A-label form, as in DNS and in the records to publish."""


def is_spf(text: str) -> bool:
    """RFC 7208 4.5: a record is ``v=spf1`` alone or followed by a space."""
    low = text.lower()
    return low == "v=spf1" or low.startswith("v=spf1 ")


def with_mechanism(record: str, mechanism: str) -> str:
    """``record`` with ``mechanism`` right after ``v=spf1`` (nothing else changes)."""
    head, _, rest = record.strip().partition(" ")
    return f"{head} {mechanism} {rest.strip()}".rstrip()


def tlsrpt_problem(text: str) -> str:
    """Why a ``v=TLSRPTv1`` record is not usable (RFC 8460 3), or "" when it is."""
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields and fields[-1] == "":
        fields.pop()
    if not fields or fields[0] != "v=TLSRPTv1":
        return "it must start with v=TLSRPTv1;"
    values: dict[str, str] = {}
    for field in fields[1:]:
        key, _, value = field.partition("=")
        values.setdefault(key.strip(" \t"), value.strip(" \t"))
    uris = [u.strip(" \t") for u in values.get("rua", "").split(",") if u.strip(" \t")]
    if not uris:
        return "it has no rua= (where reports go)"
    bad = [u for u in uris if not u.lower().startswith(("mailto:", "https:"))]
    if bad:
        return f"rua= {bad[0][:60]!r} is neither mailto: nor https:"
    return ""


def next_id(current: str | None, today: datetime.date) -> str:
    """A new MTA-STS policy id: ``YYYYMMDDNN``, above ``current`` when that is today's."""
    base = f"{today:%Y%m%d}"
    n = 1
    if current and current.startswith(base) and current[len(base):].isdigit():
        n = int(current[len(base):]) + 1
    return f"{base}{n:02d}"


class Doctor:
    """Runs every check for one domain of one configuration."""

    def __init__(self, config: Config, settings: DoctorSettings, resolver: Resolver, *,
                 now: datetime.datetime | None = None) -> None:
        self.config = config
        self.settings = settings
        self.dns = resolver
        self.hostname = to_ascii(config.server.hostname)
        self.now = now or datetime.datetime.now(datetime.UTC)
        server = config.server
        self.spf_checker = SpfChecker(list(server.dns_servers), server.dns_timeout,
                                      SPF_TIMEOUT, self.hostname, resolver)

    async def run(self, domain: str) -> list[Finding]:
        """Every finding about ``domain`` (raises AddressError for one that is not valid)."""
        name = normalize_domain(domain)
        target = Target(name, domain_to_ascii(name))
        findings = [self.local(target)]
        mx = await self.mx(target)
        findings.append(mx)
        addresses, host = await self.host()
        findings.append(host)
        findings += await self.ptr(addresses)
        findings.append(await self.spf(target, addresses, mx_ok=mx.status == "ok"))
        findings.append(await self.spf_helo(addresses))
        findings += await self.dkim(target)
        findings.append(await self.dmarc(target))
        findings.append(await self.mta_sts(target))
        findings.append(await self.tls_rpt(target))
        findings.append(check_certificate(self.config, self.hostname,
                                          self.settings.cert_warn_days, self.now))
        return findings

    # ------------------------------------------------------------------ helpers

    async def _query(self, name: str, rdtype: str) -> Answer | str:
        """The answer, or what went wrong (a DNS failure) as text."""
        try:
            return await self.dns.query(name, rdtype)
        except DnsTempError as exc:
            return f"DNS lookup of {name} {rdtype} failed: {exc}"
        except ValueError as exc:
            return f"{name} is not a DNS name: {exc}"

    def _rua(self, target: Target) -> str:
        return f"mailto:{self.settings.report_address or f'postmaster@{target.dns}'}"

    # ------------------------------------------------------------------ the domain

    def local(self, target: Target) -> Finding:
        domains = Domains(self.config.domains_dir, self.config.server.local_domains, 0.0)
        if domains.is_local(target.name):
            return ok("domain", f"{target.name} is a local domain of this configuration")
        return fail("domain", f"{target.name} is not a local domain of this configuration: "
                    "mail for it is refused", notes=[
                        f"add it to [server] local_domains, or make the folder "
                        f"{self.config.domains_dir}/{target.name}/"])

    async def mx(self, target: Target) -> Finding:
        record = f"{target.dns}. IN MX 10 {self.hostname}."
        answer = await self._query(target.dns, "MX")
        if isinstance(answer, str):
            return fail("mx", answer)
        if answer.nxdomain:
            return fail("mx", f"{target.dns} does not exist in DNS (NXDOMAIN)", [record])
        hosts = sorted((r.preference, r.exchange.to_text(omit_final_dot=True).lower())
                       for r in answer.records)
        shown = ", ".join(f"{p} {h}." for p, h in hosts)
        if not hosts:
            return fail("mx", f"{target.dns} has no MX record", [record])
        if [h for _, h in hosts] in ([""], ["."]):
            return fail("mx", f"{target.dns} has a null MX (RFC 7505): it says it takes no "
                        "mail", [record])
        if self.hostname in (h for _, h in hosts):
            return ok("mx", f"{target.dns} MX: {shown}")
        return fail("mx", f"{target.dns} MX points elsewhere ({shown}), not at "
                    f"{self.hostname}", [record])

    # ------------------------------------------------------------------ this host

    def _listener_addresses(self) -> list[str]:
        """Public addresses the listeners are bound to, for the A/AAAA records to suggest."""
        found: list[str] = []
        for listener in self.config.server.listeners.values():
            for host, _ in listener.endpoints():
                try:
                    ip = ipaddress.ip_address(host.strip("[]"))
                except ValueError:
                    continue
                if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local):
                    found.append(str(ip))
        return list(dict.fromkeys(found))

    async def host(self) -> tuple[list[str], Finding]:
        addresses: list[str] = []
        for rdtype in ("A", "AAAA"):
            answer = await self._query(self.hostname, rdtype)
            if isinstance(answer, str):
                return [], fail("host", answer)
            addresses += [r.address for r in answer.records if hasattr(r, "address")]
        if addresses:
            return addresses, ok("host", f"{self.hostname} has {', '.join(addresses)}")
        known = self._listener_addresses()
        records = [f"{self.hostname}. IN {'AAAA' if ':' in a else 'A'} {a}" for a in known] \
            or [f"{self.hostname}. IN A <this server's public IPv4 address>",
                f"{self.hostname}. IN AAAA <its public IPv6 address, if it has one>"]
        return [], fail("host", f"{self.hostname} has no A or AAAA record", records)

    async def ptr(self, addresses: list[str]) -> list[Finding]:
        if not addresses:
            return [warn("ptr", f"not checked: {self.hostname} has no address")]
        out = []
        for address in addresses:
            reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
            record = f"{reverse}. IN PTR {self.hostname}."
            note = "a PTR record is set by whoever owns the address (your hosting provider)"
            answer = await self._query(reverse, "PTR")
            if isinstance(answer, str):
                out.append(fail("ptr", answer))
                continue
            names = [r.target.to_text(omit_final_dot=True).lower() for r in answer.records]
            if self.hostname in names:
                out.append(ok("ptr", f"{address} -> {self.hostname}"))
            elif names:
                out.append(fail("ptr", f"{address} -> {', '.join(names)}, not {self.hostname}:"
                                " many receivers refuse mail from it", [record], [note]))
            else:
                out.append(fail("ptr", f"{address} has no PTR record: many receivers refuse "
                                "mail from it", [record], [note]))
        return out

    # ------------------------------------------------------------------ SPF

    async def _spf(self, check: str, name: str, addresses: list[str], sender: str,
                   mechanism: str, fresh: str, missing: str) -> Finding:
        """SPF of ``name`` evaluated for each address of this host, as ``sender``."""
        answer = await self._query(name, "TXT")
        if isinstance(answer, str):
            return fail(check, answer)
        records = [t for t in answer.texts() if is_spf(t)]
        if not records:
            return fail(check, f"{missing} (no SPF record at {name})",
                        [txt_record(name, fresh)])
        if len(records) > 1:
            return fail(check, f"{name} has {len(records)} SPF records; there must be one "
                        "(RFC 7208 4.5: permerror)", [txt_record(name, fresh)],
                        ["remove the others"])
        if not addresses:
            return warn(check, f"not evaluated: {self.hostname} has no address "
                        f"({name}: \"{records[0]}\")")
        bad: list[str] = []
        broken = False
        for address in addresses:
            res = (await self.spf_checker.check_async(address, sender, self.hostname)).result
            if res.result != "pass":
                bad.append(f"{address}: {res.result} ({res.explanation})")
                broken = broken or res.result == "permerror"
        if not bad:
            return ok(check, f"\"{records[0]}\" passes for {', '.join(addresses)}")
        suggestion = fresh if broken else with_mechanism(records[0], mechanism)
        return fail(check, f"\"{records[0]}\" does not pass for this host: {'; '.join(bad)}",
                    [txt_record(name, suggestion)])

    async def spf(self, target: Target, addresses: list[str], *, mx_ok: bool) -> Finding:
        mechanism = "mx" if mx_ok else f"a:{self.hostname}"
        return await self._spf("spf", target.dns, addresses, f"postmaster@{target.dns}",
                               mechanism, f"v=spf1 {mechanism} -all",
                               f"{target.dns} says nothing about who may send its mail")

    async def spf_helo(self, addresses: list[str]) -> Finding:
        """The HELO name's own SPF (RFC 7208 2.3): bounces are checked against it. A warning
        only: most receivers look at the MAIL FROM domain."""
        found = await self._spf("spf-helo", self.hostname, addresses, "", "a", "v=spf1 a -all",
                                f"bounces from {self.hostname} cannot pass SPF")
        if found.status == "FAIL":
            return warn(found.check, found.detail, found.records, found.notes)
        return found

    # ------------------------------------------------------------------ DKIM

    def _signing(self) -> bool:
        table = self.config.plugins.get("dkim")
        return table is not None and table.enabled and table.values.get("sign") is not False

    async def dkim(self, target: Target) -> list[Finding]:
        folder = domain_folder(self.config.domains_dir, target.name)
        keys: list[DkimKey] = []
        out: list[Finding] = []
        for path in key_files(folder):
            try:
                keys.append(load_key(path, target.name))
            except KeyFileError as exc:
                out.append(fail("dkim", f"unusable key: {exc}"))
        make = (f"make one: tampu dkim keygen {target.name} --config-dir "
                f"{self.config.config_dir} (it prints the record to publish)")
        if not keys:
            if not out:
                out.append(warn("dkim", f"no DKIM key in {folder}/ (dkim:<selector>.pem): "
                                "mail from this domain is not signed", notes=[make]))
            return out
        if not self._signing():
            out.append(warn("dkim", "keys exist but [plugins.dkim] is not enabled with "
                            "sign = true: mail is not signed"))
        for key in keys:
            out.append(await self._dkim_key(key))
        return out

    async def _dkim_key(self, key: DkimKey) -> Finding:
        name = f"{key.selector}._domainkey.{key.ascii_domain}"
        answer = await self._query(name, "TXT")
        if isinstance(answer, str):
            return fail("dkim", answer)
        texts = answer.texts()
        if not texts:
            return fail("dkim", f"no key record at {name} for {key.path.name}",
                        [key.zone_record()])
        if len(texts) > 1:
            return fail("dkim", f"{name} has {len(texts)} TXT records; verifiers expect one",
                        [key.zone_record()], ["remove the others"])
        try:
            tags = dkim.util.parse_tag_value(texts[0].encode("utf-8"))
        except dkim.util.InvalidTagValueList:
            return fail("dkim", f"{name} is not a DKIM key record: \"{texts[0][:80]}\"",
                        [key.zone_record()])
        published = b"".join(tags.get(b"p", b"").split()).decode("ascii", "replace")
        kind = tags.get(b"k", b"rsa").decode("ascii", "replace").strip().lower()
        if published == key.public and kind == key.key_type:
            return ok("dkim", f"{name} matches {key.path.name} ({key.algorithm}, "
                      f"{key.bits} bits)")
        why = "revoked (empty p=)" if not published else \
            f"k={kind}, not {key.key_type}" if kind != key.key_type else "another public key"
        return fail("dkim", f"{name} does not match {key.path} ({why}): signatures made "
                    "with it fail", [key.zone_record()])

    # ------------------------------------------------------------------ DMARC

    async def dmarc(self, target: Target) -> Finding:
        wanted = self.settings.dmarc_policy
        record = txt_record(f"_dmarc.{target.dns}",
                            f"v=DMARC1; p={wanted}; rua={self._rua(target)}")
        lookup = await discover_policy(self.dns, target.dns)
        if lookup.status == "temperror":
            return fail("dmarc", f"DNS lookup of _dmarc.{target.dns} failed: {lookup.reason}")
        if lookup.status == "permerror":
            return fail("dmarc", f"invalid DMARC record: {lookup.reason}", [record])
        if lookup.status == "none" or lookup.record is None:
            why = "" if lookup.reason == "no DMARC record" else f" ({lookup.reason})"
            return fail("dmarc", f"no DMARC record at _dmarc.{target.dns}{why}: receivers "
                        "cannot tell your mail from forgeries", [record])
        policy = lookup.record.policy_for(lookup.subdomain_policy)
        where = f"_dmarc.{lookup.source}" + (" (the organizational domain's)"
                                             if lookup.subdomain_policy else "")
        rua = ", ".join(u.uri for u in lookup.record.rua) or "no rua="
        strength = ("none", "quarantine", "reject")
        if strength.index(policy) < strength.index(wanted):
            return warn("dmarc", f"{where}: p={policy} ({rua}): receivers act on failing "
                        f"mail only from p={wanted}", [record])
        return ok("dmarc", f"{where}: p={policy} ({rua})")

    # ------------------------------------------------------------------ MTA-STS, TLS-RPT

    def _policy_notes(self, target: Target, mx: tuple[str, ...]) -> list[str]:
        policy = Policy(self.settings.mta_sts_mode, mx, self.settings.mta_sts_max_age)
        return [f"serve at https://mta-sts.{target.dns}{WELL_KNOWN} (text/plain, with a "
                f"certificate valid for mta-sts.{target.dns}):",
                *(f"  {line}" for line in policy.to_text().splitlines())]

    def _fetcher(self) -> PolicyFetcher:
        ca = self.settings.tls_ca_file
        ca_file = self.config.config_dir / Path(ca) if ca else None
        return PolicyFetcher(self.dns, tls=verified_context(ca_file),
                             port=self.settings.mta_sts_port,
                             timeout=self.settings.fetch_timeout)

    async def mta_sts(self, target: Target) -> Finding:
        name = f"_mta-sts.{target.dns}"
        answer = await self._query(name, "TXT")
        if isinstance(answer, str):
            return fail("mta-sts", answer)
        texts = [t for t in answer.texts() if t.startswith("v=STSv1")]
        policy_id = parse_txt(answer.texts())
        today = self.now.date()
        if not texts:
            record = txt_record(name, f"v=STSv1; id={next_id(None, today)}")
            return warn("mta-sts", f"no MTA-STS record at {name}: senders may deliver to "
                        f"{target.dns} without TLS", [record],
                        self._policy_notes(target, (self.hostname,)))
        record = txt_record(name, f"v=STSv1; id={next_id(policy_id, today)}")
        if policy_id is None:
            return fail("mta-sts", f"invalid MTA-STS record at {name}: \"{texts[0][:80]}\""
                        + (f" ({len(texts)} records; there must be one)"
                           if len(texts) > 1 else ""), [record])
        url = f"https://mta-sts.{target.dns}{WELL_KNOWN}"
        try:
            policy = parse_policy(await self._fetcher()(target.dns))
        except FetchError as exc:
            return fail("mta-sts", f"{name} announces a policy (id {policy_id}) that cannot "
                        f"be fetched: {exc}",
                        notes=self._policy_notes(target, (self.hostname,)))
        except PolicyError as exc:
            return fail("mta-sts", f"the policy at {url} is invalid: {exc}",
                        [record], self._policy_notes(target, (self.hostname,)))
        if policy.mode == "none":
            return warn("mta-sts", f"the policy (id {policy_id}) has mode none: withdrawn",
                        [record], self._policy_notes(target, policy.mx or (self.hostname,)))
        if not policy.allows(self.hostname):
            return fail("mta-sts", f"the policy (id {policy_id}, mode {policy.mode}) lists "
                        f"mx {', '.join(policy.mx)}, not {self.hostname}: senders that "
                        "apply it will not deliver here", [record],
                        self._policy_notes(target, (*policy.mx, self.hostname)))
        return ok("mta-sts", f"id {policy_id}, mode {policy.mode}, mx "
                  f"{', '.join(policy.mx)}, max_age {policy.max_age}")

    async def tls_rpt(self, target: Target) -> Finding:
        name = f"_smtp._tls.{target.dns}"
        record = txt_record(name, f"v=TLSRPTv1; rua={self._rua(target)}")
        answer = await self._query(name, "TXT")
        if isinstance(answer, str):
            return fail("tls-rpt", answer)
        texts = [t for t in answer.texts() if t.startswith("v=TLSRPTv1")]
        if not texts:
            return warn("tls-rpt", f"no TLS-RPT record at {name}: nobody tells you when "
                        "senders fail to reach you over TLS", [record])
        if len(texts) > 1:
            return fail("tls-rpt", f"{name} has {len(texts)} TLS-RPT records; senders use "
                        "none unless there is exactly one (RFC 8460 3)", [record])
        problem = tlsrpt_problem(texts[0])
        if problem:
            return fail("tls-rpt", f"invalid TLS-RPT record at {name}: {problem}", [record])
        return ok("tls-rpt", f"{name}: \"{texts[0]}\"")
