#!/bin/sh
# Guest side of `python3 -m tests.vm observe`: kernel facts the inspector relies on.
sec() { echo; echo "## $*"; }
sec uname -r; uname -r
sec /proc/cmdline; cat /proc/cmdline
sec 'cpu possible/present/online'
for f in possible present online; do
    printf '%s: %s\n' $f "$(cat /sys/devices/system/cpu/$f)"
done
printf 'nodes online: %s\n' "$(cat /sys/devices/system/node/online 2>/dev/null)"
for n in /sys/devices/system/node/node[0-9]*; do
    [ -d "$n" ] && printf '%s cpus: %s, %s\n' "${n##*/}" "$(cat $n/cpulist)" \
        "$(grep -m1 MemTotal $n/meminfo | sed 's/.*MemTotal: *//')"
done
sec kallsyms
grep -E ' (espfix_stack|espfix_waddr|espfix_pages|espfix_pud_page|page_random|slot_random|__per_cpu_offset|__per_cpu_start|__cpu_possible_mask|__cpu_online_mask|nr_cpu_ids|page_offset_base|phys_base|__pgtable_l5_enabled|__supported_pte_mask|init_top_pgt|linux_banner|_text|_stext)$' /proc/kallsyms
sec meltdown; cat /sys/devices/system/cpu/vulnerabilities/meltdown
sec 'pti (cpuinfo flag, dmesg)'
grep -m1 vendor_id /proc/cpuinfo
printf 'pti flag: %s\n' "$(grep -m1 -o -w pti /proc/cpuinfo)"
dmesg | grep -i 'page tables isolation' || echo '(no page tables isolation line in dmesg)'
printf 'kptr_restrict=%s\n' "$(cat /proc/sys/kernel/kptr_restrict)"
sec fred; grep -o 'fred' /proc/cpuinfo | head -1; echo "(empty line above = no fred flag)"
sec 'VMCOREINFO (OFFSET/SIZE/LENGTH lines omitted except mem_section; full note: python3 tests/vm/vmcoreinfo.py)'
python3 tests/vm/vmcoreinfo.py | grep -Ev '^(OFFSET|SIZE|LENGTH)\(' ; echo
python3 tests/vm/vmcoreinfo.py | grep -E '^(SIZE|LENGTH)\(mem_section\)'
