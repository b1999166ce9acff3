"""Where each key of an experiment got its value: the YAML file, or a ``--set KEY=VALUE`` on the command
line, so that a message blames the right one (issue #21: a typo in ``--set crf_search.num_imgs=5`` was
reported as an error of the YAML file). Used by ``deeplab_v1.config``."""

from __future__ import annotations

import difflib

__all__ = ["KeySources", "at", "unknown_keys_message"]


class KeySources(str):
    """Where each key's value came from: the experiment file (this string: its path) or a ``--set``.

    Issue #21: a typo in ``--set crf_search.num_imgs=5`` was reported as an error of the YAML file. Every
    message of ``load_config`` names ``of(key)`` instead of the file.
    """

    sets: dict[str, str]

    def __new__(cls, path: str, overrides: list[str] = ()) -> "KeySources":
        obj = super().__new__(cls, path)
        obj.sets = {}
        for text in overrides:
            obj.sets[text.split("=", 1)[0].strip()] = text.strip()  # a later --set of a key wins
        return obj

    def of(self, key: str) -> str:
        """``--set KEY=VALUE`` when that override gave ``key`` (or a section above it); ``FILE with --set
        ...`` when an override changed a key under ``key``; else the file."""
        key = key.split("[", 1)[0]
        for k, text in reversed(self.sets.items()):
            if key == k or key.startswith(k + "."):
                return f"--set {text}"
        under = [text for k, text in self.sets.items() if k.startswith(key + ".")]
        return f"{str(self)} with --set {', --set '.join(under)}" if under else str(self)


def at(where: str, key: str) -> str:
    """``where.of(key)`` for ``KeySources``, else ``where`` itself (a plain label)."""
    return where.of(key) if isinstance(where, KeySources) else str(where)


def unknown_keys_message(where: str, dotted: list[str], known: list[str]) -> str:
    """The one message of unknown keys: where the first came from, the keys, the closest known name."""
    guess = difflib.get_close_matches(dotted[0].rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{guess[0]}'?)" if guess else ""
    return (f"{at(where, dotted[0])}: unknown key {', '.join(repr(d) for d in dotted)}{hint}; "
            f"known keys here: {', '.join(sorted(known))}")
