"""Host side of the dump tests: read real dumps of a real guest with nothing but the dump.

Given the directory the guest filled (live ``stacks --json``/``validate --json`` taken
just before the dump, its /proc/kallsyms) and the dumps QEMU or makedumpfile wrote:

- ``validate --core DUMP --json`` and ``stacks --core DUMP --json``, without
  ``--symbols`` and as an unprivileged user (``setpriv`` to nobody), must give the live
  run's layout, findings and ministack frames;
- the symbols decoded from the dump's kallsyms tables must equal the boot's
  /proc/kallsyms, name for name;
- every online CPU must have registers, and none may be placed in espfix unless the
  kernel really was there;
- drgn, where it can be imported, must read the same frames at the same
  ``espfix_stack`` addresses through its own page-table walk (a peer, not our code).

Everything here returns a list of problems (empty = pass) and the timings, so that
tests/vm/test_matrix.py can fail with all of them at once and print the costs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _python_with(module: str) -> str | None:
    """An interpreter that can import *module*: ours, else Debian's."""
    for py in (sys.executable, "/usr/bin/python3"):
        if Path(py).exists() and subprocess.run(
                [py, "-c", f"import {module}"], capture_output=True).returncode == 0:
            return py
    return None


def host_cannot_read_dumps() -> str | None:
    """Why this interpreter cannot read dumps (so the dump checks must skip), or None."""
    try:
        import kdumpfile  # noqa: F401
    except ImportError:
        return (f"{sys.executable} cannot import kdumpfile (Debian python3-libkdumpfile is "
                "built for /usr/bin/python3 only: make .venv from it)")
    return None


