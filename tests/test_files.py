"""Every file a command writes is planned and checked before any work, written to temp files, committed last:
a table of output-path conflicts per output flag, long names, stale temp files, and Ctrl-C at exact points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import PYTHON, ROOT, assert_clean_error, files_in

from bntool import load_model, zoo
from bntool.cli import main
from bntool.errors import InputError
from bntool.files import TEMP_PREFIX, OutputKind, Outputs, clean_stale_temps
from bntool.tempfiles import InterruptAt, WriteSession, atomic_write, current_session

ARCH = ["--arch", "bntool.zoo:resnet"]
SHAPE = ["--input-shape", "1,3,32,32"]


@pytest.fixture
def workspace(tmp_path):
    """A checkpoint, calibration data and an unrelated existing file, with their bytes to compare after."""
    ckpt = tmp_path / "in.pt"
    torch.save(zoo.build("resnet").state_dict(), ckpt)
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    other = tmp_path / "existing.txt"
    other.write_text("keep me")
    return tmp_path


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.is_symlink()}


# Each output flag of each command: (command line before the output, the output flag, extra args after).
def _commands(ws):
    ckpt, data = ws / "in.pt", ws / "x.npy"
    return {
        "fold -o": (["fold", ckpt, *ARCH, *SHAPE, "--samples", "1"], "-o", []),
        "recalibrate -o": (["recalibrate", ckpt, *ARCH, "--data", data, "--workers", "0"], "-o", []),
        "recalibrate --plot": (["recalibrate", ckpt, *ARCH, "--data", data, "--workers", "0", "-o", ws / "r.pt"],
                               "--plot", []),
        "export-onnx -o": (["export-onnx", ckpt, *ARCH, *SHAPE, "--exporter", "legacy", "--samples", "1"], "-o", []),
        "verify --junit-xml": (["verify", ckpt, *ARCH, *SHAPE, "--skip-onnx", "--samples", "1"], "--junit-xml", []),
    }


def _target(ws, case: str):
    """The path given to the output flag, for each kind of conflict."""
    if case == "the input":
        return ws / "in.pt"
    if case == "a symlink to the input":
        (ws / "link.pt").symlink_to(ws / "in.pt")
        return ws / "link.pt"
    if case == "a hard link to the input":
        os.link(ws / "in.pt", ws / "hard.pt")
        return ws / "hard.pt"
    if case == "the data file":
        return ws / "x.npy"
    if case == "an existing file":
        return ws / "existing.txt"
    if case == "a directory":
        (ws / "sub").mkdir()
        return ws / "sub"
    if case == "a missing directory":
        return ws / "nope" / "out"
    if case == "a 300-character name":
        return ws / ("n" * 296 + ".out")
    raise AssertionError(case)


CASES = {  # case -> a word the one error line must contain
    "the input": "input",
    "a symlink to the input": "input",
    "a hard link to the input": "input",
    "the data file": "input",
    "an existing file": "--force",
    "a directory": "is a directory",
    "a missing directory": "does not exist",
    "a 300-character name": "bytes long",
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["fold -o", "recalibrate -o", "recalibrate --plot", "export-onnx -o",
                                     "verify --junit-xml"])
def test_output_conflicts_are_refused_before_any_work(workspace, cli, command, case):
    before_target = _target(workspace, case)
    before = _snapshot(workspace)
    args, flag, extra = _commands(workspace)[command]
    if command == "recalibrate --plot" and case in ("an existing file",):
        pytest.importorskip("matplotlib")
    result = cli(*args, flag, before_target, *extra)
    reads_data = command.startswith("recalibrate")
    expected = "--force" if case == "the data file" and not reads_data else CASES[case]  # not an input there
    assert_clean_error(result, contains=expected)
    assert result.err.startswith(f"error: {flag} "), result.err  # every command names the output by its flag
    assert _snapshot(workspace) == before  # nothing written, nothing changed
    assert not [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("command", ["fold -o", "export-onnx -o", "verify --junit-xml"])
def test_a_report_or_onnx_never_replaces_a_checkpoint_even_with_force(workspace, cli, command):
    victim = workspace / "other.pt"
    torch.save(zoo.build("mlp").state_dict(), victim)
    args, flag, extra = _commands(workspace)[command]
    result = cli(*args, flag, victim, "--force", *extra)
    if command == "fold -o":  # a checkpoint over a checkpoint is what --force is for
        assert result.code == 0, result.err
        return
    noun = {"export-onnx -o": "an ONNX file", "verify --junit-xml": "a report"}[command]
    assert_clean_error(result, contains=f"{flag} {victim}: is a PyTorch checkpoint; {noun} will not replace it")
    assert torch.load(victim, weights_only=True).keys() == zoo.build("mlp").state_dict().keys()


@pytest.mark.parametrize("kind, noun", [(OutputKind.ONNX, "an ONNX file"), (OutputKind.PLOT, "a plot"),
                                        (OutputKind.REPORT, "a report"), (OutputKind.DEMO, "a demo file")])
def test_the_kind_that_will_not_replace_a_checkpoint_reads_naturally(tmp_path, kind, noun):
    victim = tmp_path / "weights.pt"
    torch.save(zoo.build("mlp").state_dict(), victim)
    outputs = Outputs()
    outputs.add(victim, kind, force=True, what="--out")
    with pytest.raises(InputError) as e:
        outputs.check()
    assert str(e.value) == (f"--out {victim}: is a PyTorch checkpoint; {noun} will not replace it "
                            "(choose another name)")


def test_library_messages_name_the_output_parameter(workspace):
    """The library names `path=`/`out=` (the CLI renders both as -o), never the CLI's flag or a bare role."""
    from bntool import export_onnx, load_checkpoint, save_checkpoint
    from bntool.cli import flag_name

    missing = workspace / "nope" / "m.onnx"
    with pytest.raises(InputError) as e:
        export_onnx(zoo.build("resnet"), torch.zeros(1, 3, 32, 32), missing)
    assert str(e.value).startswith(f"path {missing}: output directory"), str(e.value)
    assert e.value.render(flag_name).startswith(f"-o {missing}: output directory")
    ckpt = load_checkpoint(workspace / "in.pt", arch="bntool.zoo:resnet")
    with pytest.raises(InputError) as e:
        save_checkpoint(ckpt, ckpt.model, workspace / "nope" / "out.pt")
    assert str(e.value) == f"out {workspace / 'nope' / 'out.pt'}: output directory {workspace / 'nope'} does not exist"


