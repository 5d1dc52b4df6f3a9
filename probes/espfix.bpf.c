// SPDX-License-Identifier: GPL-2.0
/*
 * espfix-inspect trace: BPF side (compiled by BCC against the running kernel's headers).
 *
 * Sections, each compiled only when the loader defines it (so missing probe points
 * degrade instead of failing):
 *   WANT_INIT     kprobe + kretprobe on init_espfix_ap(int cpu)
 *                 (arch/x86/kernel/espfix_64.c; called from do_boot_cpu() in
 *                 arch/x86/kernel/smpboot.c on the CPU that brings `cpu` up)
 *   WANT_LOCK     lock:contention_begin/end (since Linux kernel commit 16edd9b511a1,
 *                 "locking: Add lock contention tracepoints", in v5.19) filtered on
 *                 &espfix_init_mutex: the time an init_espfix_ap() call was blocked on
 *                 it, added to that call's INIT event (needs WANT_INIT)
 *   WANT_LDT      syscalls:sys_{enter,exit}_modify_ldt, struct user_desc decoded
 *                 (arch/x86/include/uapi/asm/ldt.h)
 *   WANT_RETURNS  the events that precede a return to user mode; counted when the
 *                 current task's saved SS has the LDT bit (TI, bit 2) and CS is a user
 *                 selector: such a return goes through espfix
 *                 (entry_64.S: testb $4, (SS-RIP)(%rsp); jnz native_irq_return_ldt)
 *   WANT_HOLDERS  a walk of the task list, triggered on demand, listing the processes
 *                 whose mm has an LDT now (mm->context.ldt, arch/x86/include/asm/mmu.h)
 *
 * Kernel addresses the loader substitutes (from kallsyms), all read with
 * bpf_probe_read_kernel(); this program never writes kernel memory:
 *   ESPFIX_STACK  the per-CPU symbol espfix_stack; PER_CPU_OFFSET  __per_cpu_offset[]
 *   ESPFIX_PAGES  espfix_pages[]; ESPFIX_PUD_PAGE  espfix_pud_page[];
 *   PAGE_RANDOM   page_random; PAGE_OFFSET_BASE  page_offset_base; IRQ_REGS  __irq_regs
 *   ESPFIX_INIT_MUTEX  &espfix_init_mutex
 *
 * Layout constants the loader substitutes from inspector/model.py and inspector/x86.py
 * (the one home of each; arch/x86/kernel/espfix_64.c, arch/x86/include/asm/pgtable_types.h):
 *   ESPFIX_STACKS_PER_PAGE  CPUs per stack page; CPUS_PER_GROUP  CPUs per PUD slot group
 *   GROUP_PAGE_SHIFT, PUD_GROUPS, ESPFIX_PUD_CLONES  the group's first espfix_pud_page
 *                 slot is ((group ^ (page_random >> GROUP_PAGE_SHIFT)) & (PUD_GROUPS - 1))
 *                 * ESPFIX_PUD_CLONES (model.group_pud_index)
 *   X86_PAGE_PRESENT  _PAGE_PRESENT; X86_PTE_PFN_MASK  the physical-address bits of an entry
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/mm_types.h>
#include <asm/ldt.h>

struct comm_t { char comm[TASK_COMM_LEN]; };

static __always_inline u64 kread64(u64 addr)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

static __always_inline u32 tgid(void) { return bpf_get_current_pid_tgid() >> 32; }

static __always_inline int pid_ok(void)
{
#ifdef FILTER_PID
    return tgid() == FILTER_PID;
#else
    return 1;
#endif
}

#ifdef WANT_INIT
/* ------------------------------------------------------------ init_espfix_ap */
struct init_state {
    u64 stack, page, pud, pmd;
};

struct init_event {
    u64 ts_ns, latency_ns;
    u32 target_cpu, cpu, pid, pad;
    char comm[TASK_COMM_LEN];
    struct init_state before, after;
    u64 lock_wait_ns;          /* blocked on espfix_init_mutex during this call */
    u32 lock_contended, pad2;  /* contention_end events on it during this call */
};

BPF_HASH(init_start, u64, struct init_event, 64);
BPF_RINGBUF_OUTPUT(init_events, 16);   /* one buffer for all CPUs, hotplugged ones too */

