"""run's error for a failing guest command: the command named, qemuleak's own
console lines left out of the tail. The real guest case is test_workflows'
test_run_errors_exit_2."""

from qemuleak import run_cmd

CONSOLE = ("~ # PS4='qemuleak-cmd: ' sh -ex /qemuleak/run.sh; echo qemuleak-run-exit:$?\n"
           "qemuleak-cmd: insmod /modules/leaky.ko\n"
           "[   12.000000] leaky: ready\n"
           "qemuleak-cmd: qemuleak-scan mid\n"
           "qemuleak-scan-request:mid\n"
           "\x1b[6nqemuleak-cmd: cat /nonexistent\n"
           "cat: can't open '/nonexistent': No such file or directory\n"
           "qemuleak-run-exit:1\n")


def test_the_failing_command_is_the_last_traced():
    assert run_cmd.TRACED.findall(run_cmd.ESCAPES.sub("", CONSOLE))[-1] == "cat /nonexistent"


def test_the_tail_keeps_the_guest_and_drops_qemuleak():
    tail = run_cmd.workload_tail(CONSOLE)
    assert tail.splitlines() == ["[   12.000000] leaky: ready",
                                 "cat: can't open '/nonexistent': No such file or directory"]
