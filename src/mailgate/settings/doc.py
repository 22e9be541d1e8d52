"""The settings reference (Markdown) from settings tables."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .table import Setting


def _cell(text: str) -> str:
    # GitHub's tables take an escaped pipe as part of the cell, in code spans too.
    return text.replace("|", "\\|")


def value_syntax(item: Setting) -> str:
    """What a setting's value looks like, in the file and after its flag."""
    if item.switch:
        return "true / false"
    if item.choices:
        text = " \\| ".join(f"`{choice}`" for choice in item.choices)
    else:
        text = f"`{_cell(item.metavar)}`" if item.metavar else "value"
    if item.repeatable:
        text += ", repeatable (a list in the file)"
    return text


def flags_cell(item: Setting) -> str:
    flags = [*item.option_strings]
    if item.off_option is not None:
        flags.append(item.off_option)
    return ", ".join(f"`{flag}`" for flag in flags)


def reference_table(
    settings: Iterable[Setting],
    titles: Mapping[str, str],
    *,
    table: str,
    flags: bool = True,
    default_texts: Mapping[str, str] | None = None,
    heading: str = "###",
) -> str:
    """One Markdown table per group (in the order of ``titles``) of the settings of the
    file's ``[table]``: key, flag, value, default and meaning."""
    texts = default_texts or {}
    by_group: dict[str, list[Setting]] = {name: [] for name in titles}
    for item in settings:
        by_group[item.group].append(item)
    parts: list[str] = []
    for name, items in by_group.items():
        if not items:
            continue
        parts.append(f"{heading} {titles[name]}\n")
        header = f"| `[{table}]` key | flag | value | default | meaning |"
        rule = "| --- | --- | --- | --- | --- |"
        if not flags:
            header = f"| `[{table}]` key | value | default | meaning |"
            rule = "| --- | --- | --- | --- |"
        lines = [header, rule]
        for item in items:
            default = item.default_description(texts.get(item.key))
            cells = [f"`{item.key}`"]
            if flags:
                cells.append(flags_cell(item))
            cells += [value_syntax(item), _cell(default), _cell(item.help)]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
