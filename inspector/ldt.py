"""The system calls `exercise` needs, through ctypes: modify_ldt, ptrace, mmap.

Only user-space state is touched: the child's own LDT, a page of its own memory and its
registers.  Nothing here reads or writes kernel memory.

Facts:
- ``struct user_desc``: arch/x86/include/uapi/asm/ldt.h (its bit fields, the LDT
  selector and the user selectors are x86 facts: :mod:`inspector.x86`).
- ``struct user_regs_struct`` (27 x u64): arch/x86/include/asm/user_64.h.
"""

from __future__ import annotations

import ctypes
import os

from .errors import InspectError

SYS_MODIFY_LDT = 154            # arch/x86/entry/syscalls/syscall_64.tbl
PTRACE_TRACEME, PTRACE_PEEKDATA, PTRACE_CONT = 0, 2, 7
PTRACE_KILL, PTRACE_GETREGS, PTRACE_SETREGS = 8, 12, 13
PTRACE_SETOPTIONS = 0x4200      # include/uapi/linux/ptrace.h
PTRACE_O_EXITKILL = 1 << 20     # SIGKILL the tracee when the tracer exits (since 3.8)
PR_SET_PDEATHSIG = 1            # include/uapi/linux/prctl.h
PROT_RWX = 0x1 | 0x2 | 0x4
MAP_SHARED, MAP_ANONYMOUS, MAP_32BIT = 0x01, 0x20, 0x40

class UserDesc(ctypes.Structure):
    """``struct user_desc``; the bit fields packed into one unsigned int
    (:data:`inspector.x86.USER_DESC_FIELDS`)."""
    _fields_ = [("entry_number", ctypes.c_uint), ("base_addr", ctypes.c_uint),
                ("limit", ctypes.c_uint), ("flags", ctypes.c_uint)]


def data16_desc(entry: int) -> UserDesc:
    """A 16-bit (seg_32bit=0) read/write data segment, base 0, 64 KiB limit: the kind of
    stack segment whose IRET restores only SP[15:0]."""
    return UserDesc(entry, 0, 0xFFFF, 0)


class UserRegs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
        "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
        "gs_base", "ds", "es", "fs", "gs")]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def modify_ldt_write(desc: UserDesc) -> None:
    """modify_ldt(1, desc): install an LDT entry in the calling process."""
    if _libc.syscall(SYS_MODIFY_LDT, 1, ctypes.byref(desc), ctypes.sizeof(desc)) != 0:
        raise _err("modify_ldt")


def die_with_parent(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): the kernel sends *sig* to the caller when its
    parent exits, however it exits (SIGKILL and the OOM killer included)."""
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise _err("prctl(PR_SET_PDEATHSIG)")


def ptrace(request: int, pid: int, addr: int = 0, data: object = None) -> int:
    ctypes.set_errno(0)
    arg = ctypes.byref(data) if isinstance(data, ctypes.Structure) else data
    r = _libc.ptrace(request, pid, ctypes.c_void_p(addr), arg)
    if r == -1 and ctypes.get_errno():
        raise _err(f"ptrace({request})")
    return r


def getregs(pid: int) -> UserRegs:
    regs = UserRegs()
    ptrace(PTRACE_GETREGS, pid, 0, regs)
    return regs


def setregs(pid: int, regs: UserRegs) -> None:
    ptrace(PTRACE_SETREGS, pid, 0, regs)


class SharedPage:
    """An RWX page below 2 GiB (MAP_32BIT), shared with children forked after it exists,
    so a compat-mode (32-bit) child can run code in it and the parent sees its counters."""

    SIZE = 4096

    def __init__(self) -> None:
        addr = _libc.mmap(None, self.SIZE, PROT_RWX, MAP_SHARED | MAP_ANONYMOUS | MAP_32BIT,
                          -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise InspectError(f"cannot map an executable page below 4 GiB: "
                               f"{os.strerror(e)}",
                               "allow PROT_EXEC mappings (SELinux execmem, noexec policies)")
        self.addr: int = addr
        self.buf = (ctypes.c_char * self.SIZE).from_address(addr)

    def write(self, off: int, data: bytes) -> None:
        ctypes.memmove(self.addr + off, data, len(data))

    def read(self, off: int, size: int) -> bytes:
        return ctypes.string_at(self.addr + off, size)

    def close(self) -> None:
        if self.addr:
            _libc.munmap(self.addr, self.SIZE)
            self.addr = 0
