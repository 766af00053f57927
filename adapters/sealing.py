"""Sealing what a call flow collects before it goes to Redis: account numbers and the
like are stored encrypted (Fernet: AES-CBC with an HMAC), never in clear."""

from __future__ import annotations

import logging

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from orchestrator.errors import ConfigError

log = logging.getLogger(__name__)

SETTING = "VARIABLES_KEYS"


class Sealer:
    """Seals and opens short strings with the configured keys (the first seals, any opens).

    ``shared``: the keys are configured (``VARIABLES_KEYS``), so every instance holds them
    and what one seals another opens; a key of this process's own is not."""

    def __init__(self, keys: list[str], *, shared: bool = True) -> None:
        self.shared = shared
        if not keys:
            raise ConfigError(SETTING, "no key given")
        try:
            self._fernet = MultiFernet([Fernet(key.strip().encode("ascii")) for key in keys])
        except (ValueError, UnicodeEncodeError) as e:
            raise ConfigError(
                SETTING,
                "each key must be 32 url-safe base64-encoded bytes, comma-separated "
                '(make one with: python -c "from cryptography.fernet import Fernet; '
                'print(Fernet.generate_key().decode())")',
            ) from e

    @classmethod
    def from_setting(cls, value: str | None) -> Sealer:
        """From ``VARIABLES_KEYS`` (comma-separated), or a key of this process's own."""
        if value is None:
            return cls([Fernet.generate_key().decode("ascii")], shared=False)
        return cls([key for key in value.split(",") if key.strip()])

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, sealed: str) -> str | None:
        """The text, or None when no key opens it (sealed with a key this instance lacks)."""
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            return None
