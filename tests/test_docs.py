"""The docs stay true to the code: every flag they mention exists, every code link points at what it names.

Code links look like [`ReverseCurriculum.report`](../rfcl.py#L383-L394) (a function or class, dotted for
nesting: the range is its whole definition) or [`# ---- stage switch`](../rfcl.py#L920) (a comment: the
line holding it). After editing a script, `python tests/test_docs.py --fix` rewrites the line numbers.
"""

import ast
import contextlib
import importlib.util
import io
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import tyro

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "rfcl.md", ROOT / "docs" / "rlpd.md", ROOT / "docs" / "results.md",
        ROOT / "docs" / "code.md", ROOT / "README.md"]
SCRIPTS = ("rfcl.py", "rlpd.py", "collect_demos.py", "benchmarks/learning.py", "benchmarks/throughput.py",
           "benchmarks/frontier.py", "benchmarks/suite.py", "benchmarks/planner.py", "benchmarks/resume_state.py",
           "mani_skill.trajectory.replay_trajectory")
LINK = re.compile(r"\[`([^`]+)`\]\((?:\.\./)?([\w/]+\.py)#L(\d+)(?:-L(\d+))?\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    """What `python <script> --help` prints: our scripts' help is made in this process (their modules are loaded
    here anyway, and a subprocess per script would import JAX and ManiSkill ten times over)."""
    if not script.endswith(".py"):
        out = subprocess.run([sys.executable, "-m", script, "--help"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
        assert out.returncode == 0, f"{script} --help failed: {out.stderr[-500:]}"
        return out.stdout
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"_help_of_{path.stem}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        module.parse_args(["--help"]) if hasattr(module, "parse_args") else tyro.cli(module.Args, args=["--help"])
    assert e.value.code in (0, None), f"{script} --help failed"
    return out.getvalue()


def help_flags(script: str) -> set:
    return set(FLAG.findall(help_text(script))) | {"--help"}


def definitions(path: Path) -> dict:
    """Dotted name -> (first line, last line) of every function and class, nested ones included."""
    spans = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                spans[name] = (first, child.end_lineno)
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return spans


def expected_lines(target: str, script: str):
    """(first, last) lines that a link to `target` in `script` must carry; last is None for a comment."""
    path = ROOT / script
    if target.startswith("#"):
        hits = [i for i, line in enumerate(path.read_text().splitlines(), 1) if target in line]
        assert len(hits) == 1, f"comment {target!r} occurs {len(hits)} times in {script}; a link needs exactly one"
        return hits[0], None
    spans = definitions(path)
    assert target in spans, f"{script} defines no {target!r}"
    return spans[target]


def fix(doc: Path) -> None:
    def repl(m):
        target, script = m.group(1), m.group(2)
        first, last = expected_lines(target, script)
        lines = f"L{first}" + (f"-L{last}" if last else "")
        prefix = "../" if doc.parent.name == "docs" else ""
        return f"[`{target}`]({prefix}{script}#{lines})"

    doc.write_text(LINK.sub(repl, doc.read_text()))


def code_commands(text: str):
    """Lines of fenced code blocks that run one of our scripts: (script, the line)."""
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0]
            m = re.search(r"python\s+(?:-m\s+)?(\S+\.py|mani_skill\.\S+)", line)
            if m and m.group(1) in SCRIPTS:
                yield m.group(1), line


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_code_links_point_at_what_they_name_and_other_links_lead_to_files(doc):
    text = doc.read_text()
    links = LINK.findall(text)
    if doc.name in ("rfcl.md", "rlpd.md"):
        assert len(links) >= 8, f"{doc.name} should point readers at the code"
    for target, script, first, last in links:
        want = expected_lines(target, script)
        got = (int(first), int(last) if last else None)
        assert got == want, (f"{doc.name}: link to {target} in {script} says lines {got}, the code has {want}; "
                             f"run python tests/test_docs.py --fix")
    # every relative link (other docs, scripts, figures) leads to a file of this repository
    relative = [t for t in re.findall(r"\]\(([^)#\s]+)[^)]*\)", text) if not t.startswith(("http://", "https://"))]
    assert relative, f"{doc.name} links to nothing in the repository"
    missing = [t for t in relative if not (doc.parent / t).resolve().is_file()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_in_the_docs_exists(doc):
    text = doc.read_text()
    commands = list(code_commands(text))
    if doc.name in ("rfcl.md", "rlpd.md", "results.md"):
        assert commands, f"{doc.name} shows no commands"
    for script, line in commands:
        unknown = set(FLAG.findall(line)) - help_flags(script)
        assert not unknown, f"{doc.name}: `{line.strip()}` uses {sorted(unknown)}, which {script} --help lacks"
    # flags named in the prose belong to the doc's own script (the README's to either algorithm)
    own = {"rfcl.md": ("rfcl.py",), "rlpd.md": ("rlpd.py",)}.get(doc.name, ("rfcl.py", "rlpd.py"))
    known = set().union(*(help_flags(s) for s in own))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    named = [s for s in SCRIPTS if Path(s).name.removesuffix(".py").split(".")[-1] in prose]
    unknown = {f for f in FLAG.findall(prose) if f not in known and not any(f in help_flags(s) for s in named)}
    assert not unknown, f"{doc.name} mentions {sorted(unknown)}, which no script it names has"


def test_every_logged_tag_is_documented():
    def logged(path):
        return set(re.findall(r'"((?:charts|losses|eval|curriculum|time)/[a-z0-9_]+)"', (ROOT / path).read_text()))

    # SPS, time split, training episodes (run_log.RunLog) and eval (common.evaluate), the same for both scripts
    shared = logged("run_log.py") | logged("common.py")
    assert len(shared) >= 10, sorted(shared)
    for script, doc in (("rfcl.py", "docs/rfcl.md"), ("rlpd.py", "docs/rlpd.md")):
        tags = logged(script) | shared
        text = (ROOT / doc).read_text()
        missing = sorted(t for t in tags if f"`{t}`" not in text)
        assert len(tags) >= 15 and not missing, f"{doc} does not explain {missing}"


if __name__ == "__main__":
    if "--fix" in sys.argv:
        for d in DOCS:
            fix(d)
        print("rewrote code-link line numbers in", ", ".join(d.name for d in DOCS))
