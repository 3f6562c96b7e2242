"""A Landlock sandbox for the agent's shell commands (Linux only, no dependencies: the three Landlock
system calls through ctypes).

A sandboxed command may read (and execute) everywhere, or only in a configured read set; it may write
only inside the work directory, the system temp directory (plus /dev/shm) and extra paths the user
allows, and a few harmless devices (/dev/null, /dev/tty, ...); with Landlock ABI 4 or newer it may
not open TCP connections or bind TCP ports unless the network is allowed (all of it, or connections to
a list of ports); with ABI 6 or newer it may not signal processes outside its own sandbox nor connect
to abstract UNIX sockets created outside it.

How it is applied: the shell tool runs ``python -I -S <this file> [policy flags] -- /bin/sh -c
COMMAND``. This small wrapper restricts itself (``prctl(PR_SET_NO_NEW_PRIVS)``, then
``landlock_create_ruleset`` / ``landlock_add_rule`` / ``landlock_restrict_self``) and ``exec``s the
shell, which inherits the restrictions, as does everything it starts. A ``preexec_fn`` would avoid one
interpreter start (about 30 ms) but runs Python code between ``fork`` and ``exec`` in a copy of a
process that has other threads (the in-process model server, asyncio's worker threads): a lock held by
another thread at fork time (the allocator's, the import lock) deadlocks the child, and Python's
documentation warns against it for that reason. The wrapper runs in a fresh single-threaded process,
imports nothing but the standard library (it is started by file path with ``-I -S``, so neither the
moonlet package nor site-packages are loaded), and fails closed: if the sandbox cannot be applied it
prints why and exits with code 125 without running the command. ``python -m moonlet.agent.sandbox``
works too, for trying a policy by hand.

Access rights are those the running kernel knows (``landlock_create_ruleset(NULL, 0,
LANDLOCK_CREATE_RULESET_VERSION)`` gives its ABI version); rights newer than it are dropped from the
ruleset (the documented best-effort downgrade), so the same policy works from ABI 1 (Linux 5.13) on,
with what an older kernel cannot enforce named in the policy's description.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import platform
import struct
import sys
import tempfile
from dataclasses import dataclass, field

# --- the Landlock ABI (include/uapi/linux/landlock.h) ---------------------------------------------
SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (added after the unification)
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38

# filesystem rights (ABI 1 unless noted)
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13       # ABI 2
FS_TRUNCATE = 1 << 14    # ABI 3
FS_IOCTL_DEV = 1 << 15   # ABI 5
# network rights (ABI 4)
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
# scopes (ABI 6)
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1
# ABI 7 adds only logging flags for landlock_restrict_self (left at their defaults here)
KNOWN_ABI = 7

# the rights that can be granted on a file (as opposed to a directory and what is beneath it)
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR | FS_IOCTL_DEV

# devices every command may write to (when they exist)
WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/tty", "/dev/random", "/dev/urandom")
# what a confined read set always includes, so that programs can start at all
SYSTEM_READ_PATHS = ("/bin", "/sbin", "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/dev",
                     "/proc", "/sys", "/run")

EXIT_SANDBOX_FAILED = 125  # the wrapper could not apply the sandbox; the command did not run


def fs_rights(abi: int) -> int:
    """Every filesystem right the kernel with this Landlock ABI knows (and so can be asked to handle)."""
    if abi < 1:
        return 0
    rights = (1 << 13) - 1                 # EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def net_rights(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scopes(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def ruleset_attr(handled_fs: int, handled_net: int, scoped: int, abi: int) -> bytes:
    """``struct landlock_ruleset_attr`` as the kernel with this ABI reads it: ``__u64
    handled_access_fs`` (ABI 1), ``__u64 handled_access_net`` (ABI 4), ``__u64 scoped`` (ABI 6). Its size
    is passed along, so an older kernel is only given the fields it knows."""
    if abi >= 6:
        return struct.pack("=QQQ", handled_fs, handled_net, scoped)
    if handled_net and abi < 4 or scoped:
        raise ValueError(f"Landlock ABI {abi} cannot handle network rights or scopes")
    return struct.pack("=QQ", handled_fs, handled_net) if abi >= 4 else struct.pack("=Q", handled_fs)


def path_beneath_attr(allowed: int, parent_fd: int) -> bytes:
    """``struct landlock_path_beneath_attr``: ``__u64 allowed_access; __s32 parent_fd``, packed (12 bytes)."""
    return struct.pack("=Qi", allowed, parent_fd)


def net_port_attr(allowed: int, port: int) -> bytes:
    """``struct landlock_net_port_attr``: ``__u64 allowed_access; __u64 port`` (16 bytes)."""
    return struct.pack("=QQ", allowed, port)


# --- probing the kernel --------------------------------------------------------------------------------
class SandboxUnavailable(ValueError):
    """The sandbox was asked for (``on``) and this system cannot provide it."""


_libc = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.prctl.restype = ctypes.c_int
    return _libc


_probe: tuple[int, str] | None = None


def probe() -> tuple[int, str]:
    """(the kernel's Landlock ABI version, or 0 when there is none; why not, when 0). Cached."""
    global _probe
    if _probe is None:
        _probe = _probe_uncached()
    return _probe


def _probe_uncached() -> tuple[int, str]:
    if sys.platform != "linux":
        return 0, f"Landlock is a Linux feature and this is {platform.system() or sys.platform}"
    try:
        libc = _syscall()
        abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                           ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except (OSError, AttributeError) as e:
        return 0, f"cannot call into the C library: {e}"
    if abi >= 1:
        return int(abi), ""
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return 0, "the kernel was built without Landlock (CONFIG_SECURITY_LANDLOCK, Linux 5.13 or newer)"
    if err == errno.EOPNOTSUPP:
        return 0, "Landlock is built into the kernel but not enabled (add landlock to the lsm= boot parameter)"
    return 0, f"the Landlock probe failed: {os.strerror(err) if err else 'unknown error'}"


def landlock_abi() -> int:
    return probe()[0]


def unavailable_message() -> str:
    """What to tell a user who asked for the sandbox on a system without it."""
    _, why = probe()
    return (f"--sandbox on: the shell sandbox needs Linux Landlock, and this system (kernel {platform.release()}) "
            f"has none: {why}. Use a kernel with Landlock (5.13 or newer, enabled; 6.7 or newer to also restrict "
            "the network), or run with --sandbox auto (sandbox where available) or --sandbox off (rely on the "
            "approval policy alone)")


# --- configuration and policy ------------------------------------------------------------------------
SANDBOX_MODES = ("on", "off", "auto")


def parse_network(value: str) -> tuple[int, ...] | None:
    """``allow`` → None (unrestricted), ``deny`` → () (no TCP connect or bind), ``443,8000`` → those
    ports may be connected to (binding stays denied)."""
    text = str(value).strip().lower()
    if text == "allow":
        return None
    if text == "deny":
        return ()
    ports = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 65535:
            raise ValueError(f"sandbox network {value!r}: expected allow, deny or a comma-separated list of TCP "
                             f"ports (1-65535) to allow connecting to, e.g. 443,8000")
        ports.append(int(part))
    return tuple(sorted(set(ports)))


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
    def network_enforced(self) -> bool:
        return self.net_ports is not None and self.abi >= 4

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
        return [sys.executable, "-I", "-S", os.path.abspath(__file__), *self.wrapper_args(), "--",
                "/bin/sh", "-c", command]

    def describe(self) -> str:
        """One paragraph for the terminal and for the model."""
        reads = "everywhere" if self.readable is None else ", ".join(self.readable)
        if self.net_ports is None:
            net = "allowed"
        elif self.abi < 4:
            net = f"not restricted (Landlock ABI {self.abi} has no network control; 4 needed)"
        elif self.net_ports:
            net = f"TCP connections only to ports {', '.join(map(str, self.net_ports))}; no listening"
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
    abi = landlock_abi()
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


# --- building and applying a ruleset ---------------------------------------------------------------------
@dataclass
class Ruleset:
    handled_fs: int
    handled_net: int
    scoped: int
    paths: list[tuple[str, int]]      # (path, allowed rights)
    ports: list[tuple[int, int]]      # (TCP port, allowed rights)


def build_ruleset(abi: int, writable, readable=None, devices=(), net_ports=(), is_dir=os.path.isdir) -> Ruleset:
    """The ruleset for a policy on a kernel with Landlock ABI ``abi``: every right that ABI knows is
    handled (so denied unless a rule allows it); reads (with execute, and device ioctls) are allowed
    on ``/`` or on each ``readable`` path, all rights on each ``writable`` path, reading and writing on
    each device file. A rule on a file (not a directory) carries only the rights a file can take.
    ``net_ports``: None leaves TCP unhandled (allowed); () handles it with no rule (denied); ports get a
    connect rule each."""
    if abi < 1:
        raise ValueError(f"Landlock ABI {abi}: no Landlock")
    abi = min(abi, KNOWN_ABI)
    everything = fs_rights(abi)
    read = READ_RIGHTS & everything
    device = (FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV) & everything

    def rule(path: str, rights: int) -> tuple[str, int]:
        return path, rights if is_dir(path) else rights & FILE_RIGHTS

    paths = [rule(p, read) for p in (["/"] if readable is None else readable)]
    paths += [rule(p, everything) for p in writable]
    paths += [rule(p, device) for p in devices]
    handled_net = net_rights(abi) if net_ports is not None else 0
    ports = [(p, NET_CONNECT_TCP) for p in net_ports] if handled_net and net_ports else []
    return Ruleset(everything, handled_net, scopes(abi), paths, ports)


class SandboxError(OSError):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{what}: {os.strerror(err)}")
    return result


def apply_ruleset(rules: Ruleset, abi: int) -> None:
    """Restrict the calling thread (and everything it will start) to ``rules``. Irreversible."""
    libc = _syscall()
    attr = ruleset_attr(rules.handled_fs, rules.handled_net, rules.scoped, min(abi, KNOWN_ABI))
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), buf, ctypes.c_size_t(len(attr)),
                             ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        for path, allowed in rules.paths:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # a path that vanished since the policy was made: nothing to allow there
            try:
                rule = ctypes.create_string_buffer(path_beneath_attr(allowed, pfd), 12)
                _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                                    ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)),
                       f"landlock_add_rule({path})")
            finally:
                os.close(pfd)
        for port, allowed in rules.ports:
            rule = ctypes.create_string_buffer(net_port_attr(allowed, port), 16)
            _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                                ctypes.c_int(LANDLOCK_RULE_NET_PORT), rule, ctypes.c_uint32(0)),
                   f"landlock_add_rule(port {port})")
        _check(libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                          ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(fd)


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


# --- the wrapper: python -I -S sandbox.py [flags] -- COMMAND ... -----------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moonlet.agent.sandbox",
                                description="Run COMMAND under a Landlock sandbox: reads everywhere (or in the "
                                            "--read paths with --confine-reads), writes only in the --write paths "
                                            "and --device files, TCP as --network says.")
    p.add_argument("--write", action="append", default=[], metavar="PATH", help="a writable directory or file")
    p.add_argument("--read", action="append", default=[], metavar="PATH")
    p.add_argument("--confine-reads", action="store_true", help="read only the --read and --write paths")
    p.add_argument("--device", action="append", default=[], metavar="FILE", help="a device file to read and write")
    p.add_argument("--network", default="deny", help="allow, deny or ports to allow connecting to (443,8000)")
    p.add_argument("--abi", type=int, default=None, help="use this Landlock ABI version's rights (default: the "
                                                         "kernel's; lower ones test the downgrade)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")
    try:
        kernel = landlock_abi()
        if kernel < 1:
            raise SandboxError(errno.ENOSYS, probe()[1])
        abi = min(args.abi or kernel, kernel)
        rules = build_ruleset(abi, args.write, args.read if args.confine_reads else None, args.device,
                              parse_network(args.network))
        apply_ruleset(rules, abi)
    except (OSError, ValueError) as e:
        print(f"moonlet sandbox: could not apply the sandbox, so the command did not run: {e}", file=sys.stderr)
        return EXIT_SANDBOX_FAILED
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"moonlet sandbox: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126
    return 0  # (not reached)


if __name__ == "__main__":
    sys.exit(main())
