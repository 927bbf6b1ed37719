"""``NAME=VALUE`` arguments — ``--experts face=DIR``, ``--set stage1.max_steps=10``, pipeline ``key=value``
parameters, the pipeline's ``NAME=URI`` expert hand-offs — split in one place, with one kind of error message.
"""

from __future__ import annotations

from collections.abc import Iterable


def split_pair(
    item: str, what: str, form: str = "NAME=VALUE", *, need_value: bool = True, strip_value: bool = True
) -> tuple[str, str]:
    """``"face=/a"`` → ``("face", "/a")``, the name stripped; the value may hold further ``=``.

    Args:
        item: The argument as given.
        what: What it is, for the error (``"--experts"``, ``"pipeline parameter"``).
        form: How it should look, for the error.
        need_value: Refuse an empty value (``face=``).
        strip_value: Strip the value too (not for a pipeline parameter, whose string is taken as given).

    Raises:
        ValueError: No ``=``, no name, or (``need_value``) no value: ``"<what> must look like <form>, got ..."``.
    """
    name, sep, value = item.partition("=")
    name = name.strip()
    if strip_value:
        value = value.strip()
    if not sep or not name or (need_value and not value.strip()):
        raise ValueError(f"{what} must look like {form}, got {item!r}")
    return name, value


def parse_pairs(items: Iterable[str] | None, what: str, form: str = "NAME=VALUE") -> dict[str, str]:
    """``["face=/a", "hand=/b"]`` → ``{"face": "/a", "hand": "/b"}`` in the order given.

    Raises:
        ValueError: An item that is not ``NAME=VALUE`` (see :func:`split_pair`), or a name given twice.
    """
    out: dict[str, str] = {}
    for item in items or []:
        name, value = split_pair(item, what, form)
        if name in out:
            raise ValueError(f"{what}: {name!r} is given twice")
        out[name] = value
    return out
