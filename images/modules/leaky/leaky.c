// SPDX-License-Identifier: GPL-2.0
/*
 * leaky: known leaks, and objects that only look leaked, for qemuleak's tests.
 *
 * Every object is announced on the console as
 *     leaky: obj NAME ADDRESS SIZE
 * (ADDRESS with %px, so tests know the ground truth), then "leaky: ready".
 *
 * Leaks (nothing the kernel can see points at them): kmalloc_leak, cache_leak,
 * vmalloc_leak, list_head -> list_node1..4 (one direct and four indirect leaks),
 * krealloc_grown (40 bytes grown to 56 in place) and krealloc_moved (40 bytes
 * grown to 300: a new object, the old one freed), percpu_leak (48 bytes from
 * __alloc_percpu; its "address" is the per-CPU pointer the allocator returns),
 * backtrace_leak (allocated right after a dump_stack()), and exit_leak (made in
 * module exit). Their addresses are kept XOR-masked so module exit can free them
 * (all but exit_leak): a masked value is no kernel address, so no scanner sees it.
 *
 * Not leaks: bss_kept (pointer in .bss), percpu_kept (pointer in a per-CPU
 * variable of CPU 0), interior_kept (only a pointer into its middle, printed as
 * "leaky: ref interior_kept ADDRESS"), stack_kept (only on the stack of the sleeping
 * kthread leaky_sleeper), register_kept (only in a callee-saved register of the
 * spinning kthread leaky_spinner; "leaky: spinner cpu=N reg=R"), softirq_kept and
 * hardirq_kept (allocated in a timer's and an hrtimer's callback: kmemleak's comm is
 * "softirq" / "hardirq", pid 0; kept in .bss).
 *
 * kvmalloc_small and kvmalloc_big (kept in .bss) come from kvzalloc(): the small
 * one from kmalloc, the big one, too big for kmalloc (which returns NULL first),
 * from vmalloc.
 *
 * rcu_freed is handed to kfree_rcu() at load: freed for real after a grace period.
 */
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/hrtimer.h>
#include <linux/rcupdate.h>
#include <linux/timer.h>
#include <linux/kthread.h>
#include <linux/module.h>
#include <linux/percpu.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>

static bool spinner = true;
module_param(spinner, bool, 0444);
MODULE_PARM_DESC(spinner, "start the spinning kthread that keeps register_kept (default on)");

#define HIDE_MASK (0xa5a5UL << 48)	/* makes any kernel address non-canonical */
#define HIDE(p) ((unsigned long)(p) ^ HIDE_MASK)
#define UNHIDE(v) ((void *)((v) ^ HIDE_MASK))

#define LIST_LEN 5

struct leaky_node {
	struct leaky_node *next;
	unsigned long index;
	char tag[48];
};

/* Masked addresses of the leaks, for module exit only. */
static unsigned long hidden_kmalloc, hidden_cache, hidden_vmalloc, hidden_list, hidden_bt;
static unsigned long hidden_grown, hidden_moved, hidden_pcpu;
static struct kmem_cache *leaky_cache;

/* The references that keep the "not leaks" alive. */
static void *bss_ref;
static DEFINE_PER_CPU(void *, pcpu_ref);
static void *interior_ref;
static void *kv_small, *kv_big;
#define KV_BIG_SIZE (5UL << 20)		/* over KMALLOC_MAX_SIZE (4 MiB with 4 KiB pages) */

static struct task_struct *sleeper, *spinner_task;
static void *softirq_ref, *hardirq_ref;
static struct timer_list soft_timer;
static struct hrtimer hard_timer;
static bool timers_started;
static DECLARE_COMPLETION(soft_done);
static DECLARE_COMPLETION(hard_done);

struct rcu_obj {
	struct rcu_head rcu;
	char tag[80];
};
static DECLARE_COMPLETION(sleeper_ready);
static DECLARE_COMPLETION(spinner_ready);
static int spinner_stop;

static void fill(void *p, size_t size, const char *name)
{
	size_t i, n = strlen(name);

	for (i = 0; i < size; i++)
		((char *)p)[i] = name[i % n];
}

static void announce(const char *name, const void *p, size_t size)
{
	pr_info("leaky: obj %s %px %zu\n", name, p, size);
}

static void *alloc_named(const char *name, size_t size)
{
	void *p = kmalloc(size, GFP_KERNEL);

	if (p) {
		fill(p, size, name);
		announce(name, p, size);
	}
	return p;
}

