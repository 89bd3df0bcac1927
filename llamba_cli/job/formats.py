"""Prompt formats: a Jinja chat template plus the extra stop strings it needs.

The packaged formats are `formats/*.toml` (`list_formats`, `load_format` by name); any
other `.toml` file is loaded by path; a model's own `tokenizer.chat_template` becomes
one through `format_from_gguf`.  Loading only reads and checks the file; templates are
compiled and rendered by `job.prompts.PromptBuilder`, in the bounded sandbox.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from llamba_cli.errors import ConfigError, TemplateError
from llamba_cli.job.userfiles import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# Installed, `formats/` sits inside the package; in a source checkout it is at the
# repository root.  The installed copy wins when both exist.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_FORMAT_DIRS = (_PACKAGE_DIR / "formats", _PACKAGE_DIR.parent / "formats")

_FORMAT_KEYS = ("description", "template", "stop")


@dataclass(frozen=True)
class PromptFormat:
    """A named chat template (Jinja source) and the extra stop strings it needs."""

    name: str
    template: str
    stop: tuple[str, ...]
    description: str = ""


def list_formats() -> list[str]:
    """Names of the packaged formats, sorted; empty if none are installed."""
    directory = _formats_dir()
    if directory is None:
        return []
    return sorted(path.stem for path in directory.glob("*.toml"))


def load_format(name_or_path: str) -> PromptFormat:
    """Load a packaged format by name, or a format file by path.

    Anything ending in `.toml` or containing a path separator is a path; the
    format's name is then the file's stem.  An unknown name raises `ConfigError`
    listing the available ones; a malformed file raises `TemplateError`.
    """
    if name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path:
        path = Path(name_or_path).expanduser()
        return _read_format_file(path, path.stem)
    available = list_formats()
    directory = _formats_dir()
    # Matching against the listing, never joining the name onto a path, keeps a
    # name like "../secret" from reaching outside the formats directory.
    if name_or_path not in available or directory is None:
        names = ", ".join(available) or "none installed"
        raise ConfigError(
            f"unknown prompt format {name_or_path!r} (available: {names}; "
            "or give the path of a .toml format file)"
        )
    return _read_format_file(directory / f"{name_or_path}.toml", name_or_path)


def format_from_gguf(template: str, name: str = "gguf") -> PromptFormat:
    """Wrap a model's own `tokenizer.chat_template` as a format.

    The text is untrusted: it is only ever rendered in the sandbox.  An empty
    template raises `TemplateError`.
    """
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"the model's chat template ({name}) is empty")
    return PromptFormat(
        name=name, template=template, stop=(), description="chat template stored in the model file"
    )


def _formats_dir() -> Path | None:
    for directory in _FORMAT_DIRS:
        if directory.is_dir():
            return directory
    return None


def _read_format_file(path: Path, name: str) -> PromptFormat:
    try:
        data = tomllib.loads(read_text(path, "prompt format file"))
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"prompt format file {path} is not valid TOML: {exc}") from None

    unknown = sorted(set(data) - set(_FORMAT_KEYS))
    if unknown:
        raise TemplateError(
            f"prompt format file {path} has unknown key(s) {', '.join(unknown)} "
            f"(expected {', '.join(_FORMAT_KEYS)})"
        )
    template = data.get("template")
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"prompt format file {path}: 'template' must be a non-empty string")
    stop = data.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise TemplateError(
            f"prompt format file {path}: 'stop' must be a list of non-empty strings"
        )
    description = data.get("description", "")
    if not isinstance(description, str):
        raise TemplateError(f"prompt format file {path}: 'description' must be a string")
    return PromptFormat(name=name, template=template, stop=tuple(stop), description=description)
