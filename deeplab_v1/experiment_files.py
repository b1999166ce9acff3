"""Experiment files on top of base files: the ``base:`` key (the mmsegmentation ``_base_`` idea).

An experiment YAML may name one base file or a list of them and then state only what differs::

    base: _base/voc12-v1.yaml          # or a list: [_base/a.yaml, _base/b.yaml]
    name: voc12-deeplab
    model: {name: deeplab}

``read_experiment`` reads the file, reads its bases (recursively: a base may have a ``base:`` of its own),
merges and returns the raw mapping that ``config.load_config`` then checks as if it had been written out in
one file. The rules:

- ``base:`` is a path, or a list of paths, relative to the folder of the file that names it (absolute paths
  and ``~`` work too), or the name of a packaged experiment (``base: crf-demo``, ``base:
  voc12-deeplab-largefov``: ``packaged_experiments()``) when no file of that name is beside the file. It is
  a top-level key only, and it is removed from the result.
- A list of bases is merged left to right, later wins; the file itself is merged last, so it wins over all
  of its bases.
- Mappings are merged key by key, recursively (a variant's ``train: {batch_size: 20}`` changes that key of
  the base's ``train`` section and keeps the rest). A merged mapping keeps the base's key order; keys new
  in the variant come after them (this matters for ordered mappings such as ``train.lr_mult``, where the
  first matching pattern wins: a variant that changes a pattern keeps its place). Lists and scalars
  replace (a variant's ``test.scales: [1.0]`` replaces the base's whole list). There is no way to delete
  a key of a base; give it its default value instead.
- **Relative paths inside a base file** (``data.root: ../data/VOC2012``, ``model.init``, ``output_dir``,
  list files) **are NOT relative to the base file's folder**: they are taken, after the merge, from the
  folder of the experiment file the user names (``load_config`` resolves them against that file's folder).
  A base in ``experiments/_base/`` used by ``experiments/voc12-*.yaml`` therefore writes its paths as seen
  from ``experiments/``. Only the ``base:`` paths themselves are relative to the file that writes them.
  The exception is a **packaged** experiment file (one inside ``packaged_experiments()``, named by name or by
  path): its relative paths (``PATH_KEYS``) are taken from the packaged experiments' folder, where they were
  written for, so ``base: crf-demo`` in an empty folder runs on the shipped sample.
- A key that appears twice in one mapping of one file is an error (plain YAML keeps the last one silently,
  which hides a section pasted twice).

Every error is an ``ExperimentFileError`` whose message names the file: a missing base, a cycle of bases,
a file whose top level is not a mapping, a ``base:`` that is not a path or a list of paths, invalid YAML, a
duplicate key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Union

import yaml

from .errors import DeepLabError

__all__ = ["BASE_KEY", "PATH_KEYS", "ExperimentFileError", "deep_merge", "read_experiment", "read_yaml_mapping",
           "packaged_experiments"]

#: the top-level key that names the base file(s)
BASE_KEY = "base"

#: Keys whose value is a path (a list is a path when it ends in ``.txt``, else a split name).
PATH_KEYS: tuple[str, ...] = ("output_dir", "model.init", "data.root", "data.train_list", "data.test_list")


class ExperimentFileError(DeepLabError, ValueError):
    """An experiment file (or one of its bases) that cannot be read or merged; the message names the file."""


class _DuplicateKey(Exception):
    """Raised inside the YAML loader; ``read_yaml_mapping`` turns it into an ``ExperimentFileError``."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(key, line, first_line)
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key written twice in one mapping.

    Keys brought in by a YAML merge key (``<<: *anchor``) may be overridden, as YAML intends; only keys
    written out twice in the same mapping are refused.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports an unhashable key
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep=deep)



