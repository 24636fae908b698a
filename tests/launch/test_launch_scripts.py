"""launch/tpu_pod.sh (gcloud commands, printed with --dry_run), launch/local_multihost.sh and
launch/train.py's flag errors."""
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*argv, **kw):
  return subprocess.run([os.path.join(REPO, "launch", argv[0]), *argv[1:]], capture_output=True,
                        text=True, timeout=60, cwd=REPO, **kw)


def test_tpu_pod_all_creates_installs_runs_on_every_worker_and_deletes():
  out = _run("tpu_pod.sh", "all", "--name", "ft", "--zone", "us-east5-a", "--type", "v5p-64",
             "--queued", "--spot", "--dry_run", "--", "python", "launch/train.py",
             "--distributed", "--config", "configs/flowtok_xl.py", "--workdir", "gs://b/r")
  assert out.returncode == 0, out.stderr
  lines = [shlex.split(line) for line in out.stdout.splitlines()]
  assert lines[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-id", "ft", "--accelerator-type", "v5p-64", "--spot"} <= set(lines[0])
  assert lines[1][:2] == ["git", "-C"] and "archive" in lines[1]
  assert lines[2][3:5] == ["tpu-vm", "scp"] and "--worker=all" in lines[2]
  install, run = lines[3][-1], lines[4][-1]
  assert "pip install -q -e '.[tpu]'" in install and "--worker=all" in lines[3]
  # The venv's Python is one setup.py accepts (>= 3.11; TPU VM images ship 3.10), apt-installed
  # where the image lacks it.
  assert "python3.11 -m venv .venv" in install
  assert "command -v python3.11 >/dev/null || {" in install
  assert "sudo apt-get install -y -qq python3.11 python3.11-venv" in install
  # The same command on all workers, with the repository's venv python.
  assert "--worker=all" in lines[4]
  assert ".venv/bin/python launch/train.py --distributed --config configs/flowtok_xl.py" in run
  assert lines[5][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]


def test_tpu_pod_install_with_another_python():
  out = _run("tpu_pod.sh", "install", "--name", "ft", "--zone", "z", "--python", "python3.12",
             "--dry_run")
  assert out.returncode == 0, out.stderr
  install = shlex.split(out.stdout.splitlines()[-1])[-1]
  assert "python3.12 -m venv .venv" in install and "python3.11" not in install


def test_tpu_pod_usage_errors():
  assert _run("tpu_pod.sh", "all", "--zone", "z").returncode == 2
  bad = _run("tpu_pod.sh", "launch", "--name", "a", "--zone", "z")
  assert bad.returncode == 2 and "unknown action launch" in bad.stderr
  assert _run("tpu_pod.sh", "run", "--name", "a", "--zone", "z", "--dry_run").returncode == 2


def test_local_multihost_passes_process_ids_and_reports_failures(tmp_path):
  script = ("import sys; a = sys.argv; i = int(a[a.index('--process_id') + 1]); "
            "print('p', i, a[a.index('--num_processes') + 1], a[a.index('--coordinator') + 1]); "
            "sys.exit(3 if i == 2 and 'fail' in a else 0)")
  env = {**os.environ, "PYTHON": sys.executable}
  ok = _run("local_multihost.sh", "-n", "3", "-d", "2", "-l", str(tmp_path / "ok"), "--",
            sys.executable, "-c", script, env=env)
  assert ok.returncode == 0, ok.stderr
  for i in range(3):
    words = (tmp_path / "ok" / f"process_{i}.log").read_text().split()
    assert words[:3] == ["p", str(i), "3"] and words[3].startswith("127.0.0.1:")
  bad = _run("local_multihost.sh", "-n", "3", "-l", str(tmp_path / "bad"), "--",
             sys.executable, "-c", script, "fail", env=env)
  assert bad.returncode == 3 and "failed (exit 3)" in bad.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--config", "configs/demo.py"], "--workdir"),  # a required flag missing
    (["--config", "configs/demo.py", "--workdir", "w", "--num_processes=two"], "num_processes"),
    (["--config", "configs/demo.py", "--workdir", "w", "--bogus"], "bogus"),
])
def test_train_entry_point_flag_errors_are_one_line_exit_2(argv, needle):
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), *argv],
                       capture_output=True, text=True, cwd=REPO, check=False)
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2, out.stderr
  assert len(lines) == 1 and lines[0].startswith("flowtok: error:") and needle in lines[0], lines


@pytest.mark.parametrize("flag", ["--help", "--helpfull"])
def test_train_entry_point_help_exits_0(flag):
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), flag],
                       capture_output=True, text=True, cwd=REPO, check=False)
  assert out.returncode == 0, out.stderr
  assert "--workdir" in out.stdout and "--distributed" in out.stdout
