"""The shell sandbox (moonlet/agent/sandbox.py and landlock.py, Linux Landlock): the rulesets built for each ABI
version against the bit values of the kernel's documented UAPI (always runs), and, where the kernel
has Landlock, real sandboxed commands: writes inside the work directory and temp work and writes
outside fail with nothing created, reads outside work, TCP to a listener in this process is denied
(or allowed by port) where it works unsandboxed, every older ABI's downgraded ruleset still confines
writes, the denial note, the `edits` approval mode, `--sandbox on` on a kernel without Landlock, and
the setting saved with the session through the CLI."""

import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile

import pytest

from agent_scripted import Reply, ScriptedEndpoint, last_results, make_agent, result_text, text, tool

from moonlet.agent import landlock as ll
from moonlet.agent.landlock import build_ruleset
from moonlet.agent.sandbox import SandboxConfig, SandboxUnavailable, resolve_policy
from moonlet.agent.tools import ToolContext, Workspace
from moonlet.agent.tools.shell import JobOutputTool, ShellTool

ABI = ll.landlock_abi()
needs_landlock = pytest.mark.skipif(ABI < 1, reason=f"no Landlock here: {ll.probe()[1]}")
needs_net = pytest.mark.skipif(ABI < 4, reason=f"Landlock ABI {ABI} has no network rules (4 needed)")

# include/uapi/linux/landlock.h: (right, bit, the ABI version that introduced it)
DOCUMENTED_FS = [("EXECUTE", 0, 1), ("WRITE_FILE", 1, 1), ("READ_FILE", 2, 1), ("READ_DIR", 3, 1),
                 ("REMOVE_DIR", 4, 1), ("REMOVE_FILE", 5, 1), ("MAKE_CHAR", 6, 1), ("MAKE_DIR", 7, 1),
                 ("MAKE_REG", 8, 1), ("MAKE_SOCK", 9, 1), ("MAKE_FIFO", 10, 1), ("MAKE_BLOCK", 11, 1),
                 ("MAKE_SYM", 12, 1), ("REFER", 13, 2), ("TRUNCATE", 14, 3), ("IOCTL_DEV", 15, 5)]
DOCUMENTED_NET = [("BIND_TCP", 0, 4), ("CONNECT_TCP", 1, 4)]
DOCUMENTED_SCOPE = [("ABSTRACT_UNIX_SOCKET", 0, 6), ("SIGNAL", 1, 6)]


def documented(table, abi, names=None):
    return sum(1 << bit for name, bit, since in table if since <= abi and (names is None or name in names))


