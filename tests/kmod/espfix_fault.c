// SPDX-License-Identifier: GPL-2.0
/*
 * espfix_fault: TEST-ONLY fault injection into the live espfix64 state.
 *
 * This module exists for espfix-inspect's VM tests (tests/guest/test_faults_live.py)
 * and nothing else.  It breaks, on purpose and one at a time, what
 * init_espfix_ap() (arch/x86/kernel/espfix_64.c) and pti_setup_espfix64()
 * (arch/x86/mm/pti.c) set up, so that the tests can watch espfix-inspect catch
 * each fault in a real running kernel, then puts back exactly what it
 * overwrote.  Never load it on a machine you care about: while a fault is in
 * place, an IRET to a 16-bit LDT stack segment can fault, leak or crash.
 *
 * Control (debugfs, root):
 *   echo "inject FAULT CPU [ARG]" > /sys/kernel/debug/espfix_fault/control
 *   echo revert                   > /sys/kernel/debug/espfix_fault/control
 *   cat /sys/kernel/debug/espfix_fault/status
 *
 * FAULT (CPU is an online CPU with a ministack; ARG as noted):
 *   pte_rw, pte_user, pte_nx  one of the 32 PTE clones of CPU's stack page gets
 *                             _PAGE_RW / _PAGE_USER / loses _PAGE_NX (ARG: clone 0-31)
 *   pte_elsewhere             that PTE clone maps the module's scratch page (ARG: clone)
 *   pmd_clear, pmd_elsewhere  one of the 512 PMD clones of CPU's group cleared /
 *                             pointing at the scratch page (an empty PTE table) (ARG: 0-511)
 *   pud_clear, pud_elsewhere  one of the 4 PUD clones of CPU's group cleared /
 *                             pointing at the scratch page (an empty PMD table) (ARG: 0-3)
 *   stray_pte                 a present PTE (the scratch page, the clones' flags) in a
 *                             slot of CPU's PTE page that no stack page in use occupies
 *   stack_zero                per_cpu(espfix_stack, CPU) = 0
 *   stack_copy                per_cpu(espfix_stack, CPU) = per_cpu(espfix_stack, ARG)
 *   waddr_off                 per_cpu(espfix_waddr, CPU) moved by 64 bytes (+64, or -64
 *                             when +64 would leave the stack page)
 *   pages_elsewhere           espfix_pages[CPU / 64] = the scratch page
 *   pti_clear                 with PTI: the user page tables' espfix entry (what
 *                             pti_clone_p4d(ESPFIX_BASE_ADDR) copied) cleared
 *
 * Addresses: the module resolves everything itself with kallsyms_lookup_name(),
 * whose address a kprobe gives (not exported since Linux kernel commit 0bd476e6c671
 * ("kallsyms: unexport kallsyms_lookup_name() and kallsyms_on_each_symbol()") (in v5.7)).  No address comes
 * from user space, so a bad test can at worst pick the wrong fault, never make
 * the module write somewhere else.  Page-table entries are found by walking
 * init_top_pgt to the CPU's espfix_stack, the way the CPU does.
 *
 * TLB: every espfix PTE, PMD and PUD entry is visible at thousands of virtual
 * addresses (a PTE page hangs under 512 PMD clones and 4 PUD clones), so after a
 * page-table write the module calls the kernel's own flush_tlb_kernel_range()
 * over every alias the entry serves (the 4 GiB of a 1024-CPU group; 512 GiB for
 * the top-level PTI entry).  Above tlb_single_page_flush_ceiling that is a full
 * flush, global entries included, on every CPU (arch/x86/mm/tlb.c).  The per-CPU
 * words and espfix_pages[] are plain data: no flush.
 *
 * Writes are WRITE_ONCE() of the whole entry, which is what native_set_pte(),
 * native_set_pmd() and native_set_pud() do; the test VMs are KVM/TCG guests,
 * never Xen PV.  They happen under espfix_init_mutex, like init_espfix_ap()'s.
 * Every overwritten word is saved; "revert" and module unload restore them in
 * reverse order (and say so in the kernel log if one was changed meanwhile).
 *
 * No task may hold an LDT while a fault is in place (an espfix return runs only
 * for an LDT stack segment): injection is refused with EAGAIN if one does, and
 * the status file reports LDT holders seen at revert.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cpumask.h>
#include <linux/debugfs.h>
#include <linux/gfp.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/percpu.h>
#include <linux/pgtable.h>
#include <linux/rcupdate.h>
#include <linux/sched/signal.h>
#include <linux/sched/task.h>
#include <linux/seq_file.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <asm/cpufeature.h>
#include <asm/pgtable.h>

#define ESPFIX_STACKS_PER_PAGE	(PAGE_SIZE / 64)	/* espfix_64.c */
#define PTE_STRIDE		(65536 / PAGE_SIZE)	/* espfix_64.c */
#define ESPFIX_PTE_CLONES	(PTRS_PER_PTE / PTE_STRIDE)
#define ESPFIX_PMD_CLONES	PTRS_PER_PMD
#define ESPFIX_PUD_CLONES	4
#define GROUP_SPAN		(ESPFIX_PUD_CLONES * PUD_SIZE)	/* 4 GiB: one 1024-CPU group */
#define MAX_WRITES		2

