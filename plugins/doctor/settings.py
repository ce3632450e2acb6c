"""``[plugins.doctor]``: what ``tampu doctor`` recommends, and how it reaches the policy host.

The table is read whether the plugin is enabled or not: the plugin has nothing to do in the
server, only the command.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tampu import PluginSettings


class DoctorSettings(PluginSettings):
    cert_warn_days: int = Field(default=21, ge=0, le=365, description="Warn when the "
                                "certificate expires within this many days.")
    dmarc_policy: Literal["none", "quarantine", "reject"] = Field(
        default="quarantine", description="The p= of the DMARC record tampu doctor suggests "
        "(and the policy below which it warns).")
    report_address: str = Field(default="", description="Where the suggested DMARC and "
                                "TLS-RPT records send reports (rua=mailto:...); empty: "
                                "postmaster@DOMAIN.")
    mta_sts_mode: Literal["enforce", "testing"] = Field(
        default="enforce", description="The mode of the MTA-STS policy tampu doctor "
        "suggests; testing first is the cautious path (reports, no refusals).")
    mta_sts_max_age: int = Field(default=604800, ge=86400, le=31_557_600, description="The "
                                 "max_age (seconds) of the suggested MTA-STS policy; one week "
                                 "by default (RFC 8461 suggests weeks).")
    mta_sts_port: int = Field(default=443, ge=1, le=65535, description="Port of the MTA-STS "
                              "policy host (443; only tests change it).")
    tls_ca_file: str = Field(default="", description="Extra CA certificates (PEM, relative to "
                             "the configuration directory) trusted when fetching the MTA-STS "
                             "policy; the system's CAs are always trusted.")
    fetch_timeout: float = Field(default=30.0, gt=0, description="Seconds the MTA-STS policy "
                                 "fetch may take.")
