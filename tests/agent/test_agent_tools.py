"""Built-in tools called directly: confinement to the work directory, line ranges and caps, exact-one
replacement, glob/grep, shell timeouts/background jobs/truncation, the calculator, argument checks."""

import asyncio
import os
from fractions import Fraction

import pytest

from moonlet.agent.tools import ToolContext, ToolError, Workspace, make_tools, validate_args
from moonlet.agent.tools.shell import MAX_OUTPUT_CHARS


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("top secret\n")
    return Workspace(root)


def call(ws, name, **args):
    tools = make_tools()
    try:
        return asyncio.run(tools.get(name).run(args, ToolContext(ws)))
    finally:
        asyncio.run(tools.close())


def test_confinement_rejects_traversal_absolute_and_symlink_escapes(ws, tmp_path):
    os.symlink(tmp_path / "secret.txt", ws.root / "link.txt")
    os.symlink(tmp_path, ws.root / "up")
    (ws.root / "real.txt").write_text("inside\n")
    os.symlink(ws.root / "real.txt", ws.root / "inner_link.txt")
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt", "up/secret.txt", "sub/../../secret.txt"):
        with pytest.raises(ToolError, match="outside the work directory"):
            call(ws, "read_file", path=bad)
    with pytest.raises(ToolError, match="outside"):
        call(ws, "write_file", path="up/new.txt", content="x")
    assert not (tmp_path / "new.txt").exists()
    assert "inside" in call(ws, "read_file", path="inner_link.txt").content
    assert call(ws, "glob", pattern="**/*.txt").content.split("\n") == ["inner_link.txt", "real.txt"]
    assert call(ws, "grep", pattern="top sec").content.startswith("no matches")


def test_read_file_line_ranges_and_caps(ws):
    lines = [f"line {i} " + "x" * (i % 7) for i in range(1, 2501)]
    (ws.root / "big.txt").write_text("\n".join(lines) + "\n")
    out = call(ws, "read_file", path="big.txt", offset=10, limit=5).content.split("\n")
    assert [row.split("\t", 1) for row in out[:5]] == [[f"{n:6}", lines[n - 1]] for n in range(10, 15)]
    assert "use offset=15" in out[-1]
    full = call(ws, "read_file", path="big.txt").content
    assert full.count("\n") == 1000 and "showing lines 1-1000 of 2500" in full
    (ws.root / "wide.txt").write_text(("y" * 1500 + "\n") * 300)
    wide = call(ws, "read_file", path="wide.txt").content
    assert len(wide) <= 100_200 and "use offset=" in wide
    (ws.root / "bin.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ToolError, match="binary"):
        call(ws, "read_file", path="bin.dat")
    with pytest.raises(ToolError, match="does not exist"):
        call(ws, "read_file", path="nope.txt")


def test_write_and_str_replace(ws):
    call(ws, "write_file", path="a/b/c.py", content="x = 1\ny = 1\n")
    call(ws, "write_file", path="a/b/c.py", content="z = 2\n", append=True)
    assert (ws.root / "a/b/c.py").read_text() == "x = 1\ny = 1\nz = 2\n"
    with pytest.raises(ToolError, match="occurs 2 times .* lines 1, 2"):
        call(ws, "str_replace", path="a/b/c.py", old="= 1", new="= 3")
    with pytest.raises(ToolError, match="not found"):
        call(ws, "str_replace", path="a/b/c.py", old="w = 9", new="")
    res = call(ws, "str_replace", path="a/b/c.py", old="y = 1", new="y = 5")
    assert "line 2" in res.content and (ws.root / "a/b/c.py").read_text() == "x = 1\ny = 5\nz = 2\n"


def test_glob_and_grep(ws):
    for p, body in {"src/m.py": "def Alpha():\n    return 1\n", "src/n.py": "alpha = 2\n", "README.md": "Alpha\n",
                    ".git/x.py": "alpha\n"}.items():
        (ws.root / p).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / p).write_text(body)
    assert call(ws, "glob", pattern="**/*.py").content.split("\n") == ["src/m.py", "src/n.py"]
    assert call(ws, "grep", pattern=r"^alpha").content == "src/n.py:1: alpha = 2"
    hits = call(ws, "grep", pattern="alpha", ignore_case=True, glob="*.py").content.split("\n")
    assert hits == ["src/m.py:1: def Alpha():", "src/n.py:1: alpha = 2"]
    with pytest.raises(ToolError, match="invalid regular expression"):
        call(ws, "grep", pattern="(")


def test_shell_exit_codes_timeout_truncation_and_jobs(ws):
    ok = call(ws, "shell", command="echo hello; pwd")
    assert ok.content == f"hello\n{ws.root}\n[exit code 0]" and not ok.is_error
    assert call(ws, "shell", command="exit 3").is_error
    slow = call(ws, "shell", command="echo start; sleep 30", timeout=1)
    assert slow.is_error and "timed out after 1s" in slow.content and "start" in slow.content
    big = call(ws, "shell", command="python3 -c \"print('z' * 100000)\"").content
    assert "output truncated" in big and len(big) < MAX_OUTPUT_CHARS + 300

    async def jobs():
        tools = make_tools()
        ctx = ToolContext(ws)
        try:
            started = await tools.get("shell").run({"command": "echo one; sleep 0.2; echo two", "background": True}, ctx)
            job_id = started.content.split()[3]
            done = await tools.get("job_output").run({"job_id": job_id, "wait": 5}, ctx)
            forever = await tools.get("shell").run({"command": "sleep 60", "background": True}, ctx)
            killed = await tools.get("job_output").run({"job_id": forever.content.split()[3], "kill": True}, ctx)
            return done.content, killed.content
        finally:
            await tools.close()

    done, killed = asyncio.run(jobs())
    assert "exited with code 0" in done and "one\ntwo" in done
    assert "exited with code -9" in killed


