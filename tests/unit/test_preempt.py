"""tasks.preempt_count_reader: where each kernel keeps the preempt count."""

from qemuleak.kernel import tasks


class Types:
    def __init__(self, members):
        self.members = members

    def has_member(self, name, member):
        return member in self.members.get(name, {})

    def offsetof(self, name, member):
        return self.members[name][member]


class Kernel:
    def __init__(self, symbols, members, memory):
        self.symbols, self.types, self.memory = symbols, Types(members), memory

    def sym(self, name):
        return self.symbols[name]

    def read_u32(self, at):
        return self.memory[at]


BASE = 0xFFFF88801F000000          # a CPU's per-CPU base
TASK = 0xFFFF888003000000


def test_x86_6_1_per_cpu_variable():
    k = Kernel({"__preempt_count": 0x1FB40}, {}, {BASE + 0x1FB40: 0x100})
    assert tasks.preempt_count_reader(k)(BASE, lambda: TASK) == 0x100


def test_x86_6_12_pcpu_hot():
    k = Kernel({"pcpu_hot": 0x35000}, {"struct pcpu_hot": {"current_task": 0, "preempt_count": 8}},
               {BASE + 0x35008: 0x10000})
    assert tasks.preempt_count_reader(k)(BASE, lambda: TASK) == 0x10000


def test_arm64_thread_info():
    k = Kernel({}, {"struct task_struct": {"thread_info": 0},
                    "struct thread_info": {"preempt_count": 8}}, {TASK + 8: 0x201})
    assert tasks.preempt_count_reader(k)(None, lambda: TASK) == 0x201


def test_unknown_reads_zero():
    k = Kernel({}, {}, {})
    assert tasks.preempt_count_reader(k)(BASE, lambda: TASK) == 0
