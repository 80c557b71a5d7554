"""pt-serve's API keys: which prefixes each key may use, and which keys may manage prefixes.

The keys file is checked against a schema when the server starts; a wrong type or an unknown
field stops the start with one sentence, so a typo never changes who may do what.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

EXAMPLE = '{"keys": [{"key": "...", "prefixes": ["user42"]}, {"key": "...", "admin": true}]}'


class _Key(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(min_length=8, description="The secret a client sends as 'Authorization: Bearer <key>'.")
    prefixes: list[str] = Field(default_factory=list, description='Prefix names it may use; "*" for all and the base model.')
    admin: bool = Field(False, description="May use everything and upload, delete and reload prefixes.")


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[_Key]


class KeysError(ValueError):
    """A keys file that cannot be used; the message names the file and the problem."""


@dataclasses.dataclass
class Keys:
    """API keys from a JSON file: {"keys": [{"key": "...", "prefixes": ["user42", ...]},
    {"key": "...", "admin": true}]}. "*" in prefixes covers every prefix and the base model;
    an admin key may use everything and manage prefixes."""

    allowed: dict[str, set[str]]
    admins: set[str]

    @classmethod
    def load(cls, path: Path) -> "Keys":
        try:
            parsed = _KeysFile.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
        except OSError as e:
            raise KeysError(f"--keys {path}: cannot be read ({e.strerror or e}).") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise KeysError(f"--keys {path}: not JSON ({e}); expected {EXAMPLE}.") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise KeysError(f"--keys {path}: {where}: {first['msg']}; expected {EXAMPLE}.") from None
        seen = [k.key for k in parsed.keys]
        if len(set(seen)) != len(seen):
            raise KeysError(f"--keys {path}: a key is listed twice; give each key once.")
        return cls({k.key: set(k.prefixes) for k in parsed.keys}, {k.key for k in parsed.keys if k.admin})

    def may_use(self, key: str | None, model: str) -> bool:
        if key in self.admins:
            return True
        names = self.allowed.get(key or "")
        return names is not None and ("*" in names or model in names)
