"""The kallsyms decoder against tables laid out the way scripts/kallsyms.c lays them.

Real tables (Debian 6.1, 6.12, 7.2) are decoded in the VM matrix and compared with the
same boot's /proc/kallsyms (tests/vm/test_dumps.py); here every address form, the
two-byte length of 6.1+ and the damaged-input paths.
"""
from __future__ import annotations

import struct

import pytest

from inspector.errors import InspectError
from inspector.kallsyms_mem import decode_kallsyms, has_kallsyms_tables
from tests.helpers.mkdump import add_kallsyms
from tests.helpers.synthcore import build

BIG = "x_big_" + "q" * 194


def _reader(k):
    def read(vaddr: int, size: int) -> bytes:
        off = vaddr - k.text
        if off < 0 or off + size > len(k.image):
            raise InspectError(f"{vaddr:#x} outside the image")
        return bytes(k.image[off:off + size])
    return read


def _decode(k, lines: str):
    info = dict(line.split("=", 1) for line in (k.vmcoreinfo_text() + lines).splitlines())
    return decode_kallsyms(info, _reader(k), "synthetic"), info


@pytest.mark.parametrize("form,percpu", [("absolute-percpu", "zero-based"),
                                         ("relative", "relative"),
                                         ("place-relative", "relative"),
                                         ("absolute", "zero-based"),
                                         ("absolute", "relative")])
def test_every_symbol_and_type_comes_back(form, percpu):
    k = build(percpu=percpu)
    before = dict(k.syms)
    table, _ = _decode(k, add_kallsyms(k, form))
    assert table.kallsyms_form == form
    assert len(before) > 20
    for name, addr in before.items():
        assert table.addresses[name] == addr, name
        assert table.types[name] == k.types[name], name
    assert table.addresses[BIG] == k.syms["_stext"] + 0x800      # the two-byte length
    assert table.kind == "kallsyms"


def test_zero_based_percpu_symbols_stay_offsets():
    k = build(percpu="zero-based")
    table, _ = _decode(k, add_kallsyms(k, "absolute-percpu"))
    assert table.addresses["espfix_stack"] == k.syms["espfix_stack"] < 0x100000
    assert table.types["espfix_stack"] == "A"


def test_older_kernel_is_refused_with_one_line():
    k = build(osrelease="5.10.0-30-amd64")
    info = dict(line.split("=", 1) for line in k.vmcoreinfo_text().splitlines())
    assert not has_kallsyms_tables(info)
    with pytest.raises(InspectError) as e:
        decode_kallsyms(info, _reader(k), "old.dump")
    assert "since Linux 6.0" in e.value.cause and "5fd8fea935a1" in e.value.cause
    assert "linux-image-5.10.0-30-amd64-dbg" in e.value.fix
    # the fix names no command-line option: the CLI words it for its command
    assert "--" not in e.value.fix and "{symbols}" in e.value.fix
    assert "as --symbols-a (Debian" in e.value.line({"symbols": "--symbols-a"})


def test_offsets_that_fit_no_form_are_refused():
    k = build()
    lines = add_kallsyms(k, "absolute-percpu")
    info = dict(line.split("=", 1) for line in (k.vmcoreinfo_text() + lines).splitlines())
    base = int(info["SYMBOL(kallsyms_relative_base)"], 16)
    k._raw_put(base, struct.pack("<Q", 0xFFFFFFFF81234000))     # a wrong base
    with pytest.raises(InspectError) as e:
        decode_kallsyms(info, _reader(k), "bad.dump")
    assert "no reading of kallsyms_offsets agrees" in e.value.cause


def test_damaged_name_stream_is_refused():
    k = build()
    lines = add_kallsyms(k, "absolute-percpu")
    info = dict(line.split("=", 1) for line in (k.vmcoreinfo_text() + lines).splitlines())
    names = int(info["SYMBOL(kallsyms_names)"], 16)
    k._raw_put(names, b"\x00\x00\x00")                          # zero-length names
    with pytest.raises(InspectError) as e:
        decode_kallsyms(info, _reader(k), "bad.dump")
    assert "does not decode" in e.value.cause


def test_absurd_symbol_count_is_refused():
    k = build()
    lines = add_kallsyms(k, "absolute-percpu")
    info = dict(line.split("=", 1) for line in (k.vmcoreinfo_text() + lines).splitlines())
    k._raw_put(int(info["SYMBOL(kallsyms_num_syms)"], 16), struct.pack("<I", 0xFFFFFFFF))
    with pytest.raises(InspectError) as e:
        decode_kallsyms(info, _reader(k), "bad.dump")
    assert "kallsyms_num_syms reads as 4294967295" in e.value.cause
