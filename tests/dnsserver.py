"""Moved to the test kit: ``tampu.testing.dns`` (kept for the imports of in-flight tests)."""

from tampu.testing.dns import DNSServer, Zone

__all__ = ["DNSServer", "Zone"]
