"""Command-line flags from a settings table (argparse)."""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from .table import Setting


class SwitchAction(argparse.Action):
    """A boolean flag and its negation: ``--lmtp`` stores True, ``--no-lmtp`` False."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        off_flag: str,
        default: Any = None,
        help: str | None = None,
    ) -> None:
        super().__init__([*option_strings, off_flag], dest, nargs=0, default=default, help=help)
        self.off_flag = off_flag

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, option_string != self.off_flag)

    def format_usage(self) -> str:
        # The usage line shows the first spelling and the negation: "-v | --no-verbose".
        return f"{self.option_strings[0]} | {self.off_flag}"


#: Actions added with ``hidden=True``: parsed, but left out of --help (HiddenFlagsFormatter).
_HIDDEN: weakref.WeakSet[argparse.Action] = weakref.WeakSet()


class HiddenFlagsFormatter(argparse.RawDescriptionHelpFormatter):
    """Leaves flags added with ``hidden=True`` out of the usage and the option list: they
    are accepted only to be refused with a helpful error."""

    def add_usage(
        self,
        usage: str | None,
        actions: Iterable[argparse.Action],
        groups: Iterable[argparse._MutuallyExclusiveGroup],
        prefix: str | None = None,
    ) -> None:
        actions = [action for action in actions if action not in _HIDDEN]
        groups = [
            group
            for group in groups
            if not any(action in _HIDDEN for action in group._group_actions)
        ]
        super().add_usage(usage, actions, groups, prefix)

    def add_argument(self, action: argparse.Action) -> None:
        if action not in _HIDDEN:
            super().add_argument(action)


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: the file that every flag added by :func:`add_flags` can also be
    set in (the flags win)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file; flags override it (default: none)",
    )


def add_flags(
    parser: argparse.ArgumentParser,
    settings: Iterable[Setting],
    titles: Mapping[str, str],
    *,
    one_group: str | None = None,
    default_texts: Mapping[str, str] | None = None,
    hidden: Collection[str] = (),
) -> None:
    """Add a flag for each setting to ``parser``, under its group's title (``titles``
    gives the titles and their order) or all under ``one_group``. Every flag's default is
    None, so that a flag that was not given can be told from one that was (and the file's
    value used); the help states the real default (``default_texts`` may reword it by
    key). Settings whose key is in ``hidden`` are parsed but not shown (see
    HiddenFlagsFormatter); settings of one ``exclusive`` group exclude each other."""
    settings = list(settings)
    unknown = {s.group for s in settings} - set(titles)
    if one_group is None and unknown:
        raise ValueError(f"no title for the groups {sorted(unknown)}")
    order = {name: index for index, name in enumerate(titles)}
    if one_group is None:
        settings.sort(key=lambda s: order[s.group])
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    counts: dict[str, int] = {}
    for item in settings:
        if item.exclusive is not None:
            counts[item.exclusive] = counts.get(item.exclusive, 0) + 1
    texts = default_texts or {}
    for item in settings:
        title = one_group if one_group is not None else titles[item.group]
        group = groups.get(title)
        if group is None:
            group = groups[title] = parser.add_argument_group(title)
        target: argparse._ActionsContainer = group
        if item.exclusive is not None and counts[item.exclusive] > 1:
            if item.exclusive not in exclusive:
                exclusive[item.exclusive] = group.add_mutually_exclusive_group()
            target = exclusive[item.exclusive]
        action = _add_flag(target, item, texts.get(item.key))
        if item.key in hidden:
            _HIDDEN.add(action)


def help_text(item: Setting, default_text: str | None = None) -> str:
    """A setting's help with its default: "... (default: 25M)" or "... (required)"."""
    if item.is_required:
        return f"{item.help} (required)"
    return f"{item.help} (default: {item.default_description(default_text)})"


def _add_flag(
    container: argparse._ActionsContainer, item: Setting, default_text: str | None
) -> argparse.Action:
    text = help_text(item, default_text)
    if item.switch:
        off_flag = item.off_option
        assert off_flag is not None
        return container.add_argument(
            *item.option_strings,
            dest=item.key,
            action=SwitchAction,
            off_flag=off_flag,
            default=None,
            help=text,
        )
    options: dict[str, Any] = {"dest": item.key, "default": None, "help": text}
    if item.repeatable:
        options["action"] = "append"
    if item.choices:
        options["choices"] = item.choices
    else:
        options["metavar"] = item.metavar
    return container.add_argument(*item.option_strings, **options)
