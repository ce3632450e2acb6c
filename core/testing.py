"""A pytest plugin for tampu plugin authors (registered as the ``tampu`` pytest11 plugin).

Imports of tampu's server are lazy so that merely having tampu installed costs pytest nothing.
See docs/testing-plugins.md.
"""

from __future__ import annotations