static int sleeper_fn(void *unused)
{
	void *volatile slot = alloc_named("stack_kept", 192);

	complete(&sleeper_ready);
	while (!kthread_should_stop())
		schedule_timeout_interruptible(HZ);
	kfree(slot);
	return 0;
}

/*
 * Keep the pointer in one callee-saved register and spin. cond_resched() keeps
 * RCU and the soft-lockup watchdog happy; it only switches away (saving the
 * register on the stack) when something else must run on this CPU.
 */
#if defined(CONFIG_X86_64)
#define HOLD_REG "r12"
#elif defined(CONFIG_ARM64)
#define HOLD_REG "x19"
#endif

static int spinner_fn(void *unused)
{
	register unsigned long held asm(HOLD_REG);

	held = (unsigned long)alloc_named("register_kept", 160);
	pr_info("leaky: spinner cpu=%d reg=%s\n", raw_smp_processor_id(), HOLD_REG);
	complete(&spinner_ready);
	while (!READ_ONCE(spinner_stop)) {
		asm volatile("" : "+r"(held));
		cpu_relax();
		cond_resched();
	}
	asm volatile("" : "+r"(held));
	kfree((void *)held);
	while (!kthread_should_stop())
		schedule_timeout_interruptible(HZ);
	return 0;
}

static void soft_fn(struct timer_list *t)
{
	softirq_ref = kmalloc(88, GFP_ATOMIC);
	if (softirq_ref) {
		fill(softirq_ref, 88, "softirq_kept");
		announce("softirq_kept", softirq_ref, 88);
	}
	complete(&soft_done);
}

static enum hrtimer_restart hard_fn(struct hrtimer *t)
{
	hardirq_ref = kmalloc(72, GFP_ATOMIC);
	if (hardirq_ref) {
		fill(hardirq_ref, 72, "hardirq_kept");
		announce("hardirq_kept", hardirq_ref, 72);
	}
	complete(&hard_done);
	return HRTIMER_NORESTART;
}

static noinline void *backtrace_alloc(void)
{
	void *p;

	pr_info("leaky: dump_stack before backtrace_leak\n");
	dump_stack();
	p = kmalloc(112, GFP_KERNEL);
	if (p) {
		fill(p, 112, "backtrace_leak");
		announce("backtrace_leak", p, 112);
	}
	return p;
}

