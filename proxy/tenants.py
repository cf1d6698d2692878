"""Who made a request: tenant name for metrics and budgets, credential hash for receipts."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

from proxy.budgets import BudgetConfig, parse_budgets
from proxy.errors import ConfigError

OTHER = "other"
ANONYMOUS = "anonymous"
_BEARER = re.compile(r"^\s*bearer\s+", re.IGNORECASE)
_KEYS = frozenset(("header", "allow", "aliases", "budgets", "budget_mode", "budget_cached_tenants", "budget_on_store_down", "regions"))
"""`regions` is read by proxy.routing.settings (tenant residency)."""
_CREDENTIAL_HEADERS = ("Authorization", "X-Api-Key", "Api-Key")


def credential_of(headers: Mapping[str, str]) -> str | None:
    for name in _CREDENTIAL_HEADERS:
        value = headers.get(name)
        if value:
            return _BEARER.sub("", value).strip() or None
    return None


def credential_hash(credential: str | None) -> str | None:
    # Only the hash is kept: receipts can be matched to a key without storing the key.
    return hashlib.sha256(credential.encode()).hexdigest() if credential else None


class Tenancy:
    """[tenants] header = "X-Tenant-Id"; allow = ["team-a", ...]; aliases = {"<sha256 prefix>" = "team-a"}."""

    def __init__(self, table: Mapping[str, Any]) -> None:
        for key in table:
            if key not in _KEYS:
                raise ConfigError(f"tenants.{key}", f"unknown key; expected one of: {', '.join(sorted(_KEYS))}")
        header = table.get("header")
        if header is not None and not isinstance(header, str):
            raise ConfigError("tenants.header", f"expected a header name, got {header!r}")
        self.header = header
        allow = table.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise ConfigError("tenants.allow", "expected a list of tenant names")
        aliases = table.get("aliases", {})
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise ConfigError("tenants.aliases", "expected a table of credential-hash prefix = tenant name")
        self.aliases: dict[str, str] = {str(k).lower(): v for k, v in aliases.items()}
        self.allow = frozenset(allow) | frozenset(self.aliases.values())
        self.budgets: BudgetConfig = parse_budgets(table)  # validated here so check-config sees it too

    def identify(self, headers: Mapping[str, str]) -> tuple[str, str | None]:
        """(tenant, credential hash)."""
        digest = credential_hash(credential_of(headers))
        if self.header:
            named = headers.get(self.header)
            if named:
                return named[:128], digest
        if digest is not None:
            for prefix, name in self.aliases.items():
                if digest.startswith(prefix):
                    return name, digest
            return f"key:{digest[:12]}", digest
        return ANONYMOUS, None

    def label(self, tenant: str) -> str:
        """Metric label value: only allow-listed names, so cardinality stays bounded."""
        if tenant in self.allow or tenant == ANONYMOUS:
            return tenant
        return OTHER
