"""YAML loading that keeps line numbers, so validation errors can name the line.

PyYAML's safe loader builds plain dicts and lists and forgets where each value
was; this one builds `YamlMap` / `YamlList` (plain dict / list subclasses)
that remember the line of the node itself and of each key or item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessUsageError


class YamlMap(dict):
    """A mapping from YAML with `line` (1-based) and `key_lines[key]`."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: Any) -> int:
        return self.key_lines.get(key, self.line)


class YamlList(list):
    """A sequence from YAML with `line` (1-based) and `item_lines[i]`."""

    line: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry line numbers; duplicate keys are errors."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> YamlMap:
    loader.flatten_mapping(node)
    result = YamlMap()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> YamlList:
    result = YamlList()
    result.line = node.start_mark.line + 1
    for item_node in node.value:
        result.append(loader.construct_object(item_node, deep=True))
        result.item_lines.append(item_node.start_mark.line + 1)
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml_with_lines(path: Path) -> Any:
    """Parse `path`; a syntax error becomes a `HarnessUsageError` naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise HarnessUsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise HarnessUsageError(f"{path}{line}: invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise HarnessUsageError(f"{path}: invalid YAML: {exc}") from exc