/* PTI's option is CONFIG_MITIGATION_PAGE_TABLE_ISOLATION since v6.9 ("x86/bugs: Rename
 * CONFIG_PAGE_TABLE_ISOLATION => CONFIG_MITIGATION_PAGE_TABLE_ISOLATION"; sid 7.2 has the
 * new name, bookworm 6.1 the old one) */
#if defined(CONFIG_PAGE_TABLE_ISOLATION) || defined(CONFIG_MITIGATION_PAGE_TABLE_ISOLATION)
#define ESPFIX_FAULT_PTI 1
#endif

typedef unsigned long (*lookup_fn_t)(const char *name);
typedef void (*flush_range_fn_t)(unsigned long start, unsigned long end);
typedef void (*flush_all_fn_t)(void);

/* what kallsyms gave */
static lookup_fn_t lookup;
static pgd_t *init_top_pgt_p;
static unsigned long espfix_stack_sym, espfix_waddr_sym;	/* per-CPU symbols */
static void **espfix_pages_p;
static pud_t *espfix_pud_page_p;
static struct mutex *espfix_init_mutex_p;
static flush_range_fn_t flush_range;
static flush_all_fn_t flush_all;
static const char *flush_name;

static struct page *scratch;		/* zeroed; pointed at by the "elsewhere" faults */
static struct dentry *dir;
static DEFINE_MUTEX(lock);		/* one fault at a time */

struct saved_word {
	const char *what;
	unsigned long *where;
	unsigned long old, new;
	bool table;			/* a page-table entry: flush after writing */
};

static struct {
	char name[24];
	int cpu;
	long arg;
	int nwrites;
	struct saved_word w[MAX_WRITES];
	unsigned long flush_start, flush_end;
	int ldt_at_inject;
} active;
static bool fault_active;
static int ldt_at_revert = -1;
static int changed_at_revert;
static unsigned long injections, reverts;

/* ------------------------------------------------------------------ symbols */

static unsigned long sym(const char *name)
{
	return lookup ? lookup(name) : 0;
}