static noinline int make_leaks(void)
{
	struct leaky_node *head = NULL, *node;
	void *p;
	int i;

	p = alloc_named("kmalloc_leak", 96);
	if (!p)
		return -ENOMEM;
	hidden_kmalloc = HIDE(p);

	leaky_cache = kmem_cache_create("leaky_cache", 200, 0, 0, NULL);
	if (!leaky_cache)
		return -ENOMEM;
	p = kmem_cache_alloc(leaky_cache, GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	fill(p, 200, "cache_leak");
	announce("cache_leak", p, 200);
	hidden_cache = HIDE(p);

	p = vmalloc(3 * PAGE_SIZE + 100);
	if (!p)
		return -ENOMEM;
	fill(p, 3 * PAGE_SIZE + 100, "vmalloc_leak");
	announce("vmalloc_leak", p, 3 * PAGE_SIZE + 100);
	hidden_vmalloc = HIDE(p);

	/* Built tail first, so the head is allocated last and announced first. */
	for (i = LIST_LEN - 1; i >= 0; i--) {
		node = kmalloc(sizeof(*node), GFP_KERNEL);
		if (!node)
			break;
		fill(node, sizeof(*node), "list_node");
		node->next = head;
		node->index = i;
		head = node;
	}
	hidden_list = HIDE(head);
	if (i >= 0)
		return -ENOMEM;
	for (node = head, i = 0; node; node = node->next, i++) {
		char name[16];

		snprintf(name, sizeof(name), i ? "list_node%d" : "list_head", i);
		announce(name, node, sizeof(*node));
	}

	p = backtrace_alloc();
	if (!p)
		return -ENOMEM;
	hidden_bt = HIDE(p);

	/* krealloc within the object's slab size keeps it; beyond, moves it. */
	p = kmalloc(40, GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	p = krealloc(p, 56, GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	fill(p, 56, "krealloc_grown");
	announce("krealloc_grown", p, 56);
	hidden_grown = HIDE(p);
	p = kmalloc(40, GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	p = krealloc(p, 300, GFP_KERNEL);
	if (!p)
		return -ENOMEM;
	fill(p, 300, "krealloc_moved");
	announce("krealloc_moved", p, 300);
	hidden_moved = HIDE(p);

	/* Freed through RCU: the free happens a grace period later. */
	{
		struct rcu_obj *r = kmalloc(sizeof(*r), GFP_KERNEL);

		if (!r)
			return -ENOMEM;
		fill(r->tag, sizeof(r->tag), "rcu_freed");
		announce("rcu_freed", r, sizeof(*r));
		kfree_rcu(r, rcu);
	}

	p = (void __force *)__alloc_percpu(48, 8);
	if (!p)
		return -ENOMEM;
	announce("percpu_leak", p, 48);
	hidden_pcpu = HIDE(p);
	return 0;
}

static noinline int make_kept(void)
{
	void *p;

	bss_ref = alloc_named("bss_kept", 128);
	p = alloc_named("percpu_kept", 144);
	per_cpu(pcpu_ref, 0) = p;
	p = alloc_named("interior_kept", 256);
	if (!bss_ref || !per_cpu(pcpu_ref, 0) || !p)
		return -ENOMEM;
	interior_ref = (char *)p + 100;
	pr_info("leaky: ref interior_kept %px\n", interior_ref);

	kv_small = kvzalloc(200, GFP_KERNEL);
	announce("kvmalloc_small", kv_small, 200);
	kv_big = kvzalloc(KV_BIG_SIZE, GFP_KERNEL);
	announce("kvmalloc_big", kv_big, KV_BIG_SIZE);
	if (!kv_small || !kv_big)
		return -ENOMEM;

	/* Allocations in interrupt context: a timer (softirq), an hrtimer (hardirq). */
	timer_setup(&soft_timer, soft_fn, 0);
	hrtimer_init(&hard_timer, CLOCK_MONOTONIC, HRTIMER_MODE_REL_HARD);
	hard_timer.function = hard_fn;
	timers_started = true;
	mod_timer(&soft_timer, jiffies + 1);
	wait_for_completion(&soft_done);
	hrtimer_start(&hard_timer, ms_to_ktime(1), HRTIMER_MODE_REL_HARD);
	wait_for_completion(&hard_done);
	if (!softirq_ref || !hardirq_ref)
		return -ENOMEM;

	sleeper = kthread_run(sleeper_fn, NULL, "leaky_sleeper");
	if (IS_ERR(sleeper))
		return PTR_ERR(sleeper);
	wait_for_completion(&sleeper_ready);

	if (!spinner)
		return 0;
	spinner_task = kthread_create(spinner_fn, NULL, "leaky_spinner");
	if (IS_ERR(spinner_task))
		return PTR_ERR(spinner_task);
	kthread_bind(spinner_task, num_online_cpus() - 1);
	wake_up_process(spinner_task);
	wait_for_completion(&spinner_ready);
	return 0;
}

static void free_all(void)
{
	struct leaky_node *node = UNHIDE(hidden_list), *next;

	if (spinner_task && !IS_ERR(spinner_task)) {
		WRITE_ONCE(spinner_stop, 1);
		kthread_stop(spinner_task);
	}
	if (sleeper && !IS_ERR(sleeper))
		kthread_stop(sleeper);
	if (timers_started) {
		del_timer_sync(&soft_timer);
		hrtimer_cancel(&hard_timer);
	}
	kfree(softirq_ref);
	kfree(hardirq_ref);
	kfree(bss_ref);
	kvfree(kv_small);
	kvfree(kv_big);
	kfree(per_cpu(pcpu_ref, 0));
	if (interior_ref)
		kfree((char *)interior_ref - 100);
	kfree(UNHIDE(hidden_kmalloc));
	if (hidden_cache)
		kmem_cache_free(leaky_cache, UNHIDE(hidden_cache));
	kmem_cache_destroy(leaky_cache);
	vfree(UNHIDE(hidden_vmalloc));
	for (; hidden_list && node; node = next) {
		next = node->next;
		kfree(node);
	}
	kfree(UNHIDE(hidden_bt));
	kfree(UNHIDE(hidden_grown));
	kfree(UNHIDE(hidden_moved));
	if (hidden_pcpu)
		free_percpu((void __percpu __force *)UNHIDE(hidden_pcpu));
}

static int __init leaky_init(void)
{
	int ret = make_leaks();

	if (!ret)
		ret = make_kept();
	if (ret) {
		pr_err("leaky: init failed: %d\n", ret);
		free_all();
		return ret;
	}
	pr_info("leaky: ready\n");
	return 0;
}

static void __exit leaky_exit(void)
{
	free_all();
	alloc_named("exit_leak", 64);
	pr_info("leaky: exit\n");
}

module_init(leaky_init);
module_exit(leaky_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Known kernel memory leaks for qemuleak's tests");
