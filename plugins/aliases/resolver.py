"""Alias resolution with chasquid's rules: files per domain, hooks, catch-all, recursion.

``resolve(address)`` returns the final recipients, each with the chain of addresses that led
to it. For a local address:

1. look the address up as given (drop characters removed, suffix kept), plus what the
   ``alias-resolve`` hook prints for it;
2. nothing? look up the clean form (suffix and drop characters removed);
3. still nothing: a user that exists is final; else the catch-all ``*`` if there is one;
   else the address is final as it is (delivery will fail for an unknown user);
4. each target: pipes and ``via`` forwards are final; a ``*`` user is replaced by the
   original user; an address is resolved again (remote addresses are final).

Resolution fails (raises :class:`AliasesError`, a temporary failure for the message) past
``max_depth`` levels, when a hook fails, or at a cycle: an address met again among its own
ancestors is final only if it is a real user (``pepe: pepe, jose`` keeps a copy for the user
pepe); a cycle of aliases with no user in it (``a: b`` + ``b: a``) fails, as chasquid's
recursion limit does, rather than delivering to a mailbox nobody owns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tampu.files import FileStamp, Stamp
from tampu.plugins.aliases.parser import (
    AliasesError,
    Kind,
    Target,
    parse_aliases,
    parse_rhs,
    remove_drop_characters,
    remove_drops_and_suffix,
)

log = logging.getLogger("tampu.plugins.aliases")

RESOLVE_HOOK = "hooks/alias-resolve"
EXISTS_HOOK = "hooks/alias-exists"


@dataclass(frozen=True)
class Final:
    """One final recipient and how it was reached."""

    kind: Kind
    value: str
    """The address, or the command line of a pipe."""
    path: tuple[str, ...]
    """The addresses that led here, from the one asked about to the one that had the alias."""
    via: tuple[str, ...] = ()

    @property
    def aliased(self) -> bool:
        return self.kind is not Kind.EMAIL or len(self.path) > 1 or self.value != self.path[0]


@dataclass
class _File:
    stamp: Stamp | None
    aliases: dict[str, list[Target]]


@dataclass
class AliasFiles:
    """The ``aliases`` file of each domain folder, re-read when its mtime or size changes."""

    folder: Callable[[str], Path]
    """The folder of a domain's files (tampu.users.Domains.folder)."""
    drop: str
    separators: str
    check_interval: float = 0.0
    _files: dict[str, _File] = field(default_factory=dict)
    _stamps: dict[str, FileStamp] = field(default_factory=dict)

    def path(self, domain: str) -> Path:
        return self.folder(domain) / "aliases"

    def problems(self, domains: Iterable[str]) -> list[str]:
        """Each aliases file that cannot be parsed, with file and line (``tampu check``)."""
        out = []
        for domain in sorted(domains):
            path = self.path(domain)
            if not path.exists():
                continue
            try:
                parse_aliases(path.read_text(encoding="utf-8"), domain, drop=self.drop,
                              separators=self.separators)
            except (OSError, UnicodeDecodeError, AliasesError) as exc:
                out.append(f"{path}: {exc}")
        return out

    def get(self, domain: str, *, force: bool = False) -> dict[str, list[Target]]:
        """The parsed aliases of ``domain`` (blocking: stats and maybe reads the file)."""
        path = self.path(domain)
        watch = self._stamps.get(domain)
        if watch is None:
            watch = self._stamps[domain] = FileStamp(path, self.check_interval)
        if force:
            watch.refresh()
        stamp = watch.stamp()
        cached = self._files.get(domain)
        if cached is not None and cached.stamp == stamp and not force:
            return cached.aliases
        if stamp is None:
            self._files[domain] = _File(None, {})
            return {}
        try:
            text = path.read_text(encoding="utf-8")
            aliases = parse_aliases(text, domain, drop=self.drop, separators=self.separators)
        except (OSError, UnicodeDecodeError, AliasesError) as exc:
            log.error("%s: %s; keeping the previous aliases of %s", path, exc, domain)
            previous = cached.aliases if cached is not None else {}
            self._files[domain] = _File(stamp, previous)
            return previous
        log.info("%s: %d alias(es) loaded", path, len(aliases))
        self._files[domain] = _File(stamp, aliases)
        return aliases

    def cached(self, domain: str) -> dict[str, list[Target]] | None:
        """The aliases of ``domain`` if they are loaded and the file has not changed since
        (no I/O beyond a stat every ``check_interval``): the event loop's fast path."""
        watch, cached = self._stamps.get(domain), self._files.get(domain)
        if watch is None or cached is None or watch.stamp() != cached.stamp:
            return None
        return cached.aliases

    def reload(self) -> None:
        for domain in list(self._files):
            self.get(domain, force=True)