static int resolve_symbols(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	int ret = register_kprobe(&kp);

	if (ret < 0) {
		pr_err("kprobe on kallsyms_lookup_name failed (%d): needs CONFIG_KPROBES\n", ret);
		return ret;
	}
	/* kp.addr is the probed instruction: the function entry, or the
	 * instruction after ENDBR64 on IBT kernels; either is callable on CPUs
	 * without CET IBT enforcement, which the test VMs (TCG) are. */
	lookup = (lookup_fn_t)kp.addr;
	unregister_kprobe(&kp);

	init_top_pgt_p = (pgd_t *)sym("init_top_pgt");
	espfix_stack_sym = sym("espfix_stack");
	espfix_waddr_sym = sym("espfix_waddr");
	espfix_pages_p = (void **)sym("espfix_pages");
	espfix_pud_page_p = (pud_t *)sym("espfix_pud_page");
	espfix_init_mutex_p = (struct mutex *)sym("espfix_init_mutex");
	flush_range = (flush_range_fn_t)sym("flush_tlb_kernel_range");
	flush_all = (flush_all_fn_t)sym("flush_tlb_all");
	flush_name = flush_range ? "flush_tlb_kernel_range" : "flush_tlb_all";

	if (!init_top_pgt_p || !espfix_stack_sym || !espfix_waddr_sym || !espfix_pages_p ||
	    !espfix_pud_page_p || !(flush_range || flush_all)) {
		pr_err("symbols missing (CONFIG_KALLSYMS_ALL off, or no espfix64): "
		       "init_top_pgt=%px espfix_stack=%lx espfix_waddr=%lx espfix_pages=%px "
		       "espfix_pud_page=%px flush=%px/%px\n", init_top_pgt_p, espfix_stack_sym,
		       espfix_waddr_sym, espfix_pages_p, espfix_pud_page_p, flush_range, flush_all);
		return -ENOENT;
	}
	return 0;
}

static unsigned long *percpu_word(unsigned long symbol, int cpu)
{
	/* &per_cpu(var, cpu) = &var + __per_cpu_offset[cpu] (modulo 2^64), in both
	 * per-CPU conventions: zero-based symbols before 6.15, relocated after */
	return (unsigned long *)(symbol + __per_cpu_offset[cpu]);
}

/* ------------------------------------------------------------------ walking */

struct espfix_walk {
	unsigned long addr;		/* per_cpu(espfix_stack, cpu) */
	pud_t *pud;			/* first PUD clone of the group */
	pmd_t *pmd;			/* the group's PMD page */
	pte_t *pte;			/* the group's PTE page */
	unsigned int pte_slot;		/* pte_index(addr): the stack page's first clone */
};

static int walk_cpu(int cpu, struct espfix_walk *w)
{
	pgd_t *pgd;
	p4d_t *p4d;

	if (cpu < 0 || cpu >= nr_cpu_ids || !cpu_online(cpu))
		return -EINVAL;
	w->addr = READ_ONCE(*percpu_word(espfix_stack_sym, cpu));
	if (!w->addr)
		return -ENODEV;		/* no ministack */
	pgd = init_top_pgt_p + pgd_index(w->addr);
	if (!pgd_present(*pgd))
		return -ENOENT;
	p4d = p4d_offset(pgd, w->addr);
	if (!p4d_present(*p4d))
		return -ENOENT;
	w->pud = pud_offset(p4d, w->addr);
	if (!pud_present(*w->pud) || pud_leaf(*w->pud))
		return -ENOENT;
	/* espfix addresses have bits 16..31 clear: pmd_index() is 0 and
	 * pte_index() the stack page's slot below 16 */
	w->pmd = pmd_offset(w->pud, w->addr) - pmd_index(w->addr);
	if (!pmd_present(w->pmd[0]) || pmd_leaf(w->pmd[0]))
		return -ENOENT;
	w->pte_slot = pte_index(w->addr);
	w->pte = pte_offset_kernel(&w->pmd[pmd_index(w->addr)], w->addr) - w->pte_slot;
	return 0;
}

/* ------------------------------------------------------------------ LDT holders */

static int ldt_holders(void)
{
	int n = 0;
#ifdef CONFIG_MODIFY_LDT_SYSCALL
	struct task_struct *p;

	rcu_read_lock();
	for_each_process(p) {
		task_lock(p);
		if (p->mm && READ_ONCE(p->mm->context.ldt))
			n++;
		task_unlock(p);
	}
	rcu_read_unlock();
#endif
	return n;
}

/* ------------------------------------------------------------------ writing */

static void flush_tables(unsigned long start, unsigned long end)
{
	if (flush_range)
		flush_range(start, end);
	else
		flush_all();
}

static void lock_espfix(void)
{
	if (espfix_init_mutex_p)
		mutex_lock(espfix_init_mutex_p);
}

static void unlock_espfix(void)
{
	if (espfix_init_mutex_p)
		mutex_unlock(espfix_init_mutex_p);
}

