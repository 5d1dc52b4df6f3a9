"""The pinned kernel matrix: which Debian kernel each suite boots, and the QEMU variants.

To move a pin: `python3 -m tests.vm pins` prints the current ABI, version and pool path
of each suite's linux-image package; copy them into KERNELS below.  Changing a pin
changes the image cache key, so the next run builds a fresh image.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kernel:
    suite: str                 # Debian suite debootstrap installs
    kver: str                  # kernel ABI: linux-image-KVER / linux-headers-KVER
    version: str               # exact Debian package version of both packages
    archive: str               # "debian" or "debian-security": where the pool files live
    image_pool: str            # pool path of the linux-image .deb (checked before a build)
    extra_suites: tuple[str, ...] = ()   # extra apt suites in the image's sources.list
    apt_options: tuple[str, ...] = ()    # lines for the image's apt.conf.d

    @property
    def packages(self) -> tuple[str, str]:
        return (f"linux-image-{self.kver}={self.version}",
                f"linux-headers-{self.kver}={self.version}")


@dataclass(frozen=True)
class Variant:
    name: str
    qemu_args: tuple[str, ...]          # -cpu / -smp / -numa / -object arguments
    cmdline: tuple[str, ...] = ()       # extra kernel command-line words
    mem_mb: int = 2048
    expect_possible: str = "0-3"        # /sys/devices/system/cpu/possible
    expect_present: str = "0-3"         # /sys/devices/system/cpu/present
    expect_online: str = "0-3"          # /sys/devices/system/cpu/online
    expect_nodes: str = "0"             # /sys/devices/system/node/online
    description: str = ""
    guest_args: str = "tests/guest"     # what test_matrix's in-guest pytest runs
    timeout_s: float = 1500.0            # test_matrix's VM time limit (ESPFIX_VM_TIMEOUT wins)
    # "script": guest-init.sh is PID 1 and runs the command; "systemd": the .deb is
    # installed and systemd boots, a unit runs the command (guest-systemd.sh)
    init: str = "script"


KERNELS: dict[str, Kernel] = {
    # Current bookworm ABI lives in bookworm-security (bookworm main had 6.1.0-50).
    "bookworm": Kernel(
        suite="bookworm", kver="6.1.0-56-amd64", version="6.1.192-2",
        archive="debian-security",
        image_pool="pool/updates/main/l/linux-signed-amd64/"
                   "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb",
        extra_suites=("bookworm-updates", "bookworm-security"),
    ),
    # trixie main; trixie-security already carried 6.12.118-1 when this was pinned.
    "trixie": Kernel(
        suite="trixie", kver="6.12.117+deb13-amd64", version="6.12.117-1",
        archive="debian",
        image_pool="pool/main/l/linux-signed-amd64/"
                   "linux-image-6.12.117+deb13-amd64_6.12.117-1_amd64.deb",
    ),
    # sid's Release file may be past Valid-Until: apt needs Check-Valid-Until=false.
    "sid": Kernel(
        suite="sid", kver="7.2.13+deb14-amd64", version="7.2.13-1",
        archive="debian",
        image_pool="pool/main/l/linux-signed-amd64/"
                   "linux-image-7.2.13+deb14-amd64_7.2.13-1_amd64.deb",
        apt_options=('Acquire::Check-Valid-Until "false";',),
    ),
}

_CPU_L5 = ("-cpu", "max")                 # QEMU max: AMD-like, LA57 -> 5-level, PTI off
_CPU_L4 = ("-cpu", "max,-la57")           # 4-level paging
_SMP4 = ("-smp", "4")

_NUMA2 = (
    "-object", "memory-backend-ram,id=mem0,size=1024M",
    "-object", "memory-backend-ram,id=mem1,size=1024M",
    "-numa", "node,nodeid=0,cpus=0-1,memdev=mem0",
    "-numa", "node,nodeid=1,cpus=2-3,memdev=mem1",
)

VARIANTS: dict[str, dict[str, Variant]] = {
    "bookworm": {
        "l5": Variant("l5", _CPU_L5 + _SMP4, description="5-level paging, PTI off"),
        "l4": Variant("l4", _CPU_L4 + _SMP4, description="4-level paging, PTI off"),
        "pti": Variant("pti", _CPU_L4 + _SMP4, ("pti=on",), description="4-level, PTI on"),
        "maxcpus8": Variant("maxcpus8", _CPU_L5 + ("-smp", "2,maxcpus=8"),
                            expect_possible="0-7", expect_present="0-1",
                            expect_online="0-1",
                            description="CPUs 2-7 possible, never online"),
        "numa2": Variant("numa2", _CPU_L5 + _SMP4 + _NUMA2, expect_nodes="0-1",
                         description="two NUMA nodes, 2 CPUs + 1 GiB each"),
        "maxcpus2": Variant("maxcpus2", _CPU_L5 + _SMP4, ("maxcpus=2",),
                            expect_possible="0-3", expect_online="0-1",
                            description="4 CPUs present, kernel brings up 2"),
        # The deployed path: the .deb, systemd as PID 1, node_exporter and Prometheus.
        # systemd.wants= pulls boot-complete.target in, as systemd-bless-boot-generator
        # does where boot counting is used, so the validate unit's ordering is real.
        "systemd": Variant("systemd", _CPU_L5 + ("-smp", "2"),
                           ("systemd.wants=boot-complete.target",),
                           expect_possible="0-1", expect_present="0-1", expect_online="0-1",
                           init="systemd", guest_args="tests/guest/test_deploy.py",
                           description="systemd as PID 1, the .deb, node_exporter, "
                                       "Prometheus"),
        "lockdown": Variant("lockdown", _CPU_L5 + ("-smp", "2"),
                            ("lockdown=confidentiality",), expect_possible="0-1",
                            expect_present="0-1", expect_online="0-1",
                            description="kernel lockdown: /proc/kcore refused"),
    },
    "trixie": {
        "l5pti": Variant("l5pti", _CPU_L5 + _SMP4, ("pti=on",),
                         description="5-level paging, PTI on"),
        "l4": Variant("l4", _CPU_L4 + _SMP4, ("pti=off",), description="4-level, PTI off"),
    },
    "sid": {
        "l5": Variant("l5", _CPU_L5 + _SMP4, description="5-level paging, PTI off"),
        "l4pti": Variant("l4pti", _CPU_L4 + _SMP4, ("pti=on",),
                         description="4-level paging, PTI on"),
    },
}


#: 72 vCPUs, the kernel brings up only cpu0 (maxcpus=1): CPUs 64-71 need a second
#: espfix stack page when they are onlined.  Slow under TCG (boot ~200-285 s on 6.1),
#: so these rows stay out of matrix() and run only when ESPFIX_VM_ROWS names them.
_SMP72 = ("-smp", "72,maxcpus=72")
_CPUS72 = dict(cmdline=("maxcpus=1",), mem_mb=4096, expect_possible="0-71",
               expect_present="0-71", expect_online="0",
               description="72 vCPUs, only cpu0 up at boot (mass onlining)",
               guest_args="-s tests/guest/test_smoke.py tests/guest/test_trace_mass_online.py",
               timeout_s=3600.0)

#: Rows kept out of the default matrix (and out of CI) because they cost minutes each;
#: name them explicitly: ESPFIX_VM_ROWS=bookworm:cpus72, or `run --variant cpus72`.
SLOW_VARIANTS: dict[str, dict[str, Variant]] = {
    "bookworm": {"cpus72": Variant("cpus72", _CPU_L5 + _SMP72, **_CPUS72)},
    "sid": {"cpus72": Variant("cpus72", _CPU_L5 + _SMP72, **_CPUS72)},
}


class MatrixError(ValueError):
    pass


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise MatrixError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}") from None


def get_variant(kernel: str, variant: str) -> Variant:
    get_kernel(kernel)
    try:
        return {**VARIANTS[kernel], **SLOW_VARIANTS.get(kernel, {})}[variant]
    except KeyError:
        known = ", ".join([*VARIANTS.get(kernel, {}), *SLOW_VARIANTS.get(kernel, {})])
        raise MatrixError(f"unknown variant {variant!r} for {kernel}; known: {known}") from None


def matrix() -> list[tuple[str, str]]:
    """All default (kernel, variant) rows, in a stable order (SLOW_VARIANTS left out)."""
    return [(k, v) for k in KERNELS for v in VARIANTS[k]]


def parse_rows(spec: str) -> list[tuple[str, str]]:
    """Parse 'bookworm:l5,sid:l5' (or 'sid' for all default sid variants) into matrix rows;
    a slow row is taken only when named ('bookworm:cpus72')."""
    rows: list[tuple[str, str]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kernel, _, variant = item.partition(":")
        if variant:
            get_variant(kernel, variant)
            rows.append((kernel, variant))
        else:
            get_kernel(kernel)
            rows.extend((kernel, v) for v in VARIANTS[kernel])
    return rows
