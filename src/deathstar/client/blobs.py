"""The function blob of each call an executor takes (``Executor.submit``), and of each
map a Cluster runs without common arguments: the last one is kept while the same
function comes again, so the calls queued one behind the other share one blob (and so
one job), and a map of a function mapped before pickles nothing again.

A function that pickles by name is the same bytes every time. One that pickles by value
(defined in a script, a notebook or another function) carries what it refers to, which
may have changed since: its pickle is kept only while everything it refers to is the
very same immutable object as then (``value_state``), else it is pickled again."""

from __future__ import annotations

from types import BuiltinFunctionType, CodeType, FunctionType, ModuleType
from typing import Any, Callable

from deathstar import serialize

#: Scalars whose pickle depends on nothing but the object (compared by identity).
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_ABSENT = object()  # a global the function names that its module does not hold (a builtin)


def value_state(fn: Any) -> tuple[Any, ...] | None:
    """What ``fn``'s pickle by value is made of (its code, defaults, closure, the globals
    its code names, and theirs for the functions among them), as the objects themselves,
    when every one of them is immutable: the same objects again (``same_state``) pickle
    to the same bytes. None when some part can change in place (a list, a dict, an
    instance, a class of the script's own...): such a function is pickled every time."""
    parts: list[Any] = []
    return tuple(parts) if _function_parts(fn, parts, set()) else None


def same_state(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two ``value_state``s hold the very same objects."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _function_parts(fn: Any, parts: list[Any], seen: set[int]) -> bool:
    """Add what a function pickled by value is made of to ``parts``; False when some of
    it is not immutable."""
    if type(fn) is not FunctionType or fn.__dict__:
        return False
    seen.add(id(fn))
    try:
        closure = [cell.cell_contents for cell in fn.__closure__ or ()]
    except ValueError:  # a cell not filled yet
        return False
    kwdefaults, annotations = fn.__kwdefaults__ or {}, fn.__annotations__
    scope = fn.__globals__
    mine = [fn.__code__, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__,
            fn.__defaults__, len(kwdefaults), *kwdefaults, *kwdefaults.values(),
            len(annotations), *annotations, *annotations.values(), *closure,
            *(scope.get(name, _ABSENT) for name in dict.fromkeys(_code_names(fn.__code__)))]
    return all(_collect(part, parts, seen, 0) for part in mine)


def _code_names(code: CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names += _code_names(const)
    return names


def _collect(obj: Any, parts: list[Any], seen: set[int], depth: int) -> bool:
    """Add ``obj`` (and, for a function pickled by value, what it is made of) to
    ``parts``: True when it pickles the same for as long as these are the same objects."""
    parts.append(obj)
    if isinstance(obj, _SCALARS) or obj is _ABSENT or isinstance(obj, CodeType):
        return True
    if isinstance(obj, BuiltinFunctionType):  # a module's (len, math.sqrt), not a list's
        return obj.__self__ is None or isinstance(obj.__self__, ModuleType)
    if type(obj) in (tuple, frozenset):
        return depth < 8 and all(_collect(item, parts, seen, depth + 1) for item in obj)
    if isinstance(obj, ModuleType):
        return not serialize.registered_by_value(obj)
    if isinstance(obj, type):
        return serialize.by_reference(obj)
    if type(obj) is FunctionType:
        return serialize.by_reference(obj) or id(obj) in seen or \
            _function_parts(obj, parts, seen)
    return False


class FunctionBlobs:
    """The last function's blob (matched by content, for any function) and its pickle
    (matched by identity, for a function that pickles by name or whose ``value_state``
    is the same). Safe to call from several threads: each slot is one tuple, replaced
    whole."""

    def __init__(self, init: tuple[str, Any, tuple[Any, ...]] | None):
        self.init = init  # the executor's (token, initializer, initargs)
        self.last: tuple[tuple[Any, ...], str, list[Any]] | None = None
        # the last function's pickle when it pickles by name, or by value from an
        # immutable state: (fn, pickle, modules, its value_state or None)
        self.kept: tuple[Callable[..., Any], list[Any], set[str],
                         tuple[Any, ...] | None] | None = None

    def blob(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[str, list[Any]]:
        """The function's hash and blob (the last call's when it is the same function
        and modules); checks that the arguments pickle (large buffers are not copied for
        the check; the I/O thread pickles them again to send). Raises
        ``SerializationError`` naming what cannot be pickled or shipped."""
        modules: set[str] = set()
        try:
            serialize.dumps((args, kwargs), modules)
        except Exception as exc:
            raise serialize.SerializationError(
                f"an argument cannot be pickled: {type(exc).__name__}: {exc}") from exc
        # the local modules the arguments refer to (a joblib batch's function) go with it
        fn_hash, blob, _, _ = self.function(fn, modules)
        return fn_hash, blob

    def function(self, fn: Callable[..., Any], modules: set[str] | None = None
                 ) -> tuple[str, list[Any], list[Any], set[str]]:
        """The function's hash, its blob, its own pickle and the modules that travel
        with it (``modules`` among them), all kept from the last time when it is the
        same function and modules. The set returned is shared: copy it to change it.
        Raises ``SerializationError`` naming what cannot be pickled or shipped."""
        modules = modules or set()
        kept = self.kept
        by_name = serialize.pickles_by_name(fn)
        state = None if by_name else value_state(fn)
        if kept is not None and kept[0] is fn and modules <= kept[2] and (
                by_name or state is not None and kept[3] is not None
                and same_state(state, kept[3])):
            inner, names = kept[1], kept[2]  # it pickles the same as then
            try:
                bundle = serialize.bundle_for(names)  # (its modules' sources may change)
            except serialize.ShippingError as exc:
                raise serialize.SerializationError(str(exc)) from None
        else:
            inner, bundle, names = serialize.pickle_function(fn, {}, modules, self.init)
            self.kept = (fn, inner, names, state) if by_name or state is not None else None
        key = (bundle, *inner)
        last = self.last
        if last is not None and last[0] == key:
            return last[1], last[2], inner, names  # the same function and modules
        blob = serialize.function_blob(inner, bundle)
        fn_hash = serialize.content_hash(blob)
        self.last = (key, fn_hash, blob)
        return fn_hash, blob, inner, names