static void plan(const char *what, void *where, unsigned long new, bool table)
{
	struct saved_word *s = &active.w[active.nwrites++];

	s->what = what;
	s->where = where;
	s->old = READ_ONCE(*s->where);
	s->new = new;
	s->table = table;
}

static bool any_table(void)
{
	int i;

	for (i = 0; i < active.nwrites; i++)
		if (active.w[i].table)
			return true;
	return false;
}

static void apply(void)
{
	int i;

	lock_espfix();
	for (i = 0; i < active.nwrites; i++)
		WRITE_ONCE(*active.w[i].where, active.w[i].new);
	unlock_espfix();
	if (any_table())
		flush_tables(active.flush_start, active.flush_end);
}

/* caller holds `lock` */
static void restore(void)
{
	int i;

	if (!fault_active)
		return;
	ldt_at_revert = ldt_holders();
	changed_at_revert = 0;
	lock_espfix();
	for (i = active.nwrites - 1; i >= 0; i--) {
		struct saved_word *s = &active.w[i];
		unsigned long now = READ_ONCE(*s->where);

		if (now != s->new) {
			changed_at_revert++;
			pr_warn("%s at %px changed while the fault was in place: %#lx, "
				"restoring %#lx anyway\n", s->what, s->where, now, s->old);
		}
		WRITE_ONCE(*s->where, s->old);
	}
	unlock_espfix();
	if (any_table())
		flush_tables(active.flush_start, active.flush_end);
	fault_active = false;
	reverts++;
	pr_info("reverted %s cpu %d\n", active.name, active.cpu);
}

static unsigned long scratch_pa(void)
{
	return (unsigned long)page_to_pfn(scratch) << PAGE_SHIFT;
}

/* the entry with its address bits replaced by the scratch page's */
static unsigned long repoint(unsigned long entry)
{
	return (entry & ~PTE_PFN_MASK) | (scratch_pa() & PTE_PFN_MASK);
}

