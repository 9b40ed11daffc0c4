"""A library user does not pay for the server: the core imports none of the extras' packages, and a
command whose extra is missing says, in one line, which `pip install 'sinkstream[…]'` to run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

EXTRAS_ONLY = ["fastapi", "uvicorn", "starlette", "prometheus_client", "pydantic", "matplotlib", "xgrammar",
               "psycopg", "ray"]  # fmt: skip


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_the_core_imports_no_extra():
    run = _python("""
        import json, sys
        import sinkstream
        from sinkstream import ChatSession, Engine, SinkCache, load_model
        import sinkstream.cli, sinkstream.fused, sinkstream.quant, sinkstream.sampling, sinkstream.tools
        print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
    """)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = set(json.loads(run.stdout.splitlines()[-1]))
    assert not imported & set(EXTRAS_ONLY), imported & set(EXTRAS_ONLY)


BLOCK = """
    import importlib.abc, sys
    class Missing(importlib.abc.MetaPathFinder):  # as if these packages were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named '{{name}}'", name=name)
    sys.meta_path.insert(0, Missing())
    from sinkstream.cli import main
    sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(
    "blocked, argv, extra",
    [
        (["fastapi"], ["serve"], "server"),
        (["xgrammar"], ["serve"], "server"),
        (["xgrammar"], ["generate", "--prompt", "x", "--json-object"], "grammar"),
        (["psycopg"], ["serve", "--store", "postgresql://nobody@127.0.0.1:1/x"], "postgres"),
    ],
)
def test_a_missing_extra_is_one_line(blocked, argv, extra, tmp_path):
    run = _python(
        BLOCK.format(blocked=set(blocked), argv=[*argv, "--state-dir", str(tmp_path)] if argv[0] == "serve" else argv)
    )
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'sinkstream[{extra}]'" in lines[0], run.stderr


def test_plots_need_the_eval_extra():
    run = _python("""
        import importlib.abc, sys
        class Missing(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        sys.meta_path.insert(0, Missing())
        from sinkstream.extras import MissingExtra
        from sinkstream.plots import plot_losses
        try:
            plot_losses([], "x.png", "t")
        except MissingExtra as e:
            print(e)
    """)
    assert "pip install 'sinkstream[eval]'" in run.stdout, run.stderr[-2000:]
