"""A notebook, for real: a Jupyter kernel (ipykernel, driven by jupyter_client) runs cells
that define a function and a helper it calls in ``__main__``, map it on a namespace host
(whose daemon runs from an empty folder) and through ``Executor``, show ``progress=True``
and catch the remote exception as itself. Each cell's output is checked."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import Daemon

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


class Kernel:
    """A running kernel; ``run(code)`` executes one cell and returns its status and its
    outputs: text on stdout/stderr, plain-text displays (updates included), errors."""

    def __init__(self, cwd: Path):
        self.manager, self.client = jupyter_client.manager.start_new_kernel(
            kernel_name="python3", cwd=str(cwd))

    def run(self, code: str) -> tuple[str, dict[str, Any]]:
        out: dict[str, Any] = {"stdout": "", "stderr": "", "display": [], "error": None}

        def hook(msg: dict[str, Any]) -> None:
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind in ("display_data", "update_display_data", "execute_result"):
                out["display"].append(content["data"].get("text/plain", ""))
            elif kind == "error":
                out["error"] = "\n".join(content["traceback"])

        reply = self.client.execute_interactive(textwrap.dedent(code), output_hook=hook,
                                                timeout=90)
        return reply["content"]["status"], out

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(tmp_path)
    try:
        yield k
    finally:
        k.close()


def test_a_notebooks_function_maps_on_a_host_and_through_executor(node: Daemon,
                                                                   kernel: Kernel) -> None:
    status, out = kernel.run(f"""
        import deathstar
        NODE = {node.address!r}

        def helper(x):
            return x * x

        def f(x):
            if x == 13:
                raise ValueError("thirteen")
            return helper(x) + 1
        """)
    assert status == "ok" and out["error"] is None, out

    status, out = kernel.run("""
        res = deathstar.map(f, range(10), cluster=[NODE])
        print(list(res))
        print(sorted({r.node for r in res.report}))
        """)
    assert status == "ok" and out["error"] is None, out
    assert out["stdout"].splitlines() == [str([x * x + 1 for x in range(10)]),
                                          str([node.address])]

    status, out = kernel.run("""
        with deathstar.Executor([NODE]) as ex:
            futures = [ex.submit(f, i) for i in range(5)]
            print([fut.result() for fut in futures])
        """)
    assert status == "ok" and out["error"] is None, out
    assert out["stdout"].strip() == str([x * x + 1 for x in range(5)])

    status, out = kernel.run("""
        res = deathstar.map(f, range(12), cluster=[NODE], progress=True)
        print(sum(res))
        """)
    assert status == "ok" and out["error"] is None and out["stderr"] == "", out
    assert out["stdout"].strip() == str(sum(x * x + 1 for x in range(12)))
    assert out["display"][-1] == "deathstar: 12/12 done"

    status, out = kernel.run("""
        try:
            deathstar.map(f, [12, 13], cluster=[NODE])
        except ValueError as exc:
            print("caught", exc, exc.index, exc.node == NODE)
        """)
    assert status == "ok" and out["error"] is None, out
    assert out["stdout"].strip() == "caught thirteen 1 True"