def run_tool(args: list[str], unprivileged: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as nobody when we are root (dumps need no root)."""
    argv = [sys.executable, "-m", "inspector", *args]
    if unprivileged and os.geteuid() == 0 and shutil.which("setpriv"):
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    return subprocess.run(argv, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT),
                               "PYTHONDONTWRITEBYTECODE": "1"})


def open_to_nobody(share: Path) -> None:
    """QEMU writes dumps 0600 root and mkdtemp makes the share 0700: let nobody read."""
    for p in [share, *share.rglob("*")]:
        try:
            p.chmod(p.stat().st_mode | (0o055 if p.is_dir() else 0o044))
        except OSError:
            pass


def _strip_kernel(doc: dict) -> dict:
    """What a dump must reproduce of a live ``validate --json``: all but where it was
    read from, and the NUMA nodes, which come from the live machine's sysfs."""
    doc = json.loads(json.dumps(doc))
    for key in ("core", "symbols", "live", "notes"):
        doc["kernel"].pop(key, None)
    for row in doc["cpus"]:
        row.pop("node", None)
        row.pop("stack_node", None)
    return doc


def _kallsyms(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and len(parts) == 3:          # no [module]
            out.setdefault(parts[2], int(parts[0], 16))
    return out


def check_symbols(dump: Path, kallsyms: Path) -> list[str]:
    """The dump's decoded kallsyms against the boot's /proc/kallsyms."""
    from inspector.target import open_target
    target = open_target(str(dump))
    try:
        decoded = target.symbols.addresses
        truth = _kallsyms(kallsyms)
        missing = [n for n in truth if n not in decoded]
        wrong = [n for n in truth if n in decoded and decoded[n] != truth[n]]
        problems = []
        if missing:
            problems.append(f"{dump.name}: {len(missing)} /proc/kallsyms names not decoded, "
                            f"e.g. {missing[:3]}")
        if wrong:
            n = wrong[0]
            problems.append(f"{dump.name}: {len(wrong)} addresses differ from /proc/kallsyms, "
                            f"e.g. {n} {decoded[n]:#x} != {truth[n]:#x}")
        if len(truth) < 50_000:
            problems.append(f"{kallsyms}: only {len(truth)} symbols: not a full kallsyms")
        return problems
    finally:
        target.close()


def check_dump(dump: Path, live_stacks: dict, live_validate: dict | None,
               timings: dict) -> tuple[list[str], dict | None]:
    """One dump against the live run.  Returns (problems, the dump's stacks JSON)."""
    problems: list[str] = []
    t0 = time.monotonic()
    v = run_tool(["validate", "--core", str(dump), "--json"])
    timings[f"validate {dump.name}"] = round(time.monotonic() - t0, 2)
    t0 = time.monotonic()
    s = run_tool(["stacks", "--core", str(dump), "--json"])
    timings[f"stacks {dump.name}"] = round(time.monotonic() - t0, 2)
    if v.returncode != (0 if live_validate is None or live_validate["ok"] else 1):
        problems.append(f"validate --core {dump.name} exited {v.returncode}: {v.stderr.strip()}")
        return problems, None
    if s.returncode != 0:
        problems.append(f"stacks --core {dump.name} exited {s.returncode}: {s.stderr.strip()}")
        return problems, None
    vdoc, sdoc = json.loads(v.stdout), json.loads(s.stdout)
    if live_validate is not None and _strip_kernel(vdoc) != _strip_kernel(live_validate):
        a, b = _strip_kernel(vdoc), _strip_kernel(live_validate)
        diff = [k for k in a["kernel"] if a["kernel"].get(k) != b["kernel"].get(k)]
        problems.append(f"validate --core {dump.name} differs from the live run: kernel "
                        f"{diff}, findings {a['findings'] != b['findings']}, cpus "
                        f"{a['cpus'] != b['cpus']}")
    rows = [{k: v for k, v in c.items() if k != "crash"} for c in sdoc["cpus"]]
    if rows != live_stacks["cpus"]:
        problems.append(f"stacks --core {dump.name}: ministacks differ from the live run: "
                        f"{rows} != {live_stacks['cpus']}")
    if not any(c["frame"] for c in rows):
        problems.append(f"stacks --core {dump.name}: no ministack frame (exercise ran before)")
    crash = {c["cpu"]: c.get("crash") for c in sdoc["cpus"]}
    online = [c["cpu"] for c in sdoc["cpus"] if c["online"]]
    no_regs = [c for c in online if not crash.get(c)]
    if no_regs:
        problems.append(f"{dump.name}: no registers for online CPU(s) {no_regs}")
    return problems, sdoc


DRGN_FRAMES = r"""
import json, struct, sys
import drgn
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
out = {}
for cpu, addr in json.loads(sys.argv[2]).items():
    out[cpu] = ["%#x" % w for w in struct.unpack("<6Q", prog.read(int(addr, 16), 48))]
print(json.dumps({"version": drgn.__version__, "frames": out}))
"""


def check_drgn(dump: Path, sdoc: dict) -> tuple[list[str], str]:
    """drgn reads the ministacks at ``espfix_stack`` (its own page-table walk)."""
    py = _python_with("drgn")
    if py is None:
        return [], "drgn not importable here: skipped"
    want = {str(c["cpu"]): c["espfix_stack"] for c in sdoc["cpus"] if c["frame"]}
    from inspector.kdump import _reassemble_flattened, sniff
    flat = None
    path = str(dump)
    if sniff(path) == "flattened":
        # drgn opens kdump files through the same libkdumpfile, which reads the
        # flattened stream natively only from 0.5.5: give it the reassembled file
        with open(path, "rb") as src:
            flat = _reassemble_flattened(src, path)
        path = f"/proc/{os.getpid()}/fd/{flat.fileno()}"
    try:
        proc = subprocess.run([py, "-c", DRGN_FRAMES, path, json.dumps(want)],
                              capture_output=True, text=True, pass_fds=(flat.fileno(),)
                              if flat is not None else ())
    finally:
        if flat is not None:
            flat.close()
    return compare_drgn(dump.name, sdoc, proc.returncode, proc.stdout, proc.stderr, py)


#: drgn failures that are drgn's (or its libkdumpfile's) limits, not a wrong dump:
#: libkdumpfile 0.5.1 learns the architecture of a kdump-compressed dump from the
#: header's utsname, which QEMU leaves empty but for `machine`; drgn 0.0.22 cannot
#: translate kernel addresses in an ELF dump whose PT_LOADs have no virtual addresses
#: (QEMU's dump without paging).
DRGN_LIMITS = ("KDUMP_ATTR_ARCH_NAME", "recursive address translation")


def compare_drgn(name: str, sdoc: dict, rc: int, out: str, err: str,
                 where: str) -> tuple[list[str], str]:
    if rc != 0:
        limit = next((m for m in DRGN_LIMITS if m in err), None)
        if limit is not None:
            return [], f"drgn ({where}) cannot open {name}: {limit} (a drgn/libkdumpfile limit)"
        return [f"drgn ({where}) could not read {name}: {err.strip()[-400:]}"], "failed"
    doc = json.loads(out)
    problems = []
    words = ("rax", "rip", "cs", "rflags", "rsp", "ss")
    compared = 0
    for c in sdoc["cpus"]:
        if not c["frame"]:
            continue
        compared += 1
        ours = [c["frame"][w] for w in words]
        if doc["frames"][str(c["cpu"])] != ours:
            problems.append(f"drgn {doc['version']} reads CPU {c['cpu']}'s ministack in "
                            f"{name} as {doc['frames'][str(c['cpu'])]}, we read {ours}")
    return problems, f"drgn {doc['version']} ({where}): {compared} frame(s) compared in {name}"


def check_novmci(dump: Path) -> list[str]:
    r = run_tool(["validate", "--core", str(dump)])
    want = "has no VMCOREINFO: it was written by QEMU's dump-guest-memory"
    if r.returncode != 2 or want not in r.stderr or r.stderr.count("\n") != 1:
        return [f"{dump.name} (taken before qemu_fw_cfg was loaded): expected one line "
                f"'{want}...', got exit {r.returncode}: {r.stderr.strip()}"]
    return []


def check_share(share: Path, expect: list[str], *, symbols: bool = True,
                drgn: bool = True, novmci: bool = False) -> dict:
    """All checks for one VM run; *expect* names the dumps that must be there."""
    dumps = share / "dumps"
    report: dict = {"problems": [], "timings": {}, "sizes": {}, "notes": []}
    if not (dumps / "live-stacks.json").exists():
        report["problems"].append("the guest saved no live-stacks.json: its dump test did "
                                  "not run")
        return report
    open_to_nobody(share)
    live_stacks = json.loads((dumps / "live-stacks.json").read_text())
    live_validate = json.loads((dumps / "live-validate.json").read_text())
    gt = dumps / "guest-timings.json"
    if gt.exists():
        report["timings"]["guest requests"] = json.loads(gt.read_text())
    for name in expect:
        dump = dumps / name
        if not dump.exists():
            report["problems"].append(f"{name} was not written")
            continue
        report["sizes"][name] = dump.stat().st_size
        problems, sdoc = check_dump(dump, live_stacks, live_validate, report["timings"])
        report["problems"] += problems
        if sdoc is not None:
            report.setdefault("crash", {})[name] = {
                **sdoc["crash"],
                "cpus": {str(c["cpu"]): c["crash"] for c in sdoc["cpus"] if c.get("crash")}}
            report["notes"].append(f"{name}: crash source: {sdoc['crash']['source']}")
            report["notes"] += [f"{name}: CPU {c['cpu']}: {c['crash']['verdict']} "
                                f"(RIP {c['crash']['rip_symbol']})"
                                for c in sdoc["cpus"] if c.get("crash")]
        if symbols and sdoc is not None:
            t0 = time.monotonic()
            report["problems"] += check_symbols(dump, dumps / "kallsyms")
            report["timings"][f"symbols {name}"] = round(time.monotonic() - t0, 2)
        if drgn and sdoc is not None:
            problems, note = check_drgn(dump, sdoc)
            report["problems"] += problems
            report["notes"].append(f"{name}: {note}")
    gd = dumps / "guest-drgn.json"
    if gd.exists():                     # the guest's own (newer) drgn on the same dumps
        for name, r in json.loads(gd.read_text()).items():
            problems, note = compare_drgn(name, live_stacks, r["rc"], r["out"], r["err"],
                                          "in the guest")
            report["problems"] += problems
            report["notes"].append(note)
    if novmci:
        dump = dumps / "novmci.kdump-zlib"
        if dump.exists():
            report["problems"] += check_novmci(dump)
        else:
            report["problems"].append("novmci.kdump-zlib was not written")
    return report