static int inject(const char *name, int cpu, long arg, bool has_arg)
{
	struct espfix_walk w;
	int ret, n;
	unsigned long group_start;

	if (fault_active)
		return -EBUSY;
	memset(&active, 0, sizeof(active));
	strscpy(active.name, name, sizeof(active.name));
	active.cpu = cpu;
	active.arg = arg;

	n = ldt_holders();
	if (n) {
		pr_warn("refusing %s: %d task(s) hold an LDT and could take the espfix return\n",
			name, n);
		return -EAGAIN;
	}
	active.ldt_at_inject = n;

	ret = walk_cpu(cpu, &w);
	if (ret)
		return ret;
	group_start = w.addr & ~(GROUP_SPAN - 1);
	active.flush_start = group_start;
	active.flush_end = group_start + GROUP_SPAN;

	if (!strncmp(name, "pte_", 4)) {
		long clone = has_arg ? arg : 5;
		unsigned long *e, v;

		if (clone < 0 || clone >= ESPFIX_PTE_CLONES)
			return -EINVAL;
		e = (unsigned long *)&w.pte[w.pte_slot + clone * PTE_STRIDE];
		v = READ_ONCE(*e);
		if (!(v & _PAGE_PRESENT))
			return -ENOENT;
		if (!strcmp(name, "pte_rw"))
			v |= _PAGE_RW;
		else if (!strcmp(name, "pte_user"))
			v |= _PAGE_USER;
		else if (!strcmp(name, "pte_nx")) {
			if (!(__supported_pte_mask & _PAGE_NX) || !(v & _PAGE_NX))
				return -EOPNOTSUPP;
			v &= ~_PAGE_NX;
		} else if (!strcmp(name, "pte_elsewhere"))
			v = repoint(v);
		else
			return -EINVAL;
		active.arg = clone;
		plan("pte", e, v, true);
	} else if (!strcmp(name, "pmd_clear") || !strcmp(name, "pmd_elsewhere")) {
		long idx = has_arg ? arg : 300;
		unsigned long *e;

		if (idx < 0 || idx >= ESPFIX_PMD_CLONES)
			return -EINVAL;
		e = (unsigned long *)&w.pmd[idx];
		active.arg = idx;
		plan("pmd", e, name[4] == 'c' ? 0 : repoint(READ_ONCE(*e)), true);
	} else if (!strcmp(name, "pud_clear") || !strcmp(name, "pud_elsewhere")) {
		long idx = has_arg ? arg : 2;
		unsigned long *e;

		if (idx < 0 || idx >= ESPFIX_PUD_CLONES)
			return -EINVAL;
		e = (unsigned long *)&w.pud[idx];
		active.arg = idx;
		plan("pud", e, name[4] == 'c' ? 0 : repoint(READ_ONCE(*e)), true);
	} else if (!strcmp(name, "stray_pte")) {
		unsigned int slot, k;
		unsigned long *e = NULL;

		/* a slot (0..15) whose 32 clones are all empty: no stack page in use */
		for (slot = 0; slot < PTE_STRIDE && !e; slot++) {
			bool empty = true;

			for (k = 0; k < ESPFIX_PTE_CLONES; k++)
				if (!pte_none(w.pte[slot + k * PTE_STRIDE]))
					empty = false;
			if (empty)
				e = (unsigned long *)&w.pte[slot];
		}
		if (!e)
			return -ENOSPC;
		active.arg = (pte_t *)e - w.pte;
		plan("stray pte", e, repoint(pte_val(w.pte[w.pte_slot])), true);
	} else if (!strcmp(name, "stack_zero")) {
		plan("espfix_stack", percpu_word(espfix_stack_sym, cpu), 0, false);
	} else if (!strcmp(name, "stack_copy")) {
		unsigned long other;

		if (!has_arg || arg == cpu || arg < 0 || arg >= nr_cpu_ids || !cpu_possible(arg))
			return -EINVAL;
		other = READ_ONCE(*percpu_word(espfix_stack_sym, arg));
		if (!other)
			return -ENODEV;
		plan("espfix_stack", percpu_word(espfix_stack_sym, cpu), other, false);
	} else if (!strcmp(name, "waddr_off")) {
		unsigned long *e = percpu_word(espfix_waddr_sym, cpu);
		unsigned long v = READ_ONCE(*e);

		/* stay on the stack page: only the word is wrong, not the page */
		if ((v & ~PAGE_MASK) + 64 < PAGE_SIZE)
			v += 64;
		else
			v -= 64;
		plan("espfix_waddr", e, v, false);
	} else if (!strcmp(name, "pages_elsewhere")) {
		plan("espfix_pages", &espfix_pages_p[cpu / ESPFIX_STACKS_PER_PAGE],
		     (unsigned long)page_address(scratch), false);
		active.arg = cpu / ESPFIX_STACKS_PER_PAGE;
	} else if (!strcmp(name, "pti_clear")) {
#ifdef ESPFIX_FAULT_PTI
		pgd_t *upgd;
		p4d_t *up4d;

		if (!boot_cpu_has(X86_FEATURE_PTI))
			return -EOPNOTSUPP;
		/* pti_clone_p4d(): the user PGD's p4d entry for ESPFIX_BASE_ADDR (the
		 * pgd entry itself with 4-level paging, p4d[510] under pgd[511] with 5) */
		upgd = kernel_to_user_pgdp(init_top_pgt_p + pgd_index(ESPFIX_BASE_ADDR));
		if (!pgd_present(*upgd))
			return -ENOENT;
		up4d = p4d_offset(upgd, ESPFIX_BASE_ADDR);
		if (!p4d_present(*up4d))
			return -ENOENT;
		active.flush_start = ESPFIX_BASE_ADDR;
		active.flush_end = ESPFIX_BASE_ADDR + P4D_SIZE;
		plan("user p4d", up4d, 0, true);
#else
		return -EOPNOTSUPP;
#endif
	} else {
		return -EINVAL;
	}

	apply();
	fault_active = true;
	injections++;
	pr_info("injected %s cpu %d arg %ld\n", active.name, cpu, active.arg);
	return 0;
}

/* ------------------------------------------------------------------ debugfs */