static __always_inline void init_read(u32 cpu, struct init_state *s)
{
    u64 off = kread64(PER_CPU_OFFSET + 8ULL * cpu);
    s->stack = kread64(ESPFIX_STACK + off);                  /* per_cpu(espfix_stack, cpu) */
    /* espfix_pages[cpu / ESPFIX_STACKS_PER_PAGE] */
    s->page = kread64(ESPFIX_PAGES + 8ULL * (cpu / ESPFIX_STACKS_PER_PAGE));
    /* the group's first PUD slot, as init_espfix_ap() computes it:
     * addr = espfix_base_addr(cpu); pud_p = &espfix_pud_page[pud_index(addr)] */
    u32 page_random = 0;
    bpf_probe_read_kernel(&page_random, 4, (void *)PAGE_RANDOM);
    u32 group = cpu / CPUS_PER_GROUP;
    u32 idx = ((group ^ (page_random >> GROUP_PAGE_SHIFT)) & (PUD_GROUPS - 1)) * ESPFIX_PUD_CLONES;
    s->pud = kread64(ESPFIX_PUD_PAGE + 8ULL * idx);
    s->pmd = 0;
    if (s->pud & X86_PAGE_PRESENT) {
        u64 pob = kread64(PAGE_OFFSET_BASE);
        /* pmd[0]: all 512 clones are equal */
        s->pmd = kread64(pob + (s->pud & X86_PTE_PFN_MASK));
    }
}

int on_init_entry(struct pt_regs *ctx)
{
    struct init_event ev = {};
    u64 id = bpf_get_current_pid_tgid();
    ev.ts_ns = bpf_ktime_get_ns();
    ev.target_cpu = (u32)PT_REGS_PARM1(ctx);
    ev.cpu = bpf_get_smp_processor_id();
    ev.pid = id >> 32;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    init_read(ev.target_cpu, &ev.before);
    init_start.update(&id, &ev);
    return 0;
}

int on_init_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct init_event *ev = init_start.lookup(&id);
    if (!ev)
        return 0;
    ev->latency_ns = bpf_ktime_get_ns() - ev->ts_ns;
    init_read(ev->target_cpu, &ev->after);
    init_events.ringbuf_output(ev, sizeof(*ev), 0);
    init_start.delete(&id);
    return 0;
}

#ifdef WANT_LOCK
/* ------------------------------------------------ waits on espfix_init_mutex */
/* __mutex_lock_common() (kernel/locking/mutex.c) fires contention_begin before its
 * optimistic spin and again before it sleeps, and contention_end once it has the
 * lock; the uncontended fast path fires neither.  The wait runs from the first begin
 * to the end, in the task that called init_espfix_ap(). */
BPF_HASH(lock_start, u64, u64, 1024);

TRACEPOINT_PROBE(lock, contention_begin)
{
    if ((u64)args->lock_addr != ESPFIX_INIT_MUTEX)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u64 ts = bpf_ktime_get_ns();
    lock_start.insert(&id, &ts);          /* keeps the first begin */
    return 0;
}

TRACEPOINT_PROBE(lock, contention_end)
{
    if ((u64)args->lock_addr != ESPFIX_INIT_MUTEX)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u64 *ts = lock_start.lookup(&id);
    if (!ts)
        return 0;
    u64 wait = bpf_ktime_get_ns() - *ts;
    lock_start.delete(&id);
    struct init_event *ev = init_start.lookup(&id);
    if (ev) {
        ev->lock_wait_ns += wait;
        ev->lock_contended += 1;
    }
    return 0;
}
#endif
#endif

#ifdef WANT_LDT
/* ------------------------------------------------------------------ modify_ldt */
struct ldt_event {
    u64 ts_ns;
    s64 ret;
    u32 pid, tid, func, bytecount;
    u32 entry_number, base_addr, limit, flags;   /* struct user_desc, flags packed */
    u32 have_desc, pad;
    char comm[TASK_COMM_LEN];
};

BPF_HASH(ldt_start, u64, struct ldt_event, 1024);
BPF_RINGBUF_OUTPUT(ldt_events, 16);

TRACEPOINT_PROBE(syscalls, sys_enter_modify_ldt)
{
    if (!pid_ok())
        return 0;
    struct ldt_event ev = {};
    u64 id = bpf_get_current_pid_tgid();
    ev.ts_ns = bpf_ktime_get_ns();
    ev.pid = id >> 32;
    ev.tid = (u32)id;
    ev.func = args->func;
    ev.bytecount = args->bytecount;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    /* func 1 and 0x11 write an entry: decode the descriptor from user memory */
    if ((ev.func == 1 || ev.func == 0x11) && args->bytecount >= 16) {
        u32 raw[4] = {};
        if (bpf_probe_read_user(&raw, sizeof(raw), (void *)args->ptr) == 0) {
            ev.entry_number = raw[0];
            ev.base_addr = raw[1];
            ev.limit = raw[2];
            ev.flags = raw[3];
            ev.have_desc = 1;
        }
    }
    ldt_start.update(&id, &ev);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_modify_ldt)
{
    u64 id = bpf_get_current_pid_tgid();
    struct ldt_event *ev = ldt_start.lookup(&id);
    if (!ev)
        return 0;
    ev->ret = args->ret;
    ldt_events.ringbuf_output(ev, sizeof(*ev), 0);
    ldt_start.delete(&id);
    return 0;
}
#endif