def test_in_place_only_for_the_checkpoint_output(workspace, cli):
    ckpt = workspace / "in.pt"
    result = cli("fold", ckpt, *ARCH, *SHAPE, "-o", ckpt, "--in-place", "--samples", "1")
    assert result.code == 0, result.err
    assert "bntool.fold_layout" in torch.load(ckpt, weights_only=True)


@pytest.mark.parametrize("flag", ["-o", "--plot"])
def test_an_output_never_replaces_a_file_of_the_data_folder_even_with_force(workspace, cli, flag):
    """`--data DIR`: each image in it is an input; `-o DIR/a.png --force` once wrote a checkpoint over it."""
    from PIL import Image

    folder = workspace / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg"):
        Image.fromarray(np.full((40, 37, 3), 128, np.uint8)).save(folder / name)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    outputs = {"-o": workspace / "r.pt", "--plot": workspace / "r.png"}
    outputs[flag] = folder / "sub" / "b.jpg"
    args = ["--plot", outputs["--plot"]] if flag == "--plot" else []
    result = cli("recalibrate", workspace / "in.pt", *ARCH, "--data", folder, "--image-size", "32", "--workers", "0",
                 "-o", outputs["-o"], "--force", *args)
    assert_clean_error(result, contains="inside the input folder")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not (workspace / "r.pt").exists()


def test_two_outputs_on_one_file(workspace, cli):
    out = workspace / "out.pt"
    result = cli("recalibrate", workspace / "in.pt", *ARCH, "--data", workspace / "x.npy", "-o", out,
                 "--plot", out, "--workers", "0")
    assert_clean_error(result, contains="give each output its own file")
    assert not out.exists()


