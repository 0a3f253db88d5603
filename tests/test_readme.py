"""Every block of README.md and docs/*.md that a user copies runs as written.

The blocks are copied out of the Markdown files (fenced ```bash and ```python blocks), not
paraphrased, and run in order in a temporary folder holding what a new user has: a small
photo set (``tests/_photos.py``: skimage.data photographs, mirrored and cropped, with
``captions.tsv`` / ``captions_test.tsv``). Each file's blocks run in a folder of their own.
The few blocks that cannot run here are listed in ``EXCLUDED`` with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from _photos import make_photo_set
from _wait import HUNG

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```$", re.S | re.M)

# Whole files whose blocks cannot run here, with the reason (none today: every docs block runs
# or is listed below by itself).
EXCLUDED_FILES: dict[str, str] = {}
# (file, a line of the block) -> why the block does not run here.
EXCLUDED = {
    ("README.md", "eslmatch demo"): "installs eslmatch and runs the 10-minute demo (tests/test_demo.py covers it)",
    ("docs/checkpoints.md", "f30k_butd_region_bert/model_best.pth.tar"): (
        "needs the released Flickr30K checkpoint and bert-base-uncased (tests/test_official.py loads the shared one)"
    ),
    ("docs/distributed.md", "torchrun --nnodes=2"): "several GPUs and machines, MS-COCO features",
    ("docs/extract.md", "torchrun --nnodes=2"): "two machines with GPUs and a shared filesystem",
    ("docs/retrieval.md", "torchrun --standalone --nproc_per_node=4"): "four GPUs and a large features folder",
    ("docs/milvus.md", "pip install 'eslmatch[milvus]'"): "installs packages (the README's first command has them)",
    ("docs/training.md", "eslmatch train --config coco_bigru data_path=/data"): "needs Flickr30K and MS-COCO features",
    ("docs/training.md", "--init-from model_best.pth.tar"): "needs a released checkpoint",
}
# Blocks that run only with the slow tests (`pytest -m slow`): minutes on 2 CPU cores.
SLOW = {
    ("docs/demo_dataset.md", "write_demo_dataset('demo', DemoConfig())"): "renders 12,000 scenes, extracts 1,000",
    ("docs/export.md", "eslmatch export runs/mine/best --format onnx"): "ONNX export of ESL with MiniLM: ~30 s",
    ("docs/export.md", "OnnxEncoders.open"): "reads the export of the block before",
}
DOCS = sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in EXCLUDED_FILES)
# What a docs folder starts from: the README's folder after its blocks ran, less what is large.
COPIED_LEAVE_OUT = ("last", "training_state.pt")
# Docs files whose blocks need only the photo set (no trained model): they run in the fast tier, in
# a folder of their own. The others start from the README's folder (its trained model): slow tier.
FROM_PHOTO_SET = {"docs/extract.md": "extracts the photo set's features"}
# Blocks that run in the repository root (they name its files), each only where those files exist.
IN_REPO = {("README.md", "eslmatch score ../shared/fixtures/"): REPO.parent / "shared" / "fixtures"}


@dataclass
class Block:
    file: str
    line: int  # where the fence opens, 1-based
    lang: str
    code: str

    def matches(self, key: tuple[str, str]) -> bool:
        return key[0] == self.file and key[1] in self.code

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.lang})"


def blocks_of(file: str) -> list[Block]:
    text = (REPO / file).read_text(encoding="utf-8")
    return [Block(file, text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def user_env(home: Path) -> dict[str, str]:
    """This checkout's eslmatch on PATH and PYTHONPATH, offline, no GPU, a private cache."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", ESLMATCH_CACHE=str(home / "cache"), NO_COLOR="1")
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str], timeout: float = HUNG) -> str:
    """Run one block as written; its stdout (a failure shows the block and its output)."""
    cmd = (
        ["bash", "-e", "-o", "pipefail", "-c", block.code]
        if block.lang == "bash"
        else [sys.executable, "-c", block.code]
    )
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{block} failed (exit {proc.returncode}):\n{block.code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc.stdout


def stand_in_esl_clip(path: Path) -> None:
    """The released ESL-CLIP file in the branch's format (heuristic), with tiny random CLIP towers:
    what the README's link downloads, small (the README's convert line reads it)."""
    import torch

    from released_clip_forward import random_release

    torch.save(random_release("heuristic", seed=0), path)


def run_file(file: str, cwd: Path, env: dict[str, str], slow: bool = False) -> dict[int, str]:
    """Every block of ``file`` in order (``slow``: the SLOW ones too); stdout by fence line."""
    outputs = {}
    for block in blocks_of(file):
        if any(block.matches(k) for k in EXCLUDED) or (not slow and any(block.matches(k) for k in SLOW)):
            continue
        where = next((v for k, v in IN_REPO.items() if block.matches(k)), None)
        if where is not None:
            if where.exists():
                outputs[block.line] = run_block(block, REPO, env)
            continue
        outputs[block.line] = run_block(block, cwd, env)
    return outputs


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, dict[str, str], dict[int, str]]:
    """README.md's blocks, run in a folder with the photo set and a stand-in for the released ESL-CLIP file."""
    home = tmp_path_factory.mktemp("readme")
    work = home / "work"
    work.mkdir()
    make_photo_set(work)
    stand_in_esl_clip(work / "model_best_heuristic_coco_clip_based.pth")
    env = user_env(home)
    return work, env, run_file("README.md", work, env)


