"""The SPF result other plugins may read from the session's stash (security levels, hooks).

    from tampu.plugins.spf.result import SPF_RESULT
    result = session.stash.get(SPF_RESULT, None)
    if result is not None and result.result == "pass": ...
"""

from __future__ import annotations

from dataclasses import dataclass

from tampu import StashKey


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str
    """pass, fail, softfail, neutral, none, temperror or permerror (RFC 7208)."""
    explanation: str
    identity: str
    """The checked identity: the MAIL FROM address, or postmaster@HELO for the null sender."""
    domain: str

    @property
    def passed(self) -> bool:
        return self.result == "pass"


SPF_RESULT: StashKey[SpfResult] = StashKey()