def test_access_masks_and_structs_per_abi_match_the_documented_values():
    for name, bit, _ in DOCUMENTED_FS:
        assert getattr(ll, f"FS_{name}") == 1 << bit
    for abi in range(1, 9):  # 8: a newer kernel than this code knows gets the rights of 7
        known = min(abi, ll.KNOWN_ABI)
        fs, net, scoped = documented(DOCUMENTED_FS, abi), documented(DOCUMENTED_NET, abi), \
            documented(DOCUMENTED_SCOPE, abi)
        assert (ll.fs_rights(abi), ll.net_rights(abi), ll.scopes(abi)) == (fs, net, scoped), abi
        # struct landlock_ruleset_attr grows with the ABI: fs (1), net (4), scoped (6), each a __u64
        attr = ll.ruleset_attr(fs, net, scoped, known)
        assert len(attr) == (24 if abi >= 6 else 16 if abi >= 4 else 8)
        assert struct.unpack(f"<{len(attr) // 8}Q", attr) == (fs, net, scoped)[:len(attr) // 8]

        dirs = {"/", "/work", "/tmp"}
        rules = build_ruleset(abi, ["/work", "/tmp"], None, ["/dev/null"], (), is_dir=dirs.__contains__)
        read = documented(DOCUMENTED_FS, abi, {"EXECUTE", "READ_FILE", "READ_DIR", "IOCTL_DEV"})
        device = documented(DOCUMENTED_FS, abi, {"READ_FILE", "WRITE_FILE", "TRUNCATE", "IOCTL_DEV"})
        assert (rules.handled_fs, rules.handled_net, rules.scoped) == (fs, net, scoped)
        assert rules.paths == [("/", read), ("/work", fs), ("/tmp", fs), ("/dev/null", device)]
        assert rules.ports == []
        # network allowed: TCP is not handled at all; a port list: connect rules for those ports only
        assert build_ruleset(abi, ["/work"], net_ports=None, is_dir=dirs.__contains__).handled_net == 0
        ported = build_ruleset(abi, ["/work"], net_ports=(443, 8000), is_dir=dirs.__contains__)
        assert ported.ports == ([(443, 2), (8000, 2)] if abi >= 4 else [])
        # a confined read set: read rules on those paths instead of /
        confined = build_ruleset(abi, ["/work"], ["/usr", "/work/f"], is_dir=dirs.__contains__)
        file_read = documented(DOCUMENTED_FS, abi, {"EXECUTE", "READ_FILE", "IOCTL_DEV"})
        assert confined.paths[:2] == [("/usr", file_read), ("/work/f", file_read)]  # (/usr is "not a dir" here)
    # struct landlock_path_beneath_attr is packed: __u64 allowed_access, __s32 parent_fd (12 bytes);
    # struct landlock_net_port_attr: __u64 allowed_access, __u64 port (16 bytes)
    assert ll.path_beneath_attr(0x1FFF, 7) == (0x1FFF).to_bytes(8, sys.byteorder) + (7).to_bytes(4, sys.byteorder)
    assert ll.net_port_attr(2, 443) == (2).to_bytes(8, sys.byteorder) + (443).to_bytes(8, sys.byteorder)
    with pytest.raises(ValueError):
        ll.ruleset_attr(1, 3, 0, 3)  # network rights on a kernel without them
    assert ll.parse_network("allow") is None and ll.parse_network("deny") == ()
    assert ll.parse_network("8000, 443,443") == (443, 8000)
    for bad in ("0", "70000", "http", ""):
        with pytest.raises(ValueError, match="allow, deny or"):
            ll.parse_network(bad)


def test_policy_words_and_confinement_follow_the_abi(tmp_path):
    from moonlet.agent.sandbox import SandboxPolicy
    old = SandboxPolicy(3, ["/w"], net_ports=())
    assert not old.confined and "not restricted (Landlock ABI 3" in old.describe()  # no network control: asks
    new = SandboxPolicy(4, ["/w"], net_ports=())
    assert new.confined and "no TCP connections" in new.describe()
    assert not SandboxPolicy(7, ["/w"], net_ports=(443,)).confined and not SandboxPolicy(7, ["/w"], net_ports=None).confined
    assert new.wrapper_args() == ["--abi=4", "--write=/w", "--network=deny"]
    # the wrapper fails closed: a policy it cannot apply runs nothing (exit 125)
    marker = tmp_path / "ran"
    run = subprocess.run([sys.executable, "-I", "-S", ll.__file__, "--network=99999", "--", "touch", str(marker)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == ll.EXIT_SANDBOX_FAILED and "did not run" in run.stderr and not marker.exists()
    run = subprocess.run([sys.executable, "-I", "-S", ll.__file__, "--bogus", "--", "true"], capture_output=True,
                         text=True, timeout=30)
    assert run.returncode == 2 and "--bogus" in run.stderr


def test_sandbox_on_without_landlock_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ll, "_probe", (0, "the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK)"))
    with pytest.raises(SandboxUnavailable) as e:
        resolve_policy(SandboxConfig("on"), tmp_path)
    message = str(e.value)
    assert os.uname().release in message and "CONFIG_SECURITY_LANDLOCK" in message
    assert "--sandbox auto" in message and "--sandbox off" in message
    assert resolve_policy(SandboxConfig("auto"), tmp_path) is None  # auto: no sandbox where there is none
    with pytest.raises(SandboxUnavailable):  # the Python API refuses it when the agent is made
        make_agent("http://127.0.0.1:9", tmp_path, sandbox=SandboxConfig("on"))
    # the CLI refuses it before it starts a model or connects anywhere
    from moonlet.cli import main
    code = main(["agent", "run", "task", "--sandbox", "on", "--base-url", "http://127.0.0.1:9", "--model-name", "m",
                 "--db", str(tmp_path / "s.db"), "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "--sandbox on" in err and os.uname().release in err
    # sandbox flags with the sandbox off would be ignored: refused instead
    code = main(["agent", "run", "task", "--sandbox-network", "allow", "--base-url", "http://127.0.0.1:9",
                 "--model-name", "m", "--db", str(tmp_path / "s.db"), "--workdir", str(tmp_path)])
    assert code == 1 and "the sandbox is off" in capsys.readouterr().err


# -- real sandboxed commands ---------------------------------------------------------------------------
@pytest.fixture
def place(tmp_path_factory, monkeypatch):
    """A work directory, an `outside` directory next to it, and a private "system temp directory" (so
    that the real one, which holds both, is not writable by the sandbox)."""
    base = tmp_path_factory.mktemp("sandbox")
    systmp, ws, outside = base / "systmp", base / "parent" / "ws", base / "parent" / "outside"
    for d in (systmp, ws, outside):
        d.mkdir(parents=True)
    (outside / "readable.txt").write_text("read me\n")
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    return Workspace(ws), outside, systmp


def shell(ws, command, config=SandboxConfig("on"), **args):
    tool = ShellTool(config)

    async def go():
        try:
            return await tool.run(dict(args, command=command), ToolContext(ws))
        finally:
            await tool.close()
    return asyncio.run(go())


@needs_landlock
def test_writes_only_inside_the_workspace_and_temp_reads_everywhere(place):
    ws, outside, systmp = place
    policy = resolve_policy(SandboxConfig("on"), ws.root)
    for allowed in policy.writable:  # the outside directory is under nothing the sandbox allows
        assert not str(outside).startswith(allowed.rstrip("/") + "/") and str(outside) != allowed
    command = (f"echo in > inside.txt && cat inside.txt; echo tmp > {systmp}/t.txt; "
               f"echo out > {outside}/x.txt; echo rc=$?; cat {outside}/readable.txt; mkdir {outside}/d")
    # reference: unsandboxed, the same command writes outside
    plain = shell(ws, command, config=SandboxConfig("off"))
    assert (outside / "x.txt").read_text() == "out\n" and (outside / "d").is_dir() and not plain.is_error
    (outside / "x.txt").unlink()
    (outside / "d").rmdir()

    result = shell(ws, command)
    out = result.content
    assert (ws.root / "inside.txt").read_text() == "in\n" and (systmp / "t.txt").read_text() == "tmp\n"
    assert not (outside / "x.txt").exists() and not (outside / "d").exists()
    assert "Permission denied" in out and "rc=2" in out and "read me" in out
    assert result.is_error and "[exit code 1]" in out
    # the model is told it ran sandboxed and under which policy
    assert "moonlet's shell sandbox" in out and str(ws.root) in out.split("[this command ran")[1]
    ok = shell(ws, "echo fine > /dev/null && echo hi")
    assert ok.content == "hi\n[exit code 0]"  # no note on success


@needs_landlock
def test_every_older_abis_downgraded_ruleset_still_confines_writes(place):
    ws, outside, _ = place
    for abi in range(1, min(ABI, ll.KNOWN_ABI) + 1):
        target = outside / f"abi{abi}.txt"
        run = subprocess.run([sys.executable, "-I", "-S", ll.__file__, f"--abi={abi}", f"--write={ws.root}",
                              "--device=/dev/null", "--", "/bin/sh", "-c",
                              f"echo a > in{abi}.txt; echo b > {target}; cat {outside}/readable.txt"],
                             cwd=ws.root, capture_output=True, text=True, timeout=30)
        assert (ws.root / f"in{abi}.txt").read_text() == "a\n", (abi, run.stderr)
        assert not target.exists() and "Permission denied" in run.stderr and run.stdout == "read me\n", abi


@needs_landlock
def test_extra_writable_paths_and_a_confined_read_set(place):
    ws, outside, _ = place
    extra = outside.parent / "extra"
    extra.mkdir()
    out = shell(ws, f"echo e > {extra}/e.txt && echo x > {outside}/x.txt",
                config=SandboxConfig("on", allow_write=[str(extra)]))
    assert (extra / "e.txt").read_text() == "e\n" and not (outside / "x.txt").exists() and out.is_error
    # reads confined to the work directory (and the system): the outside file cannot be read
    (ws.root / "own.txt").write_text("own\n")
    out = shell(ws, f"cat own.txt; cat {outside}/readable.txt", config=SandboxConfig("on", allow_read=[]))
    assert "own" in out.content and "read me" not in out.content and "Permission denied" in out.content
    with pytest.raises(ValueError, match="does not exist"):
        resolve_policy(SandboxConfig("on", allow_write=[str(outside / "missing")]), ws.root)


@needs_net
def test_network_deny_blocks_a_connection_that_works_unsandboxed(place):
    ws, _, _ = place
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    connect = (f"{sys.executable} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=10); "
               "print('connected')\"")
    try:
        assert "connected" in shell(ws, connect, config=SandboxConfig("off")).content  # the reference
        denied = shell(ws, connect)
        assert denied.is_error and "connected" not in denied.content and "Permission denied" in denied.content
        assert "no TCP connections" in denied.content  # the note names the network policy
        assert "connected" in shell(ws, connect, config=SandboxConfig("on", network=f"{port}")).content
        other = shell(ws, connect, config=SandboxConfig("on", network=f"{port + 1 if port < 65535 else 1}"))
        assert "connected" not in other.content
        assert "connected" in shell(ws, connect, config=SandboxConfig("on", network="allow")).content
        listen = f"{sys.executable} -c \"import socket; socket.socket().bind(('127.0.0.1', 0)); print('bound')\""
        assert "bound" not in shell(ws, listen).content and "bound" in shell(ws, listen, SandboxConfig("off")).content
    finally:
        listener.close()


@needs_landlock
def test_background_jobs_run_sandboxed_and_report_denials(place):
    ws, outside, _ = place
    tool = ShellTool(SandboxConfig("on"))
    jobs = JobOutputTool(tool)

    async def go():
        ctx = ToolContext(ws)
        try:
            started = await tool.run({"command": f"echo j > {outside}/j.txt", "background": True}, ctx)
            return await jobs.run({"job_id": started.content.split()[3], "wait": 10}, ctx)
        finally:
            await tool.close()
    out = asyncio.run(go()).content
    assert "exited with code" in out and "moonlet's shell sandbox" in out and not (outside / "j.txt").exists()


@needs_net
def test_edits_mode_runs_confined_calls_without_asking(place):
    ws, outside, _ = place

    def script(body):
        if len(body["messages"]) == 1:
            return Reply([tool("write_file", {"path": "a.txt", "content": "A"}),
                          tool("shell", {"command": f"echo s > s.txt; echo o > {outside}/o.txt"}),
                          tool("web_fetch", {"url": "http://127.0.0.1:9/"})])
        return Reply([text("done")])

    def run(config):
        with ScriptedEndpoint(script) as ep:  # no terminal: whatever needs asking is rejected
            agent = make_agent(ep.url, ws.root, approval="edits", sandbox=config)
            try:
                asyncio.run(agent.run("go"))
            finally:
                asyncio.run(agent.close())
                asyncio.run(agent.client.aclose())
        return [result_text(r) for r in last_results(ep.requests[1])]

    write, sh, fetch = run(SandboxConfig("on"))
    assert (ws.root / "a.txt").read_text() == "A" and (ws.root / "s.txt").read_text() == "s\n"
    assert "Permission denied" in sh and not (outside / "o.txt").exists()
    assert "--yolo" in fetch  # the network tool still asks
    (ws.root / "s.txt").unlink()
    for config in (SandboxConfig("off"), SandboxConfig("on", network="allow")):  # not confined: it asks
        write, sh, fetch = run(config)
        assert "--yolo" in sh and not (ws.root / "s.txt").exists()


@needs_landlock
def test_cli_saves_the_sandbox_with_the_session_and_resume_keeps_it(place):
    ws, outside, systmp = place
    extra = outside.parent / "extra"
    extra.mkdir()
    command = f"echo e > {extra}/e.txt; echo o > {outside}/o.txt"

    def script(body):
        if not last_results(body):
            return Reply([tool("shell", {"command": command})])
        return Reply([text("result: " + result_text(last_results(body)[0]))])

    db = outside.parent / "s.db"

    def run(*args):
        with ScriptedEndpoint(script) as ep:
            return subprocess.run([sys.executable, "-m", "moonlet", "agent", *args, "--base-url", ep.url,
                                   "--model-name", "scripted", "--db", str(db), "-q", "--yolo"],
                                  capture_output=True, text=True, timeout=120, cwd=ws.root,
                                  env=dict(os.environ, TMPDIR=str(systmp)))

    out = run("run", "go", "--workdir", str(ws.root), "--session-id", "sbx", "--sandbox", "on",
              "--sandbox-allow-write", str(extra))
    assert out.returncode == 0, out.stderr
    assert (extra / "e.txt").exists() and not (outside / "o.txt").exists()
    assert "moonlet's shell sandbox" in out.stdout and str(extra) in out.stdout
    from moonlet.agent.store import SessionStore
    store = SessionStore(str(db))
    saved = store.get_session("sbx")["config"]["agent"]["sandbox"]
    store.close()
    assert saved == {"mode": "on", "network": "deny", "allow_write": [str(extra)], "allow_read": None}
    (extra / "e.txt").unlink()
    out = run("resume", "sbx", "again")  # no sandbox flags: the saved setting applies
    assert out.returncode == 0, out.stderr
    assert (extra / "e.txt").exists() and not (outside / "o.txt").exists() and "sandbox" in out.stdout
