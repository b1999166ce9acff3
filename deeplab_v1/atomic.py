"""Atomic files for ``deeplab_v1``: a re-export of ``crf.atomic``, the distribution's one mechanism (temporary
file beside the target, flushed, renamed into place; mode ``0o666 & ~umask``). It is defined on the lowest
floor because ``crf`` never imports ``deeplab_v1``; every ``from .atomic import ...`` here keeps working."""

from crf.atomic import atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text, file_mode

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "file_mode"]
