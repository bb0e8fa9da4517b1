"""The catalogue of pand's packaged configs, read as text: the config groups and their options, the ``defaults`` of
a primary config, and its settings with their comments.

No torch, Lightning, Hydra or OmegaConf is imported here, so that ``pand COMMAND --help`` and the refusal of a misspelt
group option are instant. A group is a sub-folder of ``configs``; its options are the ``.yaml`` files under it
(``experiment/pand/cub_resnet18.yaml`` being option ``pand/cub_resnet18``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

def config_groups(configs_dir: Path = CONFIGS_DIR) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` for every config group folder (options sorted, sub-folders as ``sub/name``)."""
    groups: dict[str, list[str]] = {}
    if not configs_dir.is_dir():
        return groups
    for folder in sorted(p for p in configs_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        options = sorted(f.relative_to(folder).with_suffix("").as_posix() for f in folder.rglob("*.yaml")
                         if not any(part.startswith(("_", ".")) for part in f.relative_to(folder).parts))
        if options:
            groups[folder.name] = options
    return groups


def group_defaults(config_name: str = "train", configs_dir: Path = CONFIGS_DIR) -> dict[str, str | None]:
    """The ``defaults:`` list of a primary config as ``{group: option}`` (in its order; ``null`` as None)."""
    defaults: dict[str, str | None] = {}
    inside = False
    for line in _read_lines(configs_dir / f"{config_name}.yaml"):
        if re.match(r"^defaults:\s*(#.*)?$", line):
            inside = True
            continue
        if inside:
            if line.strip().startswith("#") or not line.strip():
                continue
            m = re.match(r"^\s+-\s+(?:override\s+)?/?([\w/@.-]+):\s*([^\s#]+)", line)
            if m:
                value = m.group(2)
                defaults[m.group(1)] = None if value in ("null", "~") else value
            elif not line.startswith((" ", "-")):
                break
    return defaults


@dataclass
class Setting:
    """One key of a primary config as written in its YAML file: value text, comment, and the keys of a section."""

    key: str
    value: str
    comment: str = ""
    children: list[Setting] = field(default_factory=list)


def config_settings(config_name: str = "train", configs_dir: Path = CONFIGS_DIR) -> list[Setting]:
    """The top-level keys of ``<config_name>.yaml`` (besides ``defaults``), each section with its direct keys."""
    settings: list[Setting] = []
    last: Setting | None = None  # the entry whose comment an aligned comment line continues
    last_col = -1  # the column of that entry's ``#``
    section_indent = None  # the indentation of the current section's keys
    for line in _read_lines(configs_dir / f"{config_name}.yaml"):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if stripped.startswith("#"):
            # A comment aligned under the previous entry's comment continues it; any other is a block comment.
            if last is not None and last.comment and indent > 0 and indent >= last_col - 2:
                last.comment = f"{last.comment} {stripped.lstrip('#').strip()}"
            else:
                last = None
            continue
        m = re.match(r"^([A-Za-z_][\w-]*):(.*)$", stripped)
        if not m:
            last = None
            continue
        value, comment = _split_comment(m.group(2))
        entry = Setting(m.group(1), value, comment)
        last, last_col = entry, (line.rfind("#") if comment else -1)
        if indent == 0:
            section_indent = None
            if entry.key == "defaults":
                last = None
                continue
            settings.append(entry)
        elif settings and settings[-1].key != "defaults" and section_indent in (None, indent):
            section_indent = indent
            settings[-1].children.append(entry)
        else:
            last = None
    return settings


def _split_comment(text: str) -> tuple[str, str]:
    """``" value   # comment"`` -> ``("value", "comment")`` (a ``#`` inside quotes or ``${...}`` is not a comment)."""
    quote = None
    depth = 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