def read_yaml_mapping(path: Path) -> dict:
    """One YAML file, safe-loaded with duplicate keys refused; an empty file is an empty mapping.

    Raises:
        ExperimentFileError: the file is missing or unreadable, not valid YAML, has a duplicate key, or its
            top level is not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentFileError(f"{path}: experiment file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentFileError(f"{path}: cannot read the file ({exc})") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise ExperimentFileError(
            f"{path}: duplicate key {dup.key!r} at line {dup.line} (already given at line {dup.first_line} "
            f"of the same mapping); write each key once"
        ) from None
    except yaml.YAMLError as exc:
        raise ExperimentFileError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExperimentFileError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def packaged_experiments() -> Path:
    """The folder of the packaged experiments (``deeplab_v1.experiments``: the repository's
    ``experiments/``, package data of the wheel).

    Raises:
        ExperimentFileError: the package is not installed as files (a zipped install), or was installed
            before the experiments became package data (reinstall: ``pip install -e .``).
    """
    from importlib import resources

    try:
        root = resources.files("deeplab_v1.experiments")
    except ModuleNotFoundError:
        raise ExperimentFileError("the packaged experiments (deeplab_v1.experiments) are not installed; reinstall "
                                  "the package (pip install -e . in a checkout)") from None
    if not isinstance(root, Path):
        raise ExperimentFileError(f"the packaged experiments are not plain files ({root}); install deeplab-v1 unzipped")
    return root


def _packaged_root_of(path: Path) -> Path | None:
    """The packaged experiments' folder when ``path`` lies inside it, else None."""
    try:
        root = packaged_experiments().resolve()
    except ExperimentFileError:
        return None
    return root if path.resolve().is_relative_to(root) else None


def _absolute_paths(raw: dict, folder: Path) -> dict:
    """``raw`` with the relative ``PATH_KEYS`` values made absolute from ``folder`` (a packaged file's)."""
    raw = copy.deepcopy(raw)
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(name) if isinstance(node, dict) else None
        if not isinstance(value, str) or (key.endswith("_list") and not value.endswith(".txt")):
            continue
        if not Path(value).expanduser().is_absolute():
            node[name] = str((folder / value).resolve())
    return raw


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into ``base`` (neither is changed): mappings key by key, recursively; anything
    else in ``override`` (a list, a scalar, null) replaces the base's value. The base's key order is kept,
    new keys come after it."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _base_paths(raw: dict, path: Path) -> list[Path]:
    """The ``base:`` entry of ``path``'s mapping as absolute paths (relative to ``path``'s folder)."""
    if BASE_KEY not in raw:
        return []
    value = raw[BASE_KEY]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ExperimentFileError(
            f"{path}: key '{BASE_KEY}' must be a path or a list of paths (relative to this file's folder), "
            f"got {value!r}"
        )
    out = []
    for name in names:
        p = Path(name).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file() and "/" not in name and "\\" not in name:  # a packaged experiment's name
            try:
                packaged = packaged_experiments() / (name if name.endswith(".yaml") else f"{name}.yaml")
            except ExperimentFileError:
                packaged = p
            p = packaged if packaged.is_file() else p
        out.append(p)
    return out


def _read(path: Path, stack: list[Path], chain: list[Path]) -> dict:
    here = path.resolve()
    if here in stack:
        cycle = " -> ".join(str(p) for p in [*stack[stack.index(here):], here])
        raise ExperimentFileError(f"{path}: a cycle of bases: {cycle}")
    raw = read_yaml_mapping(path)
    bases = _base_paths(raw, path)
    merged: dict = {}
    for base in bases:
        if not base.is_file():
            raise ExperimentFileError(f"{path}: base file {base} not found (key '{BASE_KEY}', relative to {path.parent}, "
                                      f"nor a packaged experiment name)")
        merged = deep_merge(merged, _read(base, [*stack, here], chain))
    own = {k: v for k, v in raw.items() if k != BASE_KEY}
    packaged = _packaged_root_of(here)
    if packaged is not None and stack:  # a packaged base: its paths are the package's (the top file's are resolved later)
        own = _absolute_paths(own, packaged)
    chain.append(here)
    return deep_merge(merged, own)


def read_experiment(path: Union[str, Path]) -> tuple[dict, list[Path]]:
    """Read an experiment file and its bases, merged (see the module docstring for the rules).

    Args:
        path: the experiment YAML the user names.

    Returns:
        ``(raw, files)``: the merged raw mapping, without the ``base`` key (relative paths in it are to be
        resolved against ``path``'s folder), and the files read, as absolute paths in merge order: every
        file after its own bases, ``path`` last (a base reached twice is listed each time it is merged).

    Raises:
        ExperimentFileError: naming the file: missing file or base, a cycle of bases, a top level that is
            not a mapping, a ``base:`` that is not a path or a list of paths, invalid YAML, a duplicate key.
    """
    chain: list[Path] = []
    raw = _read(Path(path), [], chain)
    return raw, chain
