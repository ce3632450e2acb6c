"""OpenDKIM's verifier (Debian's libopendkim, which opendkim-tools use) through ctypes, offline.

``opendkim-testmsg`` itself cannot be used: Debian bookworm's build answers every input, even
a minimal valid message, with ``dkim_chunk(): Syntax error``. The library it wraps works: keys
come from a file (``DKIM_QUERY_FILE``, OpenDKIM's test method: one ``name record`` per line)
instead of DNS, so nothing leaves the machine.

    results = verify(message, {"sel._domainkey.example.com": "v=DKIM1; k=rsa; p=..."}, tmp)
    # {("example.com", "sel"): (True, 0)}   passed, DKIM_SIGERROR code
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import pytest

# dkim.h (OpenDKIM 2.10/2.11)
DKIM_OP_SETOPT = 1
DKIM_OPTS_QUERYMETHOD = 6
DKIM_OPTS_QUERYINFO = 7
DKIM_QUERY_FILE = 1
DKIM_SIGFLAG_PASSED = 0x04
DKIM_SIGBH_MATCH = 0
DKIM_STAT_OK, DKIM_STAT_BADSIG, DKIM_STAT_NOSIG, DKIM_STAT_NOKEY = 0, 1, 2, 3

_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """libopendkim, its prototypes declared; skips the test when it is not installed."""
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("opendkim") or "libopendkim.so.11"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        msg = "libopendkim is not installed (apt-get install opendkim-tools)"
        if os.environ.get("TAMPU_REQUIRE_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    lib.dkim_init.restype = vp
    lib.dkim_init.argtypes = [vp, vp]
    lib.dkim_close.argtypes = [vp]
    lib.dkim_options.argtypes = [vp, ip, ip, vp, ctypes.c_size_t]
    lib.dkim_verify.restype = vp
    lib.dkim_verify.argtypes = [vp, cp, vp, ctypes.POINTER(ip)]
    lib.dkim_chunk.argtypes = [vp, cp, ctypes.c_size_t]
    lib.dkim_eom.argtypes = [vp, vp]
    lib.dkim_free.argtypes = [vp]
    lib.dkim_getsiglist.argtypes = [vp, ctypes.POINTER(ctypes.POINTER(vp)), ctypes.POINTER(ip)]
    lib.dkim_sig_getflags.restype = ctypes.c_uint
    lib.dkim_sig_getflags.argtypes = [vp]
    lib.dkim_sig_getbh.argtypes = [vp]
    lib.dkim_sig_geterror.argtypes = [vp]
    lib.dkim_sig_getdomain.restype = cp
    lib.dkim_sig_getdomain.argtypes = [vp]
    lib.dkim_sig_getselector.restype = cp
    lib.dkim_sig_getselector.argtypes = [vp]
    _lib = lib
    return lib


def verify(message: bytes, records: dict[str, str],
           tmp: Path) -> dict[tuple[str, str], tuple[bool, int]]:
    """Verify every signature of ``message`` with OpenDKIM; ``records`` are the key records
    by DNS name. Returns ``{(d, s): (passed, sigerror)}``; {} when it has no signature."""
    lib = library()
    keyfile = tmp / "opendkim-keys.txt"
    keyfile.write_text("".join(f"{name.rstrip('.')} {text}\n" for name, text in records.items()))
    handle = lib.dkim_init(None, None)
    assert handle, "dkim_init failed"
    try:
        method = ctypes.c_int(DKIM_QUERY_FILE)
        assert lib.dkim_options(handle, DKIM_OP_SETOPT, DKIM_OPTS_QUERYMETHOD,
                                ctypes.byref(method), ctypes.sizeof(method)) == DKIM_STAT_OK
        path = ctypes.create_string_buffer(str(keyfile).encode())
        assert lib.dkim_options(handle, DKIM_OP_SETOPT, DKIM_OPTS_QUERYINFO, path,
                                len(path.raw)) == DKIM_STAT_OK
        status = ctypes.c_int(0)
        dkim = lib.dkim_verify(handle, b"tampu-test", None, ctypes.byref(status))
        assert dkim, f"dkim_verify failed: {status.value}"
        try:
            assert lib.dkim_chunk(dkim, message, len(message)) == DKIM_STAT_OK
            assert lib.dkim_chunk(dkim, None, 0) == DKIM_STAT_OK
            eom = lib.dkim_eom(dkim, None)
            if eom == DKIM_STAT_NOSIG:
                return {}
            sigs = ctypes.POINTER(ctypes.c_void_p)()
            count = ctypes.c_int(0)
            assert lib.dkim_getsiglist(dkim, ctypes.byref(sigs), ctypes.byref(count)) == 0
            out: dict[tuple[str, str], tuple[bool, int]] = {}
            for i in range(count.value):
                sig = sigs[i]
                passed = bool(lib.dkim_sig_getflags(sig) & DKIM_SIGFLAG_PASSED) and \
                    lib.dkim_sig_getbh(sig) == DKIM_SIGBH_MATCH
                key = (lib.dkim_sig_getdomain(sig).decode(), lib.dkim_sig_getselector(sig).decode())
                out[key] = (passed, lib.dkim_sig_geterror(sig))
            return out
        finally:
            lib.dkim_free(dkim)
    finally:
        lib.dkim_close(handle)