def test_calculator_matches_python_arithmetic(ws):
    for expr in ("1234 * 5678", "2**100 - 7", "(17 + 5) * 3 // 4", "-8 % 3", "7 / 2", "1.5 * 4", "10 / 4 * 2"):
        expected = eval(expr, {"__builtins__": {}})  # Python's own arithmetic is the reference
        got = call(ws, "calculator", expression=expr).content
        assert Fraction(got) == Fraction(str(expected)) if isinstance(expected, float) else got == str(expected)
    for bad in ("__import__('os')", "a + 1", "1/0", "2 ** 0.5"):
        with pytest.raises(ToolError):
            call(ws, "calculator", expression=bad)


def test_validate_args_subset():
    schema = {"type": "object", "required": ["a"], "additionalProperties": False,
              "properties": {"a": {"type": "integer", "minimum": 0}, "b": {"type": "array", "items": {"enum": ["x"]}},
                             "c": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    assert validate_args({"a": 1, "b": ["x"], "c": None}, schema) == []
    assert validate_args({"a": 2.0}, schema) == []
    errs = validate_args({"a": -1, "b": ["y"], "c": 3, "d": 1}, schema)
    assert any("below the minimum" in e for e in errs) and any("input.b[0]" in e for e in errs)
    assert any("input.c" in e for e in errs) and any("unexpected field 'd'" in e for e in errs)
    assert validate_args({}, schema) == ["input: missing required field 'a'"]
    assert validate_args({"a": True}, schema)[0].startswith("input.a: expected integer")
    assert validate_args("x", {"type": "object", "x-unknown": 1}) and validate_args({}, {"weird": True}) == []


def test_read_file_pdf_pages(ws, monkeypatch):
    """A PDF (written by hand, so its page texts are known) reads as its pages' text with markers; `pages`
    picks a range; long PDFs stop at the page cap or the size cap with a note how to read on."""
    from moonlet.agent.tools import files
    from moonlet.testing import tiny_pdf

    texts = [f"Text of page {n}\nline two of page {n}" for n in range(1, 26)]
    texts[3] = ""
    (ws.root / "doc.pdf").write_bytes(tiny_pdf(texts))

    def page_block(n):
        return f"--- page {n} ---\n" + (texts[n - 1] or f"[page {n} has no text layer (a scanned or image-only page)]")

    out = call(ws, "read_file", path="doc.pdf", pages="3-5").content
    assert out == "\n".join(["[PDF: doc.pdf, 25 pages]", page_block(3), page_block(4), page_block(5),
                             '[showing pages 3-5 of 25; use pages="6-25" to read on]'])
    assert call(ws, "read_file", path="doc.pdf", pages="25").content == "\n".join(
        ["[PDF: doc.pdf, 25 pages]", page_block(25), "--- end of document ---"])
    whole = call(ws, "read_file", path="doc.pdf").content  # no range: the first 20 pages
    assert whole == "\n".join(["[PDF: doc.pdf, 25 pages]"] + [page_block(n) for n in range(1, 21)]
                              + ['[showing pages 1-20 of 25; use pages="21-25" to read on]'])
    monkeypatch.setattr(files, "MAX_BYTES", 200)  # the size cap: whole pages while they fit
    small = call(ws, "read_file", path="doc.pdf", pages="2-9").content
    assert small == "\n".join(["[PDF: doc.pdf, 25 pages]", page_block(2), page_block(3), page_block(4),
                               '[showing pages 2-4 of 25; use pages="5-24" to read on]'])
    monkeypatch.setattr(files, "MAX_BYTES", 40)  # one page over the cap on its own: its start, cut
    block = page_block(2)
    assert call(ws, "read_file", path="doc.pdf", pages="2-3").content == "\n".join(
        ["[PDF: doc.pdf, 25 pages]", block[:15], f"[... page 2 cut, {len(block) - 15} more characters]",
         '[showing pages 2-2 of 25; use pages="3-22" to read on]'])
    for bad, match in ((dict(pages="0"), "start at 1"), (dict(pages="a-b"), "not a page range"),
                       (dict(pages="30"), "has 25 pages"), (dict(offset=2), "not offset/limit")):
        with pytest.raises(ToolError, match=match):
            call(ws, "read_file", path="doc.pdf", **bad)
    (ws.root / "a.txt").write_text("hi\n")
    with pytest.raises(ToolError, match="for PDF files"):
        call(ws, "read_file", path="a.txt", pages="1")
    (ws.root / "broken.pdf").write_bytes(tiny_pdf(texts)[:300])
    with pytest.raises(ToolError, match="broken.pdf: the PDF could not be read"):
        call(ws, "read_file", path="broken.pdf")
