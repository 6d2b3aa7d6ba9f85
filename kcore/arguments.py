"""Errors whose fix names an argument, so that each front end names it its own way.

The Python API says ``pass arch='resnet18'``; the command line must say ``--arch-a resnet18`` for the same
error. A message is written once, with each argument it mentions marked by :func:`spell`; the exception
(:class:`ArgumentError`) shows the Python spelling, and a front end re-renders it with
:meth:`ArgumentError.respelled` and its own spellings (a mapping from the Python argument name to a format
string such as ``"--arch-a {value}"``)::

    raise ArgumentError(f"... Fix: pass {spell('arch', \"arch='resnet18'\", 'resnet18')}.")
    ...
    except ArgumentError as exc:
        raise exc.respelled({"arch": "--arch-a {value}"}) from exc
"""
from __future__ import annotations

import re
from collections.abc import Mapping

_MARK = "\x1f"  # the ASCII unit separator: never typed into a path, an architecture name or a number
_SPELLED = re.compile(f"{_MARK}([^{_MARK}]*){_MARK}([^{_MARK}]*){_MARK}([^{_MARK}]*){_MARK}")


def spell(name: str, python: str, value: object = "") -> str:
    """Mark one mention of an argument in an :class:`ArgumentError` message.

    Args:
        name: the Python argument, e.g. ``"arch"``.
        python: how the Python API spells the mention, e.g. ``"arch='resnet18'"`` or ``"strict=False"``.
        value: the value a front end's spelling may show (its ``{value}`` field), e.g. ``"resnet18"``.

    Returns:
        A marked fragment to put in the message text; :class:`ArgumentError` replaces it.
    """
    return f"{_MARK}{name}{_MARK}{python}{_MARK}{value}{_MARK}"


def _render(template: str, spellings: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        name, python, value = m.groups()
        return spellings[name].format(value=value) if name in spellings else python

    return _SPELLED.sub(one, template)


class ArgumentError(ValueError):
    """A ``ValueError`` whose message names arguments (marked with :func:`spell`) that a front end can re-spell.

    Attributes:
        template: the message with its marked mentions.
        arguments: the Python names of the arguments the message mentions, in order (e.g. ``("arch",)``).
        argument: the first of them (the one the fix is mainly about).
    """

    def __init__(self, template: str, spellings: Mapping[str, str] | None = None) -> None:
        """Build the error from a marked message; ``spellings`` (name → ``"--flag {value}"``) re-spell mentions.

        Args:
            template: the message, with mentions marked by :func:`spell`.
            spellings: a front end's spellings; names not in it keep their Python spelling.
        """
        self.template = template
        self.spellings = dict(spellings or {})
        self.arguments = tuple(dict.fromkeys(m.group(1) for m in _SPELLED.finditer(template)))
        self.argument = self.arguments[0] if self.arguments else None
        super().__init__(_render(template, self.spellings))

    def respelled(self, spellings: Mapping[str, str]) -> ArgumentError:
        """The same error with the arguments in ``spellings`` named as given (e.g. CLI flags).

        Args:
            spellings: Python argument name → format string with an optional ``{value}`` field, e.g.
                ``{"arch": "--arch-a {value}", "strict": "--non-strict-a"}``.

        Returns:
            A new error of the same class (its other attributes copied), whose message uses these spellings.
        """
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        ArgumentError.__init__(new, self.template, {**self.spellings, **spellings})
        return new
