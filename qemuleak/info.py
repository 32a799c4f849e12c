"""`qemuleak info`: what is running in the guest, read without changing it."""

import json

from .errors import QemuleakError

from .guest import Guest
from .kernel import modules, tasks
from .kernel.kernel import Kernel


def describe(target: str, vmlinux=None, system_map=None, backend: str = "auto",
             ram_path=None) -> dict:
    """Facts about the guest at `target`; it is left running (or stopped) as found."""
    with Guest.connect(target, backend=backend, ram_path=ram_path) as guest:
        kernel = Kernel.open(guest, vmlinux=vmlinux, system_map=system_map)
        mod_list = modules.for_each_module(kernel)
        symbols = modules.Symbolizer(kernel, mod_list)
        vcpus = []
        for cpu in range(len(guest.cpus())):
            regs = guest.registers(cpu)
            try:
                t = tasks.task(kernel, tasks.current_task(kernel, cpu))
                comm, pid = t.comm, t.pid
            except QemuleakError as e:
                comm, pid = f"? ({e.message})", None
            pc = regs[guest.arch.pc_reg]
            vcpus.append({"cpu": cpu, "comm": comm, "pid": pid, "pc": f"{pc:#x}",
                          "where": symbols.format(pc) if guest.arch.in_kernel(regs) else "user",
                          "mode": "kernel" if guest.arch.in_kernel(regs) else "user"})
        mods = [{"name": m.name, "address": f"{m.address:#x}",
                 "regions": [[f"{s:#x}", n] for s, n in m.regions]}
                for m in mod_list]
        return {
            "target": target,
            "arch": guest.arch.name,
            "banner": kernel.banner,
            "release": kernel.info.release if kernel.info else kernel.banner.split()[2],
            "kaslr_offset": f"{kernel.slide:#x}",
            "kaslr_method": kernel.slide_method,
            "symbols": f"{kernel.symbol_source} ({len(kernel.symbols)} symbols)",
            "types": kernel.types_source,
            "memory_backend": guest.mem.name,
            "memory_backend_detail": guest.backend_note,
            "ram_bytes": guest.ram_size(),
            "ram_ranges": [[f"{r.gpa:#x}", r.size] for r in guest.ranges],
            "vcpus": vcpus,
            "modules": mods,
            "was_running": guest.was_running,
        }


def format_text(d: dict) -> str:
    lines = [
        f"target          {d['target']}",
        f"arch            {d['arch']}",
        f"kernel          {d['banner']}",
        f"kaslr_offset    {d['kaslr_offset']} (from {d['kaslr_method']})",
        f"symbols         {d['symbols']}",
        f"types           {d['types']}",
        f"memory_backend  {d['memory_backend']} ({d['memory_backend_detail']})",
        f"ram             {d['ram_bytes'] >> 20} MiB: "
        + ", ".join(f"{gpa}+{size >> 20}M" for gpa, size in d["ram_ranges"]),
        f"vcpus           {len(d['vcpus'])}",
    ]
    for v in d["vcpus"]:
        lines.append(f"  cpu {v['cpu']}: {v['comm']} (pid {v['pid']}) in {v['mode']} mode at {v['where']}")
    lines.append(f"modules         {len(d['modules'])}")
    for m in d["modules"]:
        size = sum(n for _, n in m["regions"])
        lines.append(f"  {m['name']:<20} {m['regions'][0][0] if m['regions'] else '?'} ({size} bytes)")
    lines.append(f"guest           {'resumed' if d['was_running'] else 'left stopped, as found'}")
    return "\n".join(lines)


def to_json(d: dict) -> str:
    return json.dumps(d, indent=2)