def runnable(file: str) -> bool:
    """Whether ``file`` has a block that runs here (not all listed in EXCLUDED / SLOW)."""
    return not all(any(b.matches(k) for k in (*EXCLUDED, *SLOW)) for b in blocks_of(file))


def docs_param(file: str):
    """``file`` as a test parameter: slow when its blocks start from the README's folder."""
    slow = runnable(file) and file not in FROM_PHOTO_SET
    return pytest.param(file, marks=pytest.mark.slow if slow else ())


@pytest.mark.slow
def test_search_your_own_images_runs_as_written_and_finds_the_photo(readme_run):
    work, _, outputs = readme_run
    own = next(b for b in blocks_of("README.md") if "eslmatch train --config own_photos" in b.code)
    out = outputs[own.line]
    assert '"a cat lying down"' in own.code  # the query below is the README's
    ranks = [line.split() for line in out.splitlines() if re.match(r"\s*\d+\s", line)]
    assert ranks and ranks[0][3] == "chelsea_test", out  # the one cat of photos_test/ comes first
    assert (work / "runs" / "mine" / "best" / "model.safetensors").is_file()
    assert (work / "models" / "esl-clip-coco" / "config.json").is_file()  # the ESL-CLIP block converted
    assert (work / "indexes" / "photos").is_dir()
    assert "held-out" in out and "best held-out rsum" in out


@pytest.mark.slow
def test_the_python_snippets_run_as_written(readme_run):
    _, _, outputs = readme_run
    blocks = [b for b in blocks_of("README.md") if b.lang == "python"]
    assert len(blocks) == 2 and all(b.line in outputs for b in blocks)
    esl_clip, esl = (outputs[b.line] for b in blocks)
    assert esl_clip.strip().startswith("photos/") and esl_clip.strip().endswith(".jpg")
    assert esl.strip().startswith("tensor([")  # the best image of each caption


@pytest.mark.parametrize("file", [docs_param(f) for f in DOCS])
def test_docs_blocks_run_as_written(file, request, tmp_path):
    """Each docs file's blocks, in a copy of the README's folder (its photos, features, model),
    or, for those of FROM_PHOTO_SET, in a folder holding the photo set alone."""
    if not runnable(file):
        pytest.skip(f"{file}: no block to run here (none, or all listed in EXCLUDED / SLOW)")
    work = tmp_path / "work"
    if file in FROM_PHOTO_SET:
        work.mkdir()
        make_photo_set(work)
        env = user_env(tmp_path)
    else:
        readme_work, env, _ = request.getfixturevalue("readme_run")
        shutil.copytree(readme_work, work, ignore=shutil.ignore_patterns(*COPIED_LEAVE_OUT))
        stand_in_demo_gallery(work)
    run_file(file, work, env)


def stand_in_demo_gallery(work: Path) -> None:
    """``demo_report/index``, which docs (serve.md) search as the gallery ``eslmatch demo`` leaves:
    the README's own ``indexes/mine`` stands in for it (the 10-minute demo does not run here)."""
    if not (work / "demo_report" / "index").exists():
        shutil.copytree(work / "indexes" / "mine", work / "demo_report" / "index")


@pytest.mark.slow
@pytest.mark.parametrize("file", sorted({k[0] for k in SLOW}))
def test_slow_docs_blocks_run_as_written(file, readme_run, tmp_path):
    work, env, _ = readme_run
    shutil.copytree(work, tmp_path / "work", ignore=shutil.ignore_patterns(*COPIED_LEAVE_OUT))
    assert run_file(file, tmp_path / "work", env, slow=True)


def test_every_exclusion_names_one_block_and_a_reason():
    for file, reason in FROM_PHOTO_SET.items():
        assert reason and runnable(file), file
    for key, reason in {**EXCLUDED, **SLOW, **{k: "in the repository" for k in IN_REPO}}.items():
        assert reason and sum(b.matches(key) for b in blocks_of(key[0])) == 1, key
    assert len(EXCLUDED) <= 8  # few: a block a user copies should run
