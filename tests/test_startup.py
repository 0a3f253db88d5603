"""The command line answers bad input before anything heavy is imported (issue 18).

``import eslmatch`` and the argument, gallery-folder, query and filter checks of ``search``,
``serve`` and ``index`` import neither torch nor transformers nor FAISS; a call names its
command, so only that command's module is imported. Timing is a benchmark
(``benchmarks/startup.py``); these tests check what is imported, which decides it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _cli import eslmatch_argv, interrupted, start
from _wait import HUNG
from eslmatch.cli import build_parser, command_names
from eslmatch.utils import choices

HEAVY = ("torch", "transformers", "faiss", "pymilvus")

# runs one CLI call in a fresh interpreter; prints the exit code and which heavy modules were imported
PROBE = f"""
import json, sys
from eslmatch.cli import main
code = main(sys.argv[1:])
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def probe(*args: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=HUNG, check=False
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_import_eslmatch_is_light():
    code = f"import sys, eslmatch; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names_still_resolve():
    import eslmatch
    from eslmatch import retrieval, utils

    for name in eslmatch.__all__:
        assert getattr(eslmatch, name) is not None, name
    for module in (retrieval, utils):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = eslmatch.nothing  # type: ignore[attr-defined]


@pytest.fixture
def gallery_folder(tmp_path):
    """A folder that passes the light checks (it has a manifest); the heavy ones are never reached."""
    (tmp_path / "gal").mkdir()
    (tmp_path / "gal" / "manifest.json").write_text("{}")
    return str(tmp_path / "gal")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("search", "--index", "{missing}", "dog"), "no such index directory"),
        (("search", "--index", "{gal}", "-k", "0", "dog"), "-k must be a positive integer"),
        (("search", "--index", "{gal}", "   "), "the query sentence is empty"),
        (("search", "--index", "{gal}"), "give a query"),
        (("search", "--index", "{gal}", "--where", "folder === 'x'", "dog"), "filter"),
        (("search", "--index", "{gal}", "--rerank-k", "-1", "dog"), "--rerank-k must be 0 or more"),
        (("search", "--index", "{gal}", "--milvus", "http://127.0.0.1:1", "dog"), "--milvus needs --collection"),
        (("search", "--index", "{empty}", "dog"), "manifest.json: missing"),
        (("serve", "--index", "{missing}"), "no such index directory"),
        (("serve", "--index", "{gal}", "--backlog", "0"), "--backlog must be >= 1"),  # was: after torch, FastAPI
        (("serve", "--index", "{gal}", "--max-k", "0"), "max_k must be >= 1"),
        (("index", "info", "--index", "{missing}"), "no such index directory"),
        (("index", "delete", "--index", "{missing}", "--ids", "a"), "no such index directory"),
    ],
)
def test_bad_input_is_refused_before_heavy_imports(args, message, gallery_folder, tmp_path):
    (tmp_path / "empty").mkdir()
    names = {"missing": str(tmp_path / "nope"), "gal": gallery_folder, "empty": str(tmp_path / "empty")}
    result, err = probe(*(a.format(**names) for a in args))
    assert result["code"] == 1
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert result["heavy"] == [], f"imported {result['heavy']} before refusing {args}"


@pytest.mark.parametrize("args", [["--help"], ["eval", "--help"], ["index", "--help"], ["index", "sync", "--help"]])
def test_help_imports_nothing_heavy(args):
    """Issue 31: ``eslmatch --help`` imported torch (through ``eval``'s module): 3.8 s."""
    code = (
        "import sys, contextlib, io\nfrom eslmatch.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    main({args!r})\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_one_command_imports_only_its_module():
    code = (
        "import sys; from eslmatch.cli import build_parser; build_parser('search'); "
        "print(sorted(m for m in sys.modules if m.startswith('eslmatch.commands.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["eslmatch.commands._gallery", "eslmatch.commands.search"]  # the shared plumbing, not index


@pytest.mark.parametrize("name", command_names())
def test_each_module_registers_the_command_named_after_it(name):
    parser = build_parser(name)
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == [name]  # type: ignore[union-attr]


def test_the_light_names_equal_the_modules_that_act_on_them():
    from eslmatch.commands import eval as eval_command
    from eslmatch.evaluate import PROTOCOLS
    from eslmatch.retrieval.encode import encoding_for
    from eslmatch.utils.precision import resolve_precision

    assert choices.check_precision is resolve_precision.__globals__["check_precision"]
    assert choices.COMPOSITIONAL_PROTOCOLS == eval_command.COMPOSITIONAL
    assert choices.RECALL_PROTOCOLS == tuple(PROTOCOLS)
    assert choices.check_runtime is encoding_for.__globals__["check_runtime"]  # the one check the encoder runs


def test_ctrl_c_while_torch_is_imported_is_one_line(tmp_path):
    """Ctrl-C early in ``eslmatch eval``, while its modules (torch) are imported: they are
    imported inside ``main`` now, so the interrupt is one line and exit 130 (it was a traceback
    when ``import eslmatch`` itself imported torch). The signal is sent when the process says
    torch's import has begun (no guess at how long imports take on this CPU)."""
    import numpy as np

    np.save(tmp_path / "scores.npy", np.zeros((5, 25), dtype=np.float32))
    proc = start(
        eslmatch_argv("eval", "--scores", str(tmp_path / "scores.npy"), "--protocol", "f30k", announce_torch=True)
    )

    def importing_torch() -> None:
        line = proc.stdout.readline()
        assert line == b"importing torch\n", (line, proc.stderr.read() if not line else b"")

    code, err = interrupted(proc, importing_torch)
    assert code == 130, err
    assert err.strip() == "eslmatch: interrupted"