@pytest.mark.parametrize("length", [240, 254])
def test_long_legal_names_work(workspace, cli, length):
    out = workspace / ("f" * (length - 3) + ".pt")
    assert len(out.name) == length
    result = cli("fold", workspace / "in.pt", *ARCH, *SHAPE, "-o", out, "--samples", "1")
    assert result.code == 0, result.err
    assert out.exists()
    onnx_out = workspace / ("g" * (length - 5) + ".onnx")
    result = cli("export-onnx", workspace / "in.pt", *ARCH, *SHAPE, "-o", onnx_out, "--exporter", "legacy",
                 "--samples", "0")
    assert result.code == 0, result.err
    assert onnx_out.exists()
    assert not [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("name", ["noext", "sub/noext", "model.a-suffix-over-16-chars"])
@pytest.mark.parametrize("command", ["fold -o", "recalibrate -o", "export-onnx -o", "verify --junit-xml"])
def test_outputs_without_a_suffix_are_written(workspace, cli, command, name):
    """torch.save names its zip archive after the file name up to the last dot: a suffix-less temp name
    (`.bntool-tmp-…`) once made it fail with an internal error."""
    (workspace / "sub").mkdir()
    out = workspace / name
    args, flag, extra = _commands(workspace)[command]
    result = cli(*args, flag, out, *extra)
    assert result.code == 0, result.err
    if command == "export-onnx -o":
        import onnx

        onnx.checker.check_model(onnx.load(str(out)))
    elif command == "verify --junit-xml":
        assert out.read_text().startswith("<?xml")
    else:
        original = load_model(workspace / "in.pt", arch="bntool.zoo:resnet")
        written = load_model(out, arch="bntool.zoo:resnet")
        x = torch.randn(2, 3, 32, 32)
        if command == "fold -o":  # the folded model computes what the original does
            torch.testing.assert_close(written(x), original(x), rtol=1e-4, atol=1e-4)
        else:  # recalibration changes BN statistics only
            torch.testing.assert_close(written.stem[0].weight, original.stem[0].weight, rtol=0, atol=0)
    assert not [n for n in os.listdir(out.parent) if n.startswith(TEMP_PREFIX)]


def test_a_safetensors_output_without_a_suffix_is_written(workspace, cli):
    from safetensors.torch import load_file, save_file

    model = zoo.build("resnet")
    source = workspace / "in.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, source)
    out = workspace / "noext"
    result = cli("recalibrate", source, *ARCH, "--data", workspace / "x.npy", "--workers", "0", "-o", out)
    assert result.code == 0, result.err
    assert load_file(str(out)).keys() == model.state_dict().keys()  # the input's format, as for any other suffix
    again = cli("inspect", out, *ARCH, "--json")  # and it reads back, whatever its name: the content says
    assert again.code == 0, again.err


def test_plot_needs_a_known_format_before_any_work(workspace, cli):
    pytest.importorskip("matplotlib")
    out = workspace / "r.pt"
    result = cli("recalibrate", workspace / "in.pt", *ARCH, "--data", workspace / "x.npy", "-o", out,
                 "--plot", workspace / "shift.xyz", "--workers", "0")
    assert_clean_error(result, contains="xyz")
    assert not out.exists()


def test_plot_without_matplotlib_fails_before_any_work(workspace, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = workspace / "r.pt"
    result = cli("recalibrate", workspace / "in.pt", *ARCH, "--data", workspace / "x.npy", "-o", out,
                 "--plot", workspace / "shift.png", "--workers", "0")
    assert_clean_error(result, contains="matplotlib")
    assert not out.exists()


def test_provider_checked_before_any_work(workspace, cli):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here")
    out = workspace / "m.onnx"
    result = cli("export-onnx", workspace / "in.pt", *ARCH, *SHAPE, "-o", out, "--provider", "cuda")
    assert_clean_error(result, contains="cuda")
    assert not out.exists()


# ---------------------------------------------------------------- demo


def test_demo_refuses_a_non_empty_directory_without_force(tmp_path, cli):
    directory = tmp_path / "demo"
    directory.mkdir()
    (directory / "model.pt").write_bytes(b"mine")
    assert_clean_error(cli("demo", directory), contains="--force")
    assert (directory / "model.pt").read_bytes() == b"mine"
    assert_clean_error(cli("demo", tmp_path / "demo" / "model.pt"), contains="not a directory")


# ---------------------------------------------------------------- temp files


def test_stale_temp_files_of_dead_processes_are_cleaned(tmp_path):
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f"{TEMP_PREFIX}{pid}-deadbeef"
    stale.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f"{TEMP_PREFIX}{pid}-cafebabe"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"x")
    alive = tmp_path / f"{TEMP_PREFIX}{os.getppid()}-0badf00d"  # a running process's temp file stays
    alive.write_bytes(b"x")
    mine = tmp_path / "notes.tmp"
    mine.write_bytes(b"x")
    assert sorted(p.name for p in clean_stale_temps(tmp_path)) == sorted([stale.name, stale_dir.name])
    assert files_in(tmp_path) == {alive.name, mine.name}


# ---------------------------------------------------------------- Ctrl-C at exact points


def _run_interrupted(point: str, *args, signal_name: str = "INT") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BNTOOL_TEST_INTERRUPT": point, "BNTOOL_TEST_SIGNAL": signal_name}
    return subprocess.run([PYTHON, "-m", "bntool", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before-commit", "during-commit", "after-commit"])
def test_ctrl_c_around_the_commit_tells_the_truth(workspace, point):
    ckpt = workspace / "in.pt"
    original = ckpt.read_bytes()
    plot = workspace / "shift.svg"
    args = ["recalibrate", ckpt, *ARCH, "--data", workspace / "x.npy", "--workers", "0", "-o", ckpt, "--in-place"]
    if point == "during-commit":
        pytest.importorskip("matplotlib")
        args += ["--plot", plot]
    result = _run_interrupted(point, *args)
    assert result.returncode == 130, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), result.stderr
    if point == "before-commit":
        assert "nothing written" in lines[0]
        assert ckpt.read_bytes() == original
    else:  # the commit finished: both files are whole, and the message says so
        assert "nothing written" not in lines[0] and str(ckpt) in lines[0]
        assert ckpt.read_bytes() != original
        torch.load(ckpt, weights_only=True)
        if point == "during-commit":
            assert str(plot) in lines[0] and plot.read_bytes().lstrip().startswith(b"<?xml")
            assert TEMP_PREFIX not in lines[0]
    assert not [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before-commit", "during-commit"])
def test_sigterm_unwinds_like_ctrl_c_and_never_cuts_a_commit_short(workspace, point):
    """CI runners cancel a job with SIGTERM: Python's default would end the process mid-rename, leaving one
    output new and one old, and temp files behind."""
    pytest.importorskip("matplotlib")
    out, plot = workspace / "r.pt", workspace / "shift.svg"
    result = _run_interrupted(point, "recalibrate", workspace / "in.pt", *ARCH, "--data", workspace / "x.npy",
                              "--workers", "0", "-o", out, "--plot", plot, signal_name="TERM")
    assert result.returncode == 143, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM): "), result.stderr
    if point == "before-commit":
        assert lines[0].endswith("nothing written") and not out.exists() and not plot.exists()
    else:  # held until both files were in place
        assert str(out) in lines[0] and str(plot) in lines[0]
        torch.load(out, weights_only=True)
        assert plot.read_bytes().lstrip().startswith(b"<?xml")
    assert not [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]


@pytest.mark.slow
def test_ctrl_c_during_interpreter_shutdown_prints_no_traceback(workspace):
    """A Ctrl-C after the command finished (torch's exit handlers run for a while) once printed a
    KeyboardInterrupt traceback under "Wrote ...". An exit handler registered first runs last: it sends SIGINT."""
    out = workspace / "folded.pt"
    code = ("import atexit, os, signal, sys\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), sum(range(10**6))))\n"
            "from bntool.cli import entry\n"
            f"sys.argv = ['bntool', 'fold', {str(workspace / 'in.pt')!r}, '--arch', 'bntool.zoo:resnet', "
            f"'--input-shape', '1,3,32,32', '--samples', '1', '-o', {str(out)!r}]\n"
            "entry()\n")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr
    assert f"Wrote {out}" in " ".join(result.stdout.split())
    torch.load(out, weights_only=True)


@pytest.mark.slow
def test_export_interrupted_during_the_check_leaves_nothing(workspace):
    out = workspace / "m.onnx"
    result = _run_interrupted("check", "export-onnx", workspace / "in.pt", *ARCH, *SHAPE, "-o", out,
                              "--exporter", "legacy")
    assert result.returncode == 130, result.stderr
    assert "nothing written" in result.stderr
    assert not out.exists()
    assert not [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]


def test_outputs_commit_records_what_was_written(tmp_path):
    session = WriteSession()
    with Outputs(session=session) as outputs:
        a = outputs.add(tmp_path / "a.txt", OutputKind.REPORT)
        b = outputs.add(tmp_path / "b.txt", OutputKind.REPORT)
        outputs.check()
        outputs.write(a, lambda tmp: open(tmp, "w").write("a"))
        outputs.write(b, lambda tmp: open(tmp, "w").write("b"))
        assert files_in(tmp_path) == {n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)}
        assert outputs.commit() == [a, b]
    assert session.committed == [a, b] and files_in(tmp_path) == {"a.txt", "b.txt"}
    with Outputs(session=session) as outputs:
        c = outputs.add(tmp_path / "c.txt", OutputKind.REPORT)
        outputs.check()
        outputs.write(c, lambda tmp: open(tmp, "w").write("c"))
        # leaving without commit (an error, a failed check) discards the temp file
    assert files_in(tmp_path) == {"a.txt", "b.txt"}
    assert session.committed == [a, b]


def test_writes_record_into_the_active_session_only(tmp_path):
    """No module-level record: a write outside an active session is recorded nowhere that a later run reads,
    and `Outputs` made by the library inside a run (export_onnx, fold_onnx, the demo) record into the run's."""
    atomic_write(tmp_path / "loose.txt", lambda tmp: open(tmp, "w").write("x"))
    assert current_session().committed == []
    run = WriteSession()
    with run.active():
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("a"))
        with Outputs() as outputs:  # no session passed: the active one
            b = outputs.add(tmp_path / "b.txt", OutputKind.REPORT)
            outputs.check()
            outputs.write(b, lambda tmp: open(tmp, "w").write("b"))
            outputs.commit()
    assert run.committed == [tmp_path / "a.txt", b]
    assert current_session().committed == []