#ifdef WANT_RETURNS
/* ------------------------------------------------ returns through espfix */
struct ret_key {
    u32 cpu, pid, source;
    u16 ss, cs;
    char comm[TASK_COMM_LEN];
};

BPF_HASH(returns, struct ret_key, u64, 10240);
BPF_ARRAY(seen, u64, 2);          /* [0] events looked at, [1] counted */

static __always_inline int count_return(u32 source, int check_irq_regs)
{
    u32 zero = 0, one = 1;
    u64 *n = seen.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    if (!pid_ok())
        return 0;
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
    u64 cs = 0, ss = 0;
    bpf_probe_read_kernel(&cs, 8, &regs->cs);
    bpf_probe_read_kernel(&ss, 8, &regs->ss);
    if ((cs & 3) != 3 || !(ss & 4))
        return 0;
#ifdef IRQ_REGS
    if (check_irq_regs) {
        /* the interrupt came from user mode iff its frame is the task's pt_regs
         * (set_irq_regs() in sysvec_apic_timer_interrupt, arch/x86/kernel/apic/apic.c) */
        u32 cpu = bpf_get_smp_processor_id();
        u64 irq_regs = kread64(IRQ_REGS + kread64(PER_CPU_OFFSET + 8ULL * cpu));
        if (irq_regs != (u64)regs)
            return 0;
    }
#endif
    struct ret_key key = {};
    key.cpu = bpf_get_smp_processor_id();
    key.pid = tgid();
    key.source = source;
    key.ss = ss;
    key.cs = cs;
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    returns.increment(key);
    u64 *c = seen.lookup(&one);
    if (c)
        __sync_fetch_and_add(c, 1);
    return 0;
}

/* The loader generates, in place of the marker below, one function per tracepoint that
 * exists on this kernel, `int ret_<i>(void *ctx) { return count_return(i, check); }`,
 * attached one by one (some tracepoints refuse BPF, e.g. irq_work_exit on 6.1). */
@RETURN_PROBES@
#endif

#ifdef WANT_HOLDERS
/* --------------------------------------------------- who holds an LDT now */
/* struct ldt_struct is private to arch/x86/include/asm/mmu_context.h:
 *   struct ldt_struct { struct desc_struct *entries; unsigned int nr_entries; int slot; };
 * this view reads the same layout. */
struct ldt_view {
    void *entries;
    unsigned int nr_entries;
    int slot;
};

struct holder {
    u32 pid, nr_entries;
    char comm[TASK_COMM_LEN];
};

BPF_RINGBUF_OUTPUT(holders, 16);
/* [0] tasks walked so far, [1] 1 once the walk is back at init_task, [2] the cursor
 * (the task_struct to continue from; 0 = start at init_task) */
BPF_ARRAY(holders_done, u64, 3);

/* Runs when the loader itself calls getppid(): walks the next WALK_CHUNK entries of
 * init_task.tasks (thread group leaders) and reports each mm with a non-NULL
 * context.ldt.  The loader calls again until the walk is back at init_task: one long
 * loop is more than the verifier accepts ("sequence of jumps is too complex"). */
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if (tgid() != TRIGGER_PID)
        return 0;
    u32 zero = 0, one = 1, two = 2;
    u64 *walked = holders_done.lookup(&zero);
    u64 *finished = holders_done.lookup(&one);
    u64 *cursor = holders_done.lookup(&two);
    if (!walked || !finished || !cursor || *finished)
        return 0;
    struct task_struct *init = (struct task_struct *)INIT_TASK;
    struct task_struct *t = *cursor ? (struct task_struct *)*cursor : init;
    #pragma clang loop unroll(disable)
    for (int i = 0; i < WALK_CHUNK; i++) {
        struct list_head *next = NULL;
        bpf_probe_read_kernel(&next, sizeof(next), &t->tasks.next);
        t = (struct task_struct *)((char *)next - offsetof(struct task_struct, tasks));
        if (t == init || !next) {
            *finished = 1;
            break;
        }
        *walked += 1;
        struct mm_struct *mm = NULL;
        bpf_probe_read_kernel(&mm, sizeof(mm), &t->mm);
        if (!mm)
            continue;
        struct ldt_view *ldt = NULL;
        bpf_probe_read_kernel(&ldt, sizeof(ldt), &mm->context.ldt);
        if (!ldt)
            continue;
        struct holder h = {};
        bpf_probe_read_kernel(&h.pid, 4, &t->tgid);
        bpf_probe_read_kernel(&h.nr_entries, 4, &ldt->nr_entries);
        bpf_probe_read_kernel(&h.comm, sizeof(h.comm), &t->comm);
        holders.ringbuf_output(&h, sizeof(h), 0);
    }
    *cursor = (u64)t;
    return 0;
}
#endif
