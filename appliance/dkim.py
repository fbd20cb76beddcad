"""DKIM key rotation without a moment of unverifiable mail.

Each domain has a current selector (the filters sign with it) and at most one other:
a next one (published, not signing yet) or a previous one (no longer signing, still
published so that mail signed with it verifies until it is retired). `./build.py dkim
rotate DOMAIN` takes one step each time it runs:

  1. publish: make the next key; ./build.py dns prints its record beside the current one.
  2. switch:  once that record resolves, the next key becomes current (the filters sign
              with it from their next boot) and the old one becomes previous, kept
              published for the grace period.
  3. retire:  after the grace period, the previous key is deleted and leaves the records.

The state lives in the site's secrets: dkim/DOMAIN/selector and a key file per selector.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import ApplianceError, ConfigError

if TYPE_CHECKING:
    from .credentials import Secrets

# How long a retired key stays published: receivers verify mail days after it was sent
# (queues, forwards, mailing lists); a week covers the common retry schedules.
GRACE = datetime.timedelta(days=7)


@dataclass(frozen=True)
class KeyState:
    current: str
    next: str | None
    previous: str | None
    retire_after: datetime.datetime | None

    @property
    def published(self) -> list[str]:
        """Every selector whose record must be in DNS now, the current first."""
        return [s for s in (self.current, self.next, self.previous) if s]


def state(secrets: "Secrets", domain: str) -> KeyState:
    """The selector file: the current selector on its first line, then `next SEL` or
    `previous SEL RETIRE-AFTER` (one file, so every step is one atomic write)."""
    secrets.dkim_selector(domain)  # made on first use
    lines = (secrets.read("dkim", domain, "selector") or "").split("\n")
    fields = {l.split()[0]: l.split()[1:] for l in lines[1:] if l.strip()}
    prev, nxt = fields.get("previous"), fields.get("next")
    for selector in (lines[0].strip(), *(nxt or [])[:1], *(prev or [])[:1]):
        # A selector is a DNS label and a file name here: nothing else is read as one.
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", selector):
            raise ConfigError(f"{secrets.root}/dkim/{domain}/selector: {selector!r} is not a selector",
                              hint="restore the file from your backup of the site's secrets")
    return KeyState(lines[0].strip(), nxt[0] if nxt else None, prev[0] if prev else None,
                    datetime.datetime.fromisoformat(prev[1]) if prev else None)


def _save(secrets: "Secrets", domain: str, current: str, extra: str = "") -> None:
    secrets.write("dkim", domain, "selector", text=f"{current}\n{extra}")


def _following(selector: str) -> str:
    m = re.fullmatch(r"(.*?)(\d+)", selector)
    return f"{m.group(1)}{int(m.group(2)) + 1}" if m else f"{selector}2"


def rotate(secrets: "Secrets", domain: str, now: datetime.datetime, grace: datetime.timedelta = GRACE,
           published: Callable[[str], bool] | None = None) -> str:
    """Take the next step for `domain`; returns what was done and what to do next.
    `published(selector)`: whether that selector's record resolves (checked before a switch)."""
    s = state(secrets, domain)
    if s.previous is not None:
        assert s.retire_after is not None
        if now < s.retire_after:
            raise ApplianceError(
                f"{domain}: the previous key {s.previous} stays published until {s.retire_after:%Y-%m-%d %H:%M} UTC "
                "(mail signed with it may still be verified)",
                hint=f"run ./build.py dkim rotate {domain} again after that to retire it")
        _save(secrets, domain, s.current)
        secrets.remove("dkim", domain, f"{s.previous}.key")
        return (f"{domain}: retired {s.previous}; remove its record {s.previous}._domainkey.{domain} from DNS "
                f"(./build.py dns no longer prints it). The next rotation can start now.")
    if s.next is None:
        nxt = _following(s.current)
        secrets.dkim_key(domain, nxt)
        _save(secrets, domain, s.current, f"next {nxt}\n")
        return (f"{domain}: made the next key {nxt}. Publish its record (./build.py dns prints it beside "
                f"{s.current}'s), wait until it resolves (./build.py dns --check RESOLVER), then run "
                f"./build.py dkim rotate {domain} again to switch the filters to it.")
    if published is not None and not published(s.next):
        raise ApplianceError(f"{domain}: {s.next}._domainkey.{domain} does not resolve to the next key yet",
                             hint="publish the record ./build.py dns prints, wait for its TTL, and run this again")
    retire = now + grace
    _save(secrets, domain, s.next, f"previous {s.current} {retire.isoformat()}\n")
    return (f"{domain}: the filters sign with {s.next} from their next boot (reboot them one at a time; "
            f"the others take the mail meanwhile). Keep {s.current}'s record published: "
            f"./build.py dkim rotate {domain} retires it after {retire:%Y-%m-%d %H:%M} UTC.")


def check_domain(domain: str, domains: list[str]) -> None:
    if domain not in domains:
        raise ConfigError(f"{domain!r} is not a domain of this site", hint=f"the site's domains: {', '.join(domains)}")