def test_stale_temp_files_are_swept_once_per_session(tmp_path):
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first, second = (tmp_path / f"{TEMP_PREFIX}{int(dead.stdout)}-{tag}" for tag in ("0000aaaa", "0000bbbb"))
    first.write_bytes(b"x")
    session = WriteSession()
    assert clean_stale_temps(tmp_path, session) == [first]
    second.write_bytes(b"x")
    assert clean_stale_temps(tmp_path, session) == []  # this session swept the folder already
    assert clean_stale_temps(tmp_path, WriteSession()) == [second]


@pytest.mark.parametrize("point", ["before-commit", "during-commit"])  # all points: the slow tests above
def test_the_interrupt_hook_is_an_object_the_caller_passes(workspace, capsys, point):
    """The test hook is injected (never read from the environment inside a commit): a real SIGINT at the point,
    and the Ctrl-C message says truthfully what was written."""
    out = workspace / "folded.pt"
    args = ["fold", workspace / "in.pt", *ARCH, *SHAPE, "--samples", "1", "-o", out]
    capsys.readouterr()
    code = main([str(a) for a in args], interrupt=InterruptAt(point))
    err = capsys.readouterr().err.strip()
    assert code == 130, err
    if point == "before-commit":
        assert err == "interrupted: nothing written" and not out.exists()
    else:
        assert err == f"interrupted: wrote {out} (complete); nothing else written"
        torch.load(out, weights_only=True)
    assert not [n for n in os.listdir(workspace) if n.startswith(TEMP_PREFIX)]
    if point == "during-commit":  # the next run in this process says only what it wrote itself
        code = main([str(a) for a in args[:-2]] + ["-o", str(workspace / "again.pt")],
                    interrupt=InterruptAt("before-commit"))
        assert (code, capsys.readouterr().err.strip()) == (130, "interrupted: nothing written")


