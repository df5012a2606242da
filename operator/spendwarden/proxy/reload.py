"""The proxy's configuration stage: read the mounted file, compile it, install it atomically, poll for changes, and switch budget enforcement between standalone and ledger mode."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os

from ..plainconfig import load_proxy_config
from . import spend
from .backend_load import Waker
from .config import (
    Compiled,
    ConfigError,
    compile_config,
    parse_config_text,
    secrets_fingerprint,
)
from .ledger_client import LedgerClient
from .state import ProxyState

log = logging.getLogger("spendwarden.proxy")


class ConfigReload(ProxyState):
    """Mixed into Proxy: the configuration it serves and how it changes."""

    def _read(self) -> bytes:
        if os.path.isdir(self.config_path):
            # A policy folder as kept in Git: every YAML file in it, as one manifest stream.
            names = sorted(n for n in os.listdir(self.config_path) if n.endswith((".yaml", ".yml")))
            parts = []
            for name in names:
                with open(os.path.join(self.config_path, name), "rb") as f:
                    parts.append(f.read())
            return b"\n---\n".join(parts)
        with open(self.config_path, "rb") as f:
            return f.read()

    def load(self, initial: bool = False) -> bool:
        """(Re)load the configuration if the file or the credentials changed. Returns True on change."""
        try:
            raw = self._read()
        except FileNotFoundError:
            if initial and not os.path.isdir(os.path.dirname(os.path.abspath(self.config_path))):
                raise ConfigError(f"{self.config_path}: no such file or directory") from None
            if initial:
                # A sidecar can start before the operator rendered its namespace's first config (the
                # ConfigMap volume is optional): serve nothing yet, pick the file up when it appears.
                log.warning("%s does not exist (yet): no routes until it does", self.config_path)
                self._install(compile_config(load_proxy_config({"namespace": self.namespace_arg or "default"}),
                                             self.namespace_arg, self.secret_reader), "missing", initial=True)
            elif self._fingerprint_file != "missing":
                log.error("%s disappeared; keeping the current configuration", self.config_path)
                self._fingerprint_file = "missing"
            return False
        except OSError as exc:
            if initial:
                raise ConfigError(f"cannot read {self.config_path}: {exc}") from exc
            log.error("cannot read %s: %s; keeping the current configuration", self.config_path, exc)
            return False
        digest = hashlib.sha256(raw).hexdigest()
        if self.compiled is not None and digest == self._fingerprint_file:
            fp = secrets_fingerprint(self.compiled.source, self.secret_reader)
            if fp == self._fingerprint:
                return False
        try:
            cfg, warnings = parse_config_text(raw.decode("utf-8"), self.namespace_arg)
            if warnings and not initial:
                # A broken edit must not silently drop routes or budgets that are serving traffic.
                raise ConfigError("; ".join(warnings))
            for w in warnings:
                log.warning("%s", w)
            compiled = compile_config(cfg, self.namespace_arg, self.secret_reader)
            self._ledger_mode(compiled)
            self.book.sync(compiled.budgets)
        except (ConfigError, ValueError) as exc:
            self._fingerprint_file = digest  # do not retry the same broken file every second
            self.metrics.config_reloads.labels("error").inc()
            if initial:
                raise ConfigError(str(exc)) from exc
            log.error("invalid configuration in %s: %s; keeping the current configuration", self.config_path, exc)
            return False
        self._install(compiled, digest, initial)
        return True

    def _install(self, compiled: Compiled, digest: str, initial: bool) -> None:
        cfg = compiled.source
        self._fingerprint_file = digest
        self._fingerprint = secrets_fingerprint(cfg, self.secret_reader)
        for b in (b for r in compiled.routes.values() for b in r.backends.values()):
            if b.missing_credentials:
                log.warning("route %s backend %s: no API key found for secret %s", b.route, b.name,
                            b.missing_credentials)
        if self.compiled is not None:
            spend.carry_over(self.compiled.routes, compiled.routes)
        self.compiled = compiled
        self.loads.set_keys({b.load_key for r in compiled.routes.values() for b in r.backends.values()
                             if b.wake is not None})
        self.metrics.config_reloads.labels("initial" if initial else "ok").inc()
        log.info("configuration loaded: namespace %s, %d routes, %d budgets", compiled.namespace,
                 len(compiled.routes), len(compiled.budgets))

    def _ledger_mode(self, compiled: Compiled) -> None:
        """Leases from the operator when the config names a ledger; the whole budget locally when not.
        Must run before book.sync: that is where budgets get (or lose) their leases."""
        url = compiled.source.ledger.url
        old = self.ledger
        if old is not None and old.url == url:
            old.namespace = compiled.namespace
            return
        if old is not None:
            log.warning("ledger %s no longer configured%s", old.url, f"; now {url}" if url else
                        ": enforcing whole budgets locally")
            self.book.ledger = False
            self.ledger = None
            if self.waker is not None:
                self._tasks.append(asyncio.ensure_future(self.waker.close()))
                self.waker = None
            self._tasks.append(asyncio.ensure_future(old.close(final=True)))
        if url:
            if self.book.state_file:
                log.info("ledger mode: the state file %s is not used (usage is kept by the ledger)",
                         self.book.state_file)
            log.info("ledger mode: budgets are enforced against leases from %s", url)
            self.ledger = LedgerClient(self.book, url, compiled.namespace, self.metrics)
            self.ledger.backends = self.loads
            if self.waker is not None:
                self._tasks.append(asyncio.ensure_future(self.waker.close()))
            self.waker = Waker(url)
            if self._started:
                self.ledger.start()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.load()
                self.book.roll()
                self.book.save()
                self._budget_gauges()
                try:
                    self._out.flush()
                except (OSError, ValueError):
                    pass
            except Exception:  # never let the poller die
                log.exception("periodic task failed")

    def _budget_gauges(self) -> None:
        if self.compiled is None:
            return
        ns = self.compiled.namespace
        m = self.metrics
        if self.ledger is not None:
            # This proxy's numbers against its lease; the budget-wide ones are the operator's.
            self.ledger.gauges(ns)
        for name, st in self.book.states.items():
            used = st.allowance.used
            m.budget_used_tokens.labels(ns, name, "input").set(used.input_tokens)
            m.budget_used_tokens.labels(ns, name, "output").set(used.output_tokens)
            currency = st.budget.spec.limits.cost.currency if st.budget.spec.limits.cost else "USD"
            m.budget_used_cost.labels(ns, name, currency).set(float(used.cost))
            m.budget_reserved.labels(ns, name).set(st.allowance.open_reservations)
            if st.lease is not None:
                continue
            rem = st.allowance.remaining()
            m.budget_remaining_ratio.labels(ns, name).set(rem.fraction)
            if rem.tokens is not None:
                m.budget_remaining_tokens.labels(ns, name).set(rem.tokens)
            if rem.cost is not None:
                currency = st.budget.spec.limits.cost.currency if st.budget.spec.limits.cost else "USD"
                m.budget_remaining_cost.labels(ns, name, currency).set(float(rem.cost))
