"""YAML loading that keeps line numbers, so validation errors can name the line.

PyYAML's safe loader builds plain dicts and lists and forgets where each value
was; this one builds `YamlMap` / `YamlList` (plain dict / list subclasses)
that remember the line of the node itself and of each key or item.

Plans and inventories are small: what is read is bounded (`MAX_YAML_BYTES`),
nesting is bounded before the recursive composer sees it (`MAX_YAML_DEPTH`),
and so is the document's size with every alias expanded (`MAX_YAML_NODES`), so a
few hundred bytes of aliases cannot make the harness walk billions of nodes.
NaN and infinity are refused wherever they appear.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessUsageError

MAX_YAML_BYTES = 1 << 20  # 1 MiB: a plan or inventory is a few kilobytes
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # nodes with every alias expanded


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


def read_text_bounded(path: Path, limit: int = MAX_YAML_BYTES) -> str:
    """The file as UTF-8 text, refusing files larger than `limit` (and /dev/zero)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise HarnessUsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise HarnessUsageError(
            f"{path}: larger than {limit // 1024} KiB; is this really a plan or inventory?"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HarnessUsageError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _check_depth(path: Path, text: str) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH from the token stream (no recursion)."""
    depth = 0
    opening = (
        yaml.FlowSequenceStartToken,
        yaml.FlowMappingStartToken,
        yaml.BlockSequenceStartToken,
        yaml.BlockMappingStartToken,
    )
    closing = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, opening):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = token.start_mark.line + 1
                raise HarnessUsageError(
                    f"{path}:{line}: nested more than {MAX_YAML_DEPTH} levels deep"
                )
        elif isinstance(token, closing):
            depth -= 1


def _expanded_size(path: Path, root: yaml.Node) -> int:
    """Nodes in the document with aliases expanded; refused beyond MAX_YAML_NODES."""
    sizes: dict[int, int] = {}
    order: list[yaml.Node] = []
    stack = [root]
    seen: set[int] = set()
    while stack:  # post-order without recursion; an alias is the same node object again
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        order.append(node)
        stack.extend(_children(node))
    for node in reversed(order):
        total = 1 + sum(sizes.get(id(child), 1) for child in _children(node))
        if total > MAX_YAML_NODES:
            raise HarnessUsageError(
                f"{path}:{node.start_mark.line + 1}: more than {MAX_YAML_NODES} values once "
                "aliases (*name) are expanded; write the document out without alias chains"
            )
        sizes[id(node)] = total
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _refuse_non_finite(path: Path, value: Any, line: int = 0, name: str = "") -> None:
    """NaN and infinity are no setting's value."""
    stack = [(value, line, name)]
    while stack:
        item, line, name = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            where = f"{path}:{line}" if line else f"{path}"
            raise HarnessUsageError(
                f"{where}: field {name!r}: expected a finite number, got {item}"
            )
        if isinstance(item, YamlMap):
            prefix = f"{name}." if name else ""
            stack.extend((v, item.line_of(k), f"{prefix}{k}") for k, v in item.items())
        elif isinstance(item, YamlList):
            stack.extend((v, item.line_of(i), f"{name}[{i}]") for i, v in enumerate(item))


def load_yaml_with_lines(path: Path) -> Any:
    """Parse `path`; bad input becomes a `HarnessUsageError` naming file and line."""
    path = Path(path)
    text = read_text_bounded(path)
    loader = None
    try:
        _check_depth(path, text)
        loader = _LineLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(path, node)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise HarnessUsageError(f"{path}{line}: invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise HarnessUsageError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    except RecursionError:  # bounded above; kept so no input can end in a traceback
        raise HarnessUsageError(f"{path}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    _refuse_non_finite(path, data)
    return data