class HookPrograms:
    """The ``alias-resolve`` and ``alias-exists`` programs of the configuration directory."""

    def __init__(self, config_dir: Path, timeout: float = 5.0,
                 check_interval: float = 0.0) -> None:
        self.config_dir = config_dir
        self.timeout = timeout
        self.check_interval = check_interval
        self._stamps: dict[str, FileStamp] = {}

    def _program(self, name: str) -> Path | None:
        watch = self._stamps.get(name)
        if watch is None:
            watch = self._stamps[name] = FileStamp(self.config_dir / name, self.check_interval)
        return watch.path if watch.exists() else None

    async def _run(self, program: Path, address: str) -> tuple[int | None, bytes, bytes]:
        """Run ``program address``; (exit code or None on timeout, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            str(program), address, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=self.config_dir, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            return None, b"", b""
        finally:
            if proc.returncode is None:
                kill_group(proc)
                await proc.wait()
        return proc.returncode, out, err

    async def resolve(self, address: str) -> list[Target]:
        """Targets printed by ``hooks/alias-resolve ADDRESS``; raises AliasesError on failure."""
        program = self._program(RESOLVE_HOOK)
        if program is None:
            return []
        try:
            code, out, err = await self._run(program, address)
        except OSError as exc:
            raise AliasesError(f"{RESOLVE_HOOK} could not run: {exc.strerror}") from None
        if code is None:
            raise AliasesError(f"{RESOLVE_HOOK} {address} timed out after {self.timeout:g}s")
        if code != 0:
            detail = err.decode("utf-8", "replace").strip()[-200:]
            raise AliasesError(f"{RESOLVE_HOOK} {address} exited with {code}: {detail}")
        domain = address.rpartition("@")[2].lower()
        try:
            return parse_rhs(out.decode("utf-8"), domain)
        except (UnicodeDecodeError, AliasesError) as exc:
            raise AliasesError(f"{RESOLVE_HOOK} {address}: bad output: {exc}") from None

    async def exists(self, address: str) -> bool:
        """``hooks/alias-exists ADDRESS`` exited 0 (a failure or timeout means no)."""
        program = self._program(EXISTS_HOOK)
        if program is None:
            return False
        try:
            code, _, _ = await self._run(program, address)
        except OSError as exc:
            log.warning("%s could not run: %s", EXISTS_HOOK, exc.strerror)
            return False
        return code == 0


class Resolver:
    """Resolves and checks local addresses against aliases files and hook programs."""

    def __init__(self, files: AliasFiles, hooks: HookPrograms,
                 is_local_domain: Callable[[str], bool],
                 user_exists: Callable[[str, str], bool], max_depth: int = 10) -> None:
        self.files = files
        self.hooks = hooks
        self.is_local_domain = is_local_domain
        self.user_exists = user_exists
        self.max_depth = max_depth

    def _clean(self, address: str) -> str:
        return remove_drops_and_suffix(address, self.files.drop, self.files.separators)

    async def _file_lookup(self, key: str) -> list[Target]:
        domain = key.rpartition("@")[2]
        aliases = self.files.cached(domain)
        if aliases is None:  # first use or changed: read (and parse) it off the loop
            aliases = await asyncio.to_thread(self.files.get, domain)
        return list(aliases.get(key, ()))

    async def lookup(self, address: str) -> list[Target]:
        """File aliases of ``address`` (drop characters removed) plus the resolve hook's."""
        key = remove_drop_characters(address, self.files.drop, self.files.separators)
        targets = await self._file_lookup(key)
        return targets + await self.hooks.resolve(address)

    async def exists(self, address: str) -> bool:
        """Whether mail to local ``address`` goes to an alias (or the catch-all)."""
        user, _, domain = address.rpartition("@")
        if not user or not self.is_local_domain(domain):
            return False
        for candidate in dict.fromkeys((address, self._clean(address))):
            if await self._safe_lookup(candidate):
                return True
        if await self.hooks.exists(address):
            return True
        return bool(await self._safe_lookup(f"*@{domain.lower()}"))

    async def _safe_lookup(self, address: str) -> list[Target]:
        try:
            return await self.lookup(address)
        except AliasesError as exc:
            log.warning("alias lookup of %s failed: %s", address, exc)
            return []

    async def resolve(self, address: str) -> list[Final]:
        """The final recipients of ``address``. Raises AliasesError."""
        return await self._resolve(address, (), 0)

    async def _resolve(self, address: str, path: tuple[str, ...], depth: int) -> list[Final]:
        if depth >= self.max_depth:
            raise AliasesError(f"recursion limit ({self.max_depth}) exceeded resolving "
                               f"{' -> '.join((*path, address))}")
        user, _, domain = address.rpartition("@")
        here = (*path, address)
        if not user or not self.is_local_domain(domain):
            return [Final(Kind.EMAIL, address, here)]
        clean = self._clean(address)
        if clean in {self._clean(p) for p in path}:
            if self.user_exists(clean.rpartition("@")[0], domain):
                return [Final(Kind.EMAIL, address, here)]  # pepe: pepe, jose
            raise AliasesError(f"alias loop without a user: {' -> '.join(here)}")
        targets = await self.lookup(address)
        if not targets and clean != address:
            targets = await self.lookup(clean)
        if not targets:
            clean_user = clean.rpartition("@")[0]
            if self.user_exists(clean_user, domain.lower()):  # cached; a stat per interval
                return [Final(Kind.EMAIL, address, here)]
            targets = await self.lookup(f"*@{domain.lower()}")
            if not targets:
                return [Final(Kind.EMAIL, address, here)]
        finals: list[Final] = []
        for target in targets:
            if target.kind is Kind.PIPE:
                finals.append(Final(Kind.PIPE, target.value, here))
                continue
            value = target.value
            t_user, _, t_domain = value.rpartition("@")
            if t_user == "*":
                value = f"{user}@{t_domain}"
            if target.kind is Kind.FORWARD:
                finals.append(Final(Kind.FORWARD, value, here, target.via))
                continue
            finals.extend(await self._resolve(value, here, depth + 1))
        return finals


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the program and whatever it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