def test_the_interrupt_hook_reads_the_environment_only_when_asked():
    assert InterruptAt.from_env({}) is None
    assert InterruptAt.from_env({"BNTOOL_TEST_INTERRUPT": "check"}) == InterruptAt("check", signal.SIGINT)
    assert InterruptAt.from_env({"BNTOOL_TEST_INTERRUPT": "check", "BNTOOL_TEST_SIGNAL": "TERM"}) == InterruptAt(
        "check", signal.SIGTERM)


def test_names_too_long_for_the_system_are_exit_2_in_one_line(workspace, cli):
    """A 303-character checkpoint name and a 4,300-character -o (real folders, beyond PATH_MAX) were exit 3
    (OSError: File name too long)."""
    long_ckpt = workspace / ("a" * 300 + ".pt")
    result = cli("inspect", long_ckpt, *ARCH)
    assert_clean_error(result, contains="cannot be read (File name too long)")
    assert len(result.err) < 400  # the path is shortened in the message
    deep = _deep_folder(workspace, 22)  # 22 × 201 characters: each folder legal, the whole path beyond 4,096
    before = _snapshot(workspace)
    result = cli("fold", workspace / "in.pt", *ARCH, *SHAPE, "-o", os.path.join(deep, "x.pt"))
    assert_clean_error(result, contains="cannot be written (File name too long)")
    assert _snapshot(workspace) == before


