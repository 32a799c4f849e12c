// SPDX-License-Identifier: GPL-2.0
/*
 * allocstorm: a steady stream of allocations and frees from a kthread, for tracer
 * throughput benchmarks. count=N kmalloc/kfree pairs (sizes 16..2048), plus one
 * kmem_cache pair every 16 and one vmalloc pair every 256 iterations. With
 * verbose=1 every address is announced as "allocstorm: obj KIND ADDRESS SIZE".
 * When done: "allocstorm: done count=N kmalloc=A cache=B vmalloc=C ns=T".
 */
#include <linux/kthread.h>
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/timekeeping.h>
#include <linux/vmalloc.h>

static unsigned long count = 10000;
module_param(count, ulong, 0444);
MODULE_PARM_DESC(count, "number of kmalloc/kfree pairs (default 10000)");
static bool verbose;
module_param(verbose, bool, 0444);
MODULE_PARM_DESC(verbose, "print every address allocated");

static struct kmem_cache *storm_cache;
static struct task_struct *storm_task;

static void note(const char *kind, const void *p, size_t size)
{
	if (verbose)
		pr_info("allocstorm: obj %s %px %zu\n", kind, p, size);
}

static int storm_fn(void *unused)
{
	unsigned long i, nk = 0, nc = 0, nv = 0;
	u64 start = ktime_get_ns();
	void *p;

	for (i = 0; i < count && !kthread_should_stop(); i++) {
		size_t size = 16UL << (i % 8);

		p = kmalloc(size, GFP_KERNEL);
		if (p) {
			WRITE_ONCE(*(char *)p, (char)i);
			note("kmalloc", p, size);
			kfree(p);
			nk++;
		}
		if (i % 16 == 0) {
			p = kmem_cache_alloc(storm_cache, GFP_KERNEL);
			if (p) {
				note("cache", p, 72);
				kmem_cache_free(storm_cache, p);
				nc++;
			}
		}
		if (i % 256 == 0) {
			p = vmalloc(2 * PAGE_SIZE);
			if (p) {
				note("vmalloc", p, 2 * PAGE_SIZE);
				vfree(p);
				nv++;
			}
		}
		if (i % 64 == 0)
			cond_resched();
	}
	pr_info("allocstorm: done count=%lu kmalloc=%lu cache=%lu vmalloc=%lu ns=%llu\n",
		i, nk, nc, nv, ktime_get_ns() - start);
	while (!kthread_should_stop())
		schedule_timeout_interruptible(HZ);
	return 0;
}

static int __init allocstorm_init(void)
{
	storm_cache = kmem_cache_create("allocstorm_cache", 72, 0, 0, NULL);
	if (!storm_cache)
		return -ENOMEM;
	storm_task = kthread_run(storm_fn, NULL, "allocstorm");
	if (IS_ERR(storm_task)) {
		kmem_cache_destroy(storm_cache);
		return PTR_ERR(storm_task);
	}
	pr_info("allocstorm: started count=%lu\n", count);
	return 0;
}

static void __exit allocstorm_exit(void)
{
	kthread_stop(storm_task);
	kmem_cache_destroy(storm_cache);
}

module_init(allocstorm_init);
module_exit(allocstorm_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Allocation storm for qemuleak's tracer benchmarks");
