"""snapshot: a small core that validates offline exactly as the source did."""


from inspector.cli import main
from tests.helpers import jsonschemas
from tests.conftest import kernel


def test_snapshot_gives_the_same_findings(capsys, write_kernel, tmp_path):
    k = kernel(nr_cpus=8, online=[0, 1, 2, 3], pti=True,
               frames={1: (0x11, 0x401000, 0x33, 0x246, 0x7FFD1234ABC0, 0x7)})
    k.set_percpu(2, "espfix_waddr", k.get_percpu(2, "espfix_waddr") + 0x1000)   # a finding
    core, syms = write_kernel(k)
    assert main(["validate", "--json", "--core", core, "--symbols", syms]) == 1
    live = jsonschemas.loads(capsys.readouterr().out)
    snap = str(tmp_path / "snap.core")
    assert main(["snapshot", "--core", core, "--symbols", syms, "-o", snap]) == 0
    capsys.readouterr()
    assert main(["validate", "--json", "--core", snap]) == 1
    offline = jsonschemas.loads(capsys.readouterr().out)
    assert offline["findings"] == live["findings"]
    assert offline["cpus"] == live["cpus"]
    for key in ("osrelease", "levels", "pti", "kaslr_offset", "page_offset_base",
                "cpus_online", "cpus_initialised"):
        assert offline["kernel"][key] == live["kernel"][key]
    assert main(["stacks", "--json", "--core", core, "--symbols", syms]) == 0
    live_stacks = jsonschemas.loads(capsys.readouterr().out)
    assert main(["stacks", "--json", "--core", snap]) == 0
    assert jsonschemas.loads(capsys.readouterr().out) == live_stacks
    assert live_stacks["cpus"][1]["frame"]["ss"] == "0x7"
    size = (tmp_path / "snap.core").stat().st_size
    assert size < 100_000, size


def test_snapshot_write_is_atomic(capsys, write_kernel, tmp_path, monkeypatch):
    import inspector.fileio as ew
    core, syms = write_kernel(kernel())
    out = tmp_path / "snap.core"
    out.write_bytes(b"previous")

    def boom(*a, **kw):
        raise OSError("disk full")
    monkeypatch.setattr(ew.os, "fsync", boom)
    assert main(["snapshot", "--core", core, "--symbols", syms, "-o", str(out)]) == 2
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".snap")] == []
    assert "cannot write snapshot" in capsys.readouterr().err
