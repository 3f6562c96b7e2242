"""Linux Landlock through ctypes (no dependencies): the ABI's access rights per version, its structs,
the kernel probe, rulesets and applying them — and the wrapper the agent's shell runs sandboxed
commands through: ``python -I -S landlock.py [flags] -- /bin/sh -c COMMAND`` restricts itself
(``prctl(PR_SET_NO_NEW_PRIVS)``, then ``landlock_create_ruleset`` / ``landlock_add_rule`` /
``landlock_restrict_self``) and ``exec``s the command, which inherits the restrictions, as does all it
starts. If the sandbox cannot be applied it prints why and exits with code 125 without running the
command (it fails closed).

This file imports only small standard modules (no dataclasses, argparse, tempfile: each run pays for
its imports: about 10 ms here, against about 100 ms with those), and is started by its path with ``-I -S``
so neither the moonlet package nor site-packages are loaded. The policy (what is writable, the
network) is decided by the agent in ``moonlet.agent.sandbox``.

Access rights are those the running kernel knows (``landlock_create_ruleset(NULL, 0,
LANDLOCK_CREATE_RULESET_VERSION)`` gives its ABI version); rights newer than it are left out of the
ruleset (the documented best-effort downgrade), so the same policy works from ABI 1 (Linux 5.13) on;
``moonlet.agent.sandbox`` names what an older kernel cannot enforce.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

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
    if (handled_net and abi < 4) or scoped:
        raise ValueError(f"Landlock ABI {abi} cannot handle network rights or scopes")
    return struct.pack("=QQ", handled_fs, handled_net) if abi >= 4 else struct.pack("=Q", handled_fs)


def path_beneath_attr(allowed: int, parent_fd: int) -> bytes:
    """``struct landlock_path_beneath_attr``: ``__u64 allowed_access; __s32 parent_fd``, packed (12 bytes)."""
    return struct.pack("=Qi", allowed, parent_fd)


def net_port_attr(allowed: int, port: int) -> bytes:
    """``struct landlock_net_port_attr``: ``__u64 allowed_access; __u64 port`` (16 bytes)."""
    return struct.pack("=QQ", allowed, port)


# --- probing the kernel ---------------------------------------------------------------------------------
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
        return 0, f"Landlock is a Linux feature and this is {sys.platform}"
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


# --- building and applying a ruleset ---------------------------------------------------------------------
class Ruleset:
    """The handled rights and the rules of one sandbox (``paths``: (path, allowed rights); ``ports``:
    (TCP port, allowed rights))."""

    def __init__(self, handled_fs: int, handled_net: int, scoped: int, paths: list, ports: list):
        self.handled_fs, self.handled_net, self.scoped = handled_fs, handled_net, scoped
        self.paths, self.ports = paths, ports


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


# --- the wrapper: python -I -S landlock.py [flags] -- COMMAND ... ------------------------------------------
USAGE = """usage: python -m moonlet.agent.landlock [--write=PATH ...] [--device=FILE ...] [--confine-reads
       --read=PATH ...] [--network=allow|deny|PORTS] [--abi=N] -- COMMAND [ARG ...]

Run COMMAND under a Landlock sandbox: reads everywhere (with --confine-reads only in the --read and
--write paths), writes only in the --write paths and the --device files, TCP as --network says (deny:
none; allow: all; 443,8000: connections to those ports). --abi uses an older ABI version's rights (to
test the downgrade)."""


def parse_args(argv: list[str]) -> dict:
    """The wrapper's flags (hand-parsed: argparse would double its start-up time)."""
    opts: dict = {"write": [], "read": [], "device": [], "network": "deny", "abi": None, "confine_reads": False}
    for i, arg in enumerate(argv):
        if arg == "--":
            opts["command"] = argv[i + 1:]
            break
        name, eq, value = arg.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else ""
        if arg == "--confine-reads":
            opts["confine_reads"] = True
        elif key in ("write", "read", "device") and eq:
            opts[key].append(value)
        elif key == "network" and eq:
            opts["network"] = value
        elif key == "abi" and eq and value.isdigit():
            opts["abi"] = int(value)
        else:
            raise ValueError(f"unknown or incomplete argument {arg!r}")
    if not opts.get("command"):
        raise ValueError("no command given (put it after --)")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        opts = parse_args(argv)
    except ValueError as e:
        print(f"{USAGE}\n\nmoonlet sandbox: {e}", file=sys.stderr)
        return 2
    command = opts["command"]
    try:
        kernel = landlock_abi()
        if kernel < 1:
            raise SandboxError(errno.ENOSYS, probe()[1])
        abi = min(opts["abi"] or kernel, kernel)
        rules = build_ruleset(abi, opts["write"], opts["read"] if opts["confine_reads"] else None, opts["device"],
                              parse_network(opts["network"]))
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
