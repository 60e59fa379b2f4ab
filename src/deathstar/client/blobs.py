"""The function blob of each call an executor takes (``Executor.submit``), and of each
map a Cluster runs without common arguments: the last one is kept while the same
function comes again, so the calls queued one behind the other share one blob (and so
one job), and a map of a function mapped before pickles nothing again."""

from __future__ import annotations

from typing import Any, Callable

from deathstar import serialize


class FunctionBlobs:
    """The last function's blob (matched by content, for any function) and its pickle
    (matched by identity, for a function that pickles by name). Safe to call from
    several threads: each slot is one tuple, replaced whole."""

    def __init__(self, init: tuple[str, Any, tuple[Any, ...]] | None):
        self.init = init  # the executor's (token, initializer, initargs)
        self.last: tuple[tuple[Any, ...], str, list[Any]] | None = None
        # the last function's pickle when it pickles by name: (fn, pickle, modules)
        self.by_name: tuple[Callable[..., Any], list[Any], set[str]] | None = None

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
        kept = self.by_name
        if kept is not None and kept[0] is fn and modules <= kept[2] \
                and serialize.pickles_by_name(fn):
            inner, names = kept[1], kept[2]  # a function known by name pickles the same
            try:
                bundle = serialize.bundle_for(names)  # (its modules' sources may change)
            except serialize.ShippingError as exc:
                raise serialize.SerializationError(str(exc)) from None
        else:
            inner, bundle, names = serialize.pickle_function(fn, {}, modules, self.init)
            self.by_name = (fn, inner, names) if serialize.pickles_by_name(fn) else None
        key = (bundle, *inner)
        last = self.last
        if last is not None and last[0] == key:
            return last[1], last[2], inner, names  # the same function and modules
        blob = serialize.function_blob(inner, bundle)
        fn_hash = serialize.content_hash(blob)
        self.last = (key, fn_hash, blob)
        return fn_hash, blob, inner, names
