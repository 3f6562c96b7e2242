"""The agent's shell sandbox: the setting (``SandboxConfig``, saved with a session), the policy it
gives for a work directory (``SandboxPolicy``), and the note a denied command's result gets. The
Landlock mechanics and the wrapper that applies a policy are ``moonlet.agent.landlock``.

Policy: a sandboxed command may read (and execute) everywhere, or only in a configured read set plus
the system directories; it may write only inside the work directory, the system temp directory
(``tempfile.gettempdir()``, which follows $TMPDIR), /dev/shm and extra paths the user allows, and to
a few harmless devices (/dev/null, /dev/tty, ...); with Landlock ABI 4 or newer it may not open TCP
connections or bind TCP ports unless the network is allowed (all of it, or connections to a list of
ports); with ABI 6 or newer it may not signal processes outside its own sandbox nor connect to
abstract UNIX sockets created outside it. Hooks and MCP servers, which the user configured, are not
sandboxed.

How it is applied: the shell tool runs ``python -I -S landlock.py [policy flags] -- /bin/sh -c
COMMAND``, a fresh single-threaded process that restricts itself and ``exec``s the shell. The other
way, a ``preexec_fn``, would save that interpreter start (about 20 ms) but runs Python code between
``fork`` and ``exec`` in a copy of a process that has other threads (the in-process model server,
asyncio's worker threads): a lock held by another thread at fork time (the allocator's, the import
lock) deadlocks the child, which is why Python's documentation warns against it with threads; it also
rules out the ``vfork``/``posix_spawn`` fast paths. ``python -m moonlet.agent.landlock --help`` shows
how to run the wrapper by hand. (This module imports ``landlock`` only when it is used, so that the
package import does not load it and ``-m`` can run it as ``__main__`` cleanly.)
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field

__all__ = ["SANDBOX_MODES", "SandboxConfig", "SandboxPolicy", "SandboxUnavailable", "denial_note",
           "parse_network", "probe", "resolve_policy", "temp_dirs"]

# devices every command may write to (when they exist)
WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/dev/random", "/dev/urandom")
# what a confined read set always includes, so that programs can start at all
SYSTEM_READ_PATHS = ("/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/dev",
                     "/proc", "/sys", "/run")


def _landlock():
    from . import landlock
    return landlock


def probe() -> tuple[int, str]:
    """(the kernel's Landlock ABI version, or 0; why not, when 0)."""
    return _landlock().probe()


def parse_network(value: str) -> tuple[int, ...] | None:
    """``allow`` → None, ``deny`` → (), ``443,8000`` → those ports (see ``landlock.parse_network``)."""
    return _landlock().parse_network(value)


class SandboxUnavailable(ValueError):
    """The sandbox was asked for (``on``) and this system cannot provide it."""


def unavailable_message() -> str:
    """What to tell a user who asked for the sandbox on a system without it."""
    _, why = probe()
    return (f"--sandbox on: the shell sandbox needs Linux Landlock, and this system (kernel {os.uname().release}) "
            f"has none: {why}. Use a kernel with Landlock (5.13 or newer, enabled; 6.7 or newer to also restrict "
            "the network), or run with --sandbox auto (sandbox where available) or --sandbox off (rely on the "
            "approval policy alone)")


# --- configuration and policy ------------------------------------------------------------------------
SANDBOX_MODES = ("on", "off", "auto")


@dataclass
class SandboxConfig:
    """The sandbox setting of an agent (saved with its session). ``mode``: ``on`` (an error where the
    kernel has no Landlock), ``auto`` (on where it has), ``off``. ``network``: ``deny`` (default),
    ``allow`` or comma-separated TCP ports. ``allow_write``: paths writable besides the work directory
    and the temp directory. ``allow_read``: None reads everywhere; a list confines reads to it (plus the
    writable paths and the system directories programs need)."""
    mode: str = "off"
    network: str = "deny"
    allow_write: list = field(default_factory=list)
    allow_read: list | None = None

    def __post_init__(self):
        if self.mode not in SANDBOX_MODES:
            raise ValueError(f"sandbox mode {self.mode!r} is not one of {', '.join(SANDBOX_MODES)}")
        parse_network(self.network)

    @classmethod
    def from_dict(cls, d: dict | None) -> "SandboxConfig":
        d = dict(d or {})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class SandboxPolicy:
    """What one sandboxed command may do, with absolute real paths."""
    abi: int
    writable: list[str]
    readable: list[str] | None = None          # None: everywhere
    devices: list[str] = field(default_factory=list)
    net_ports: tuple[int, ...] | None = ()     # None: unrestricted; (): no TCP; else connect to these ports

    @property
    def confined(self) -> bool:
        """Whether a command can only change files in the allowed places and cannot reach the network
        over TCP (what the ``edits`` approval mode needs to run it without asking)."""
        return self.net_ports == () and self.abi >= 4

    def wrapper_args(self) -> list[str]:
        args = [f"--abi={self.abi}"]
        args += [f"--write={p}" for p in self.writable]
        args += [f"--device={p}" for p in self.devices]
        if self.readable is not None:
            args.append("--confine-reads")
            args += [f"--read={p}" for p in self.readable]
        if self.net_ports is None:
            args.append("--network=allow")
        else:
            args.append("--network=" + (",".join(map(str, self.net_ports)) or "deny"))
        return args

    def argv(self, command: str) -> list[str]:
        """The command line that runs ``command`` with ``/bin/sh -c`` inside this sandbox."""
        return [sys.executable, "-I", "-S", os.path.abspath(_landlock().__file__), *self.wrapper_args(), "--",
                "/bin/sh", "-c", command]

    def describe(self) -> str:
        """One paragraph for the terminal and for the model."""
        reads = "everywhere" if self.readable is None else ", ".join(self.readable)
        if self.net_ports is None:
            net = "allowed"
        elif self.abi < 4:
            net = f"not restricted (Landlock ABI {self.abi} has no network control; 4 needed)"
        elif self.net_ports:
            ports = ", ".join(map(str, self.net_ports))
            net = f"TCP connections only to port{'s' if len(self.net_ports) > 1 else ''} {ports}; no listening"
        else:
            net = "no TCP connections or listening"
        extra = "; no signals to processes outside the sandbox" if self.abi >= 6 else ""
        return (f"Landlock ABI {self.abi}; writes only in {', '.join(self.writable)}; reads {reads}; network: "
                f"{net}{extra}")


def temp_dirs() -> list[str]:
    """The system temp directory (``tempfile.gettempdir()``, which follows $TMPDIR) and /dev/shm."""
    return [tempfile.gettempdir(), "/dev/shm"]


def _real_existing(paths, what: str, relative_to: str) -> list[str]:
    out = []
    for p in paths:
        real = os.path.realpath(os.path.join(relative_to, os.path.expanduser(str(p))))
        if not os.path.exists(real):
            raise ValueError(f"{what} {str(p)!r}: {real!r} does not exist; create it first or leave it out")
        if real not in out:
            out.append(real)
    return out


def resolve_policy(config: SandboxConfig | None, workdir: str | os.PathLike) -> SandboxPolicy | None:
    """The policy for commands run in ``workdir`` under ``config``: None when the sandbox is off (or
    ``auto`` on a system without Landlock). ``on`` without Landlock raises SandboxUnavailable; a
    configured path that does not exist raises ValueError."""
    if config is None or config.mode == "off":
        return None
    abi = probe()[0]
    if abi < 1:
        if config.mode == "on":
            raise SandboxUnavailable(unavailable_message())
        return None
    root = os.path.realpath(workdir)
    writable = _real_existing([root] + [p for p in temp_dirs() if os.path.isdir(p)], "writable path", root)
    for p in _real_existing(config.allow_write, "--sandbox-allow-write", root):
        if p not in writable:
            writable.append(p)
    readable = None
    if config.allow_read is not None:
        readable = _real_existing(config.allow_read, "--sandbox-allow-read", root)
        readable += [p for p in SYSTEM_READ_PATHS if os.path.exists(p) and p not in readable]
        for prefix in {sys.prefix, sys.base_prefix}:  # the Python that runs the wrapper
            if os.path.realpath(prefix) not in readable:
                readable.append(os.path.realpath(prefix))
    devices = [d for d in WRITABLE_DEVICES if os.path.exists(d)]
    return SandboxPolicy(abi, writable, readable, devices, parse_network(config.network))


# --- the denial note --------------------------------------------------------------------------------------
DENIAL_MARKERS = ("permission denied", "operation not permitted", "eacces", "eperm")


def denial_note(policy: SandboxPolicy, output: str, exit_code: int | None) -> str | None:
    """A note for the model when a sandboxed command failed with what looks like a sandbox denial
    (nonzero exit and "Permission denied" / "Operation not permitted" in its output); else None."""
    if not exit_code or not any(m in output.lower() for m in DENIAL_MARKERS):
        return None
    return ("[this command ran in moonlet's shell sandbox (" + policy.describe() + "). The permission error "
            "above may be the sandbox's policy rather than the files' own permissions. If the command really "
            "needs this, ask the user to allow it (e.g. --sandbox-allow-write PATH or --sandbox-network allow) "
            "or to run it themselves]")
