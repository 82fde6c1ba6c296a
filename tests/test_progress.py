"""Progress output: a bar on a terminal, plain lines in files and pipes."""

import io

from safebasin.safety_core.progress import Progress, track


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_n_steps_off_a_terminal():
    out = io.StringIO()
    p = Progress(10, "train", every=4, unit="step", stream=out)
    for step in range(10):
        p.set_postfix(loss=f"{1 / (step + 1):.2f}")
        p.update()
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" (")[0] for line in lines] == [
        "[safebasin] train: 4/10 step, loss 0.25", "[safebasin] train: 8/10 step, loss 0.12",
        "[safebasin] train: 10/10 step, loss 0.10"]


def test_a_bar_on_a_terminal_and_nothing_when_disabled():
    term = Terminal()
    p = Progress(3, "train", every=1, stream=term)
    for _ in range(3):
        p.update()
    p.close()
    assert "\r" in term.getvalue() and "3/3" in term.getvalue() and "[safebasin]" not in term.getvalue()
    quiet = io.StringIO()
    p = Progress(3, "train", every=1, disable=True, stream=quiet)
    p.update()
    p.close()
    assert quiet.getvalue() == ""


def test_track_prints_one_closing_line(capsys):
    assert list(track(range(5), "generate")) == list(range(5))
    err = capsys.readouterr().err
    assert err.startswith("[safebasin] generate: 5/5 it") and err.count("\n") == 1
