"""``diff``: how two machines' (or two boots') espfix states differ.

Each side is either an ELF core that carries or is given its symbols (an
espfix-inspect snapshot, or a vmcore with ``--symbols-a/-b``), validated here
exactly as ``validate --core`` would, or a ``validate --json`` document saved
earlier.  Both become the ``validate --json`` shape (``inspector/report.py``
``validate_json``), and these are compared:

- the kernel: release, paging levels, PTI, per-CPU convention, KASLR offset,
  direct-map base, ``nr_cpu_ids``, SME mask, ``__supported_pte_mask``;
- the randomisation: ``page_random``/``slot_random`` are drawn at boot by
  ``init_espfix_random()`` (``arch/x86/kernel/espfix_64.c``), so two boots
  differ and every ``espfix_stack`` moves with them;
- the CPUs: possible/online/initialised lists, and per CPU online,
  initialised, verdict and NUMA nodes (grouped: one row per change, with the
  CPUs it concerns);
- the findings (by check, severity, CPU and scope) and the verdict.

Paths, capture times and physical addresses (which differ on every boot by
allocation) are not compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .audit import audit
from .errors import InspectError
from .fileio import MiB, open_regular, read_bounded
from .hostfacts import target_host_facts
from .model import format_cpu_list
from .report import validate_json
from .schema import schema_file, schema_id
from .state import load_state
from .target import open_target

__all__ = ["Side", "load_side", "diff_docs", "diff_json", "diff_text"]

KERNEL_FIELDS = (
    ("osrelease", "kernel release"),
    ("levels", "paging levels"),
    ("pti", "page-table isolation"),
    ("percpu", "per-CPU symbol convention (relative since 6.15)"),
    ("nr_cpu_ids", "CPU ids the kernel allows"),
    ("kaslr_offset", "KASLR offset: another boot or another build"),
    ("page_offset_base", "direct-map base (randomised with KASLR)"),
    ("sme_mask", "SME C-bit"),
    ("supported_pte_mask", "__supported_pte_mask (NX support)"),
)
RANDOM_FIELDS = (
    ("page_random_effective", "page_random: drawn at boot by init_espfix_random()"),
    ("slot_random_effective", "slot_random: drawn at boot by init_espfix_random()"),
    ("randomness_source", "where the randomisation was read (statics or inferred)"),
)
CPU_LIST_FIELDS = (
    ("cpus_possible", "possible CPUs"),
    ("cpus_online", "online CPUs"),
    ("cpus_initialised", "CPUs with a ministack"),
)
PER_CPU_FIELDS = ("online", "initialised", "ok", "node", "stack_node")


@dataclass
class Side:
    path: str
    kind: str                # snapshot, core, validate-json
    doc: dict


@dataclass
class Difference:
    section: str
    key: str
    a: object
    b: object
    note: str = ""

    def as_dict(self) -> dict:
        return {"section": self.section, "key": self.key, "a": self.a, "b": self.b,
                "note": self.note}


@dataclass
class DiffResult:
    a: Side
    b: Side
    relation: str
    differences: list[Difference] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.differences


#: A validate --json document of 131,072 CPUs is about 40 MiB.
MAX_JSON = 256 * MiB
SCHEMA = Path(schema_file("validate"))


def check_validate_doc(doc: object, path: str) -> dict:
    """*doc* if it is a ``validate --json`` document (schemas/validate.schema.json),
    else InspectError naming the first wrong field.  jsonschema (Debian:
    python3-jsonschema) does the checking: the schema is the one description of the
    document, for the tests, the docs and this input boundary alike.  A document of
    another major version (its ``schema`` key) is refused by name before that."""
    import jsonschema
    want = schema_id("validate")
    if isinstance(doc, dict) and doc.get("schema") != want:
        got = doc.get("schema")
        raise InspectError(f"{path} is a {str(got)[:60]!r} document, not {want}"
                           if isinstance(got, str) else
                           f"{path} has no schema key: it is not a validate --json document "
                           f"of {want} (espfix-inspect before its JSON was versioned?)",
                           "pass the output of this version's espfix-inspect validate --json "
                           "(or a snapshot)")
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise InspectError(f"{path} is not a validate --json document: at {where}: "
                           f"{error.message[:200]}",
                           "pass the output of espfix-inspect validate --json, or a snapshot")
    assert isinstance(doc, dict)
    return doc


def load_side(path: str, symbols: str | None = None) -> Side:
    """Read one side: an ELF core (validated now) or a ``validate --json`` file."""
    fix = "pass a snapshot or a validate --json file"
    with open_regular(path, "diff input", fix) as f:
        head = f.read(4)
        if head != b"\x7fELF":
            f.seek(0)
            data = read_bounded(f, path, "validate --json document", MAX_JSON)
    if head == b"\x7fELF":
        target = open_target(path, symbols)
        try:
            state = load_state(target, target_host_facts(target))
            doc = validate_json(state, audit(state))
            kind = "snapshot" if target.meta else "core"
        finally:
            target.close()
        return Side(path, kind, doc)
    if symbols is not None:
        raise InspectError(f"symbols were given for {path}, which is not an ELF core",
                           "--symbols-a/-b go with cores only")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InspectError(f"{path} is neither an ELF core nor JSON ({str(e)[:120]})",
                           "pass a snapshot (espfix-inspect snapshot) or the output of "
                           "espfix-inspect validate --json") from None
    return Side(path, "validate-json", check_validate_doc(doc, path))


def _relation(ka: dict, kb: dict) -> str:
    if ka.get("osrelease") != kb.get("osrelease"):
        return "different kernels"
    same_boot = all(ka.get(k) == kb.get(k) for k in
                    ("kaslr_offset", "page_offset_base", "page_random_effective",
                     "slot_random_effective"))
    return "same boot" if same_boot else "same kernel release, different boots"


def _finding_key(f: dict) -> tuple:
    return (f.get("check"), f.get("severity"), f.get("cpu"), f.get("cpus"))


def _fmt_finding(f: dict) -> str:
    cpu = "" if f.get("cpu") is None else f" cpu{f['cpu']}"
    aff = f" (CPUs {f['cpus']})" if f.get("cpus") else ""
    return f"{f.get('severity')} {f.get('check')}{cpu}{aff}: {f.get('message')}"


def diff_docs(a: Side, b: Side) -> DiffResult:
    ka, kb = a.doc["kernel"], b.doc["kernel"]
    res = DiffResult(a, b, _relation(ka, kb))
    out = res.differences
    for key, note in KERNEL_FIELDS:
        if ka.get(key) != kb.get(key):
            out.append(Difference("kernel", key, ka.get(key), kb.get(key), note))
    same_random = True
    for key, note in RANDOM_FIELDS:
        if ka.get(key) != kb.get(key):
            out.append(Difference("randomisation", key, ka.get(key), kb.get(key), note))
            same_random = same_random and key == "randomness_source"
    for key, note in CPU_LIST_FIELDS:
        if ka.get(key) != kb.get(key):
            out.append(Difference("cpus", key, ka.get(key), kb.get(key), note))

    # per CPU, grouped: one row per (field, value in A, value in B)
    ca = {c["cpu"]: c for c in a.doc["cpus"]}
    cb = {c["cpu"]: c for c in b.doc["cpus"]}
    groups: dict[tuple, list[int]] = {}
    moved: list[int] = []
    for cpu in sorted(set(ca) & set(cb)):
        for key in PER_CPU_FIELDS:
            va, vb = ca[cpu].get(key), cb[cpu].get(key)
            if va != vb:
                groups.setdefault((key, json.dumps(va), json.dumps(vb)), []).append(cpu)
        if ca[cpu].get("espfix_stack") != cb[cpu].get("espfix_stack"):
            moved.append(cpu)
    for (key, va, vb), cpus in groups.items():
        out.append(Difference("cpu", f"{key} (CPUs {format_cpu_list(cpus)})",
                              json.loads(va), json.loads(vb),
                              "ministack verdict" if key == "ok" else ""))
    if moved and same_random:
        out.append(Difference("cpu", f"espfix_stack (CPUs {format_cpu_list(moved)})",
                              "per CPU", "per CPU", "same randomisation, yet the ministack "
                              "addresses differ"))

    fa = {_finding_key(f): f for f in a.doc["findings"]}
    fb = {_finding_key(f): f for f in b.doc["findings"]}
    for fkey in sorted(fa.keys() - fb.keys(), key=repr):
        out.append(Difference("findings", "only in A", _fmt_finding(fa[fkey]), None))
    for fkey in sorted(fb.keys() - fa.keys(), key=repr):
        out.append(Difference("findings", "only in B", None, _fmt_finding(fb[fkey])))
    for fkey in sorted(fa.keys() & fb.keys(), key=repr):
        if fa[fkey].get("message") != fb[fkey].get("message"):
            out.append(Difference("findings", "message", _fmt_finding(fa[fkey]),
                                  _fmt_finding(fb[fkey]), "same check, CPU and scope"))
    if a.doc.get("ok") != b.doc.get("ok"):
        out.append(Difference("verdict", "ok", a.doc.get("ok"), b.doc.get("ok")))
    return res


def _side_json(s: Side) -> dict:
    return {"path": s.path, "kind": s.kind, "osrelease": s.doc["kernel"].get("osrelease"),
            "ok": s.doc.get("ok"), "summary": s.doc.get("summary")}


def diff_json(res: DiffResult) -> dict:
    return {"schema": schema_id("diff"), "same": res.same, "relation": res.relation, "a": _side_json(res.a),
            "b": _side_json(res.b), "differences": [d.as_dict() for d in res.differences]}


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def diff_text(res: DiffResult) -> str:
    from tabulate import tabulate
    lines = []
    for tag, s in (("A", res.a), ("B", res.b)):
        sm = s.doc.get("summary") or {}
        verdict = "OK" if s.doc.get("ok") else "FINDINGS"
        lines.append(f"{tag}: {s.path} ({s.kind}, {s.doc['kernel'].get('osrelease')}, {verdict}: "
                     f"{sm.get('error', '?')} error(s), {sm.get('warning', '?')} warning(s), "
                     f"{sm.get('info', '?')} info)")
    lines.append(f"relation: {res.relation}")
    lines.append("")
    if res.same:
        lines.append("no differences in kernel, randomisation, CPUs, findings or verdict")
        return "\n".join(lines)
    rows = [[d.section, d.key, _cell(d.a), _cell(d.b), d.note] for d in res.differences
            if d.section != "findings"]
    if rows:
        lines.append(tabulate(rows, headers=["SECTION", "WHAT", "A", "B", "NOTE"],
                              tablefmt="simple", disable_numparse=True))
        lines.append("")
    found = [d for d in res.differences if d.section == "findings"]
    for d in found:            # messages are long: one line each, not a table column
        if d.key == "message":
            lines.append(f"finding changed: A {d.a}")
            lines.append(f"                 B {d.b}")
        else:
            lines.append(f"finding {d.key}: {d.a if d.a is not None else d.b}")
    if found:
        lines.append("")
    lines.append(f"result: {len(res.differences)} difference(s)")
    return "\n".join(lines)