static ssize_t control_write(struct file *file, const char __user *ubuf, size_t len,
			     loff_t *ppos)
{
	char buf[96], verb[16], name[24];
	int cpu = -1, fields, ret;
	long arg = 0;

	if (len >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = '\0';
	fields = sscanf(buf, "%15s %23s %d %ld", verb, name, &cpu, &arg);
	mutex_lock(&lock);
	if (fields >= 1 && !strcmp(verb, "revert")) {
		ret = fault_active ? 0 : -ENOENT;
		restore();
	} else if (fields >= 3 && !strcmp(verb, "inject")) {
		ret = inject(name, cpu, arg, fields == 4);
	} else {
		ret = -EINVAL;
	}
	mutex_unlock(&lock);
	return ret ? ret : len;
}

static int status_show(struct seq_file *m, void *unused)
{
	int i;

	mutex_lock(&lock);
	seq_printf(m, "levels: %d\n", pgtable_l5_enabled() ? 5 : 4);
	seq_printf(m, "pti: %d\n", boot_cpu_has(X86_FEATURE_PTI) ? 1 : 0);
	seq_printf(m, "init_top_pgt: %px\n", init_top_pgt_p);
	seq_printf(m, "espfix_stack: %lx\n", espfix_stack_sym);
	seq_printf(m, "espfix_waddr: %lx\n", espfix_waddr_sym);
	seq_printf(m, "espfix_pages: %px\n", espfix_pages_p);
	seq_printf(m, "espfix_pud_page: %px\n", espfix_pud_page_p);
	seq_printf(m, "espfix_init_mutex: %px\n", espfix_init_mutex_p);
	seq_printf(m, "flush: %s\n", flush_name);
	seq_printf(m, "scratch_pa: %#llx\n", (unsigned long long)scratch_pa());
	seq_printf(m, "scratch_va: %px\n", page_address(scratch));
	seq_printf(m, "injections: %lu\nreverts: %lu\n", injections, reverts);
	seq_printf(m, "ldt_holders_now: %d\n", ldt_holders());
	seq_printf(m, "ldt_holders_at_last_revert: %d\n", ldt_at_revert);
	seq_printf(m, "changed_at_last_revert: %d\n", changed_at_revert);
	if (fault_active) {
		seq_printf(m, "active: %s cpu=%d arg=%ld\n", active.name, active.cpu, active.arg);
		for (i = 0; i < active.nwrites; i++)
			seq_printf(m, "write: %s %px %#lx -> %#lx\n", active.w[i].what,
				   active.w[i].where, active.w[i].old, active.w[i].new);
		if (any_table())
			seq_printf(m, "flushed: %#lx-%#lx\n", active.flush_start,
				   active.flush_end);
	} else {
		seq_puts(m, "active: none\n");
	}
	mutex_unlock(&lock);
	return 0;
}

static int status_open(struct inode *inode, struct file *file)
{
	return single_open(file, status_show, NULL);
}

static const struct file_operations control_fops = {
	.owner = THIS_MODULE,
	.write = control_write,
};

static const struct file_operations status_fops = {
	.owner = THIS_MODULE,
	.open = status_open,
	.read = seq_read,
	.llseek = seq_lseek,
	.release = single_release,
};

static int __init espfix_fault_init(void)
{
	int ret = resolve_symbols();

	if (ret)
		return ret;
	scratch = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!scratch)
		return -ENOMEM;
	dir = debugfs_create_dir("espfix_fault", NULL);
	debugfs_create_file("control", 0200, dir, NULL, &control_fops);
	debugfs_create_file("status", 0400, dir, NULL, &status_fops);
	pr_info("loaded (test only: injects espfix64 faults on request); flush via %s\n",
		flush_name);
	return 0;
}

static void __exit espfix_fault_exit(void)
{
	debugfs_remove_recursive(dir);	/* no writer can start after this */
	mutex_lock(&lock);
	restore();
	mutex_unlock(&lock);
	__free_page(scratch);		/* only after the restore and its flush */
	pr_info("unloaded\n");
}

module_init(espfix_fault_init);
module_exit(espfix_fault_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("espfix-inspect TEST ONLY: inject and revert espfix64 faults");