def _deep_folder(root, depth: int) -> str:
    """Create `depth` nested folders of 200 characters under `root` (through relative paths: the whole one is
    too long for the system) and return the whole path."""
    here = os.getcwd()
    try:
        os.chdir(root)
        for _ in range(depth):
            os.mkdir("d" * 200)
            os.chdir("d" * 200)
    finally:
        os.chdir(here)
    return os.path.join(str(root), *["d" * 200] * depth)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_demo_where_no_directory_can_be_made_is_exit_2(cli):
    assert_clean_error(cli("demo", "/proc/bntool-demo"), contains="/proc/bntool-demo: cannot create")


@pytest.mark.parametrize("kind", ["fifo", "char device", "directory"])
def test_a_checkpoint_that_is_not_a_regular_file_says_what_it_is(tmp_path, cli, kind):
    """/dev/urandom read as "file is empty"; a FIFO is never opened (that would wait for a writer)."""
    if kind == "fifo":
        path, noun = tmp_path / "pipe.pt", "a named pipe (FIFO)"
        os.mkfifo(path)
    elif kind == "char device":
        path, noun = "/dev/urandom", "a character device"
        if not os.path.exists(path):
            pytest.skip("no /dev/urandom")
    else:
        path, noun = tmp_path, "a directory"
    assert_clean_error(cli("inspect", path, *ARCH), contains=f"{path}: is {noun}, not a regular file")
    assert_clean_error(cli("recalibrate", tmp_path / "missing.pt", *ARCH, "--data", path, "-o", tmp_path / "o.pt"))
    if kind != "directory":
        in_pt = tmp_path / "in.pt"
        torch.save(zoo.build("resnet").state_dict(), in_pt)
        assert_clean_error(cli("recalibrate", in_pt, *ARCH, "--data", path, "-o", tmp_path / "o.pt"),
                           contains=f"{path}: is {noun}, not a regular file")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_process_forked_during_a_run_gets_default_signal_handling():
    """DataLoader workers forked during a run inherited the run's handlers: `timeout -s TERM` signals the whole
    process group, and the handler raising in a worker's bootstrap printed a traceback above `terminated:`."""
    import functools
    import signal

    from bntool.cli import runner
    from bntool.cli.shared import Run
    from bntool.tempfiles import WriteSession

    run = Run(WriteSession())
    runner._reset_signals_in_forked_children()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, functools.partial(runner._on_sigterm, run))
    signal.signal(signal.SIGINT, functools.partial(runner._on_sigint, run))
    try:
        pid = os.fork()
        if pid == 0:
            ok = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert os.WEXITSTATUS(status) == 0


def test_an_interrupted_run_s_json_error_needs_no_torch(monkeypatch, capsys):
    """A Ctrl-C while torch was being imported left it half-imported; --json's error object imported it again for
    the versions (through report.py) and crashed: exit 1, a traceback, nothing on stdout."""
    import json
    import sys

    from bntool.cli import runner
    from bntool.cli.shared import Run
    from bntool.tempfiles import WriteSession

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails, as for a half-imported torch
    monkeypatch.delitem(sys.modules, "bntool.report", raising=False)
    monkeypatch.delitem(sys.modules, "bntool.inspection", raising=False)
    runner._print_error_json(["inspect", "m.pt", "--json"], 130, Run(WriteSession()))
    document = json.loads(capsys.readouterr().out)
    assert document["error"]["exit_code"] == 130 and document["versions"]["bntool"]
