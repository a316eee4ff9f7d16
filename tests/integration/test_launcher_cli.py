"""The launcher, `capkv up` and the client commands, as real processes.

Most of these run over the in-memory fake services (tests/api/fakes.py), so they test the
process handling, the CLI and the HTTP layer, not Raft; one `capkv up` test runs the
real cp mode when it exists.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from api.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, main
from clusters.launcher import ClusterError
from clusters.spec import free_ports, write_cluster_file
from tests.integration.conftest import FAKE_FACTORIES, require_service

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def children_of_launcher(launcher_pid: int) -> list[int]:
    """Pids of `capkv serve` processes started by the launcher in process `launcher_pid`."""
    marker = f"--parent-pid\0{launcher_pid}\0".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return [p for p in pids if pid_alive(p)]


# --- the launcher ------------------------------------------------------------------------------


def test_launcher_start_kill_pause_restart_stop(fake_cluster):
    cluster = fake_cluster("cp", nodes=3)
    assert cluster.leader() == "n1"
    assert len(cluster.urls) == 3
    for node in cluster.nodes.values():
        assert node.running and node.pid and http("GET", node.client_url + "/healthz")[0] == 200
    # data through one node
    assert http("PUT", cluster.url("n2") + "/v1/kv/k", b"v")[0] == 200
    assert json.loads(http("GET", cluster.url("n2") + "/v1/kv/k")[1])["value"] == "v"

    old_pid = cluster.nodes["n2"].pid
    cluster.kill("n2")
    assert not cluster.nodes["n2"].running and not pid_alive(old_pid)
    with pytest.raises(ClusterError, match="not running"):
        cluster.wait_healthy(["n2"], timeout=5)
    cluster.restart("n2")
    assert cluster.nodes["n2"].pid != old_pid and http("GET", cluster.url("n2") + "/healthz")[0] == 200
    with pytest.raises(ClusterError, match="still running"):
        cluster.restart("n2")

    cluster.pause("n3")
    with pytest.raises(OSError):  # a stopped process accepts the connection but never answers
        urllib.request.urlopen(cluster.url("n3") + "/healthz", timeout=0.5)
    cluster.resume("n3")
    cluster.wait_healthy(["n3"], timeout=10)

    assert cluster.stop_node("n1") == 0  # SIGTERM: a clean exit
    cluster.restart("n1")

    pids = [n.pid for n in cluster.nodes.values()]
    cluster.pause("n2")  # stop() must also end paused nodes
    cluster._check()
    cluster.stop()
    cluster.stop()  # idempotent
    assert not any(pid_alive(p) for p in pids)
    assert all(not n.running for n in cluster.nodes.values())
    log = cluster.log_tail("n1")
    assert "serving" in log and "stopped" in log


def test_launcher_reports_a_node_that_cannot_start(fake_cluster, tmp_path):
    cluster = fake_cluster("cp", nodes=2, start=False, extra_args=("--vnodes", "0"))  # a bad flag: exits 2
    with pytest.raises(ClusterError) as excinfo:
        cluster.start(timeout=20)
    assert "vnodes" in str(excinfo.value)  # the log tail says why
    assert all(not n.running for n in cluster.nodes.values())


def test_secret_never_appears_on_the_command_line(fake_cluster):
    cluster = fake_cluster("cp", nodes=1)
    secret = (cluster.data_dir / "cluster.secret").read_text().strip()
    with open(f"/proc/{cluster.nodes['n1'].pid}/cmdline", "rb") as f:
        argv = f.read().decode()
    assert secret not in argv and "--secret-file" in argv
    assert os.stat(cluster.data_dir / "cluster.secret").st_mode & 0o077 == 0


# --- client commands -------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_commands_against_a_cp_cluster(fake_cluster, capsys, monkeypatch):
    cluster = fake_cluster("cp", nodes=1)
    ep = ("--endpoints", ",".join(cluster.urls))

    code, out, _ = run_cli(capsys, "put", "greeting", "hello", *ep)
    assert code == EXIT_OK and out.startswith("OK revision")
    code, out, _ = run_cli(capsys, "get", "greeting", *ep)
    assert code == EXIT_OK and out.splitlines()[0] == "hello" and "mod_revision" in out
    code, out, _ = run_cli(capsys, "get", "greeting", "-o", "json", *ep)
    record = json.loads(out)
    assert code == EXIT_OK and record["value"] == "hello" and record["version"] == 1

    monkeypatch.setattr("sys.stdin", _BinaryStdin(b"\x00from stdin\xff"))
    code, out, _ = run_cli(capsys, "put", "bin", "-", *ep)
    assert code == EXIT_OK
    code, out, _ = run_cli(capsys, "get", "bin", "-o", "json", *ep)
    assert "value_base64" in json.loads(out)

    code, out, err = run_cli(capsys, "get", "nope", *ep)
    assert code == EXIT_NOT_FOUND and "key_not_found" in err
    code, out, err = run_cli(capsys, "get", "nope", "-o", "json", *ep)
    assert code == EXIT_NOT_FOUND and json.loads(out)["error"]["code"] == "key_not_found"

    code, _, err = run_cli(capsys, "put", "greeting", "again", "--if-mod-revision", "0", *ep)
    assert code == EXIT_NOT_FOUND and "precondition_failed" in err

    for key in ("ls/a", "ls/b", "other"):
        run_cli(capsys, "put", key, "v-" + key, *ep)
    code, out, _ = run_cli(capsys, "ls", "ls/", *ep)
    assert code == EXIT_OK and out.splitlines() == ["ls/a\tv-ls/a", "ls/b\tv-ls/b"]
    code, out, _ = run_cli(capsys, "ls", "ls/", "-o", "json", *ep)
    assert [i["key"] for i in json.loads(out)["items"]] == ["ls/a", "ls/b"]

    code, out, _ = run_cli(capsys, "del", "ls/", "--prefix", *ep)
    assert code == EXIT_OK and out.startswith("deleted 2")
    code, out, _ = run_cli(capsys, "ls", "ls/", *ep)
    assert out.strip() == "(no keys)"

    code, out, _ = run_cli(capsys, "cluster", *ep)
    assert code == EXIT_OK and "leader n1" in out
    code, out, _ = run_cli(capsys, "cluster", "-o", "json", *ep)
    assert json.loads(out)["mode"] == "cp"


def test_cli_commands_against_an_ap_cluster(fake_cluster, capsys):
    cluster = fake_cluster("ap", nodes=1)
    ep = ("--endpoints", cluster.urls[0])
    run_cli(capsys, "put", "cart", "apple", *ep)
    run_cli(capsys, "put", "cart", "pear", *ep)
    code, out, _ = run_cli(capsys, "get", "cart", *ep)
    assert code == EXIT_OK and "2 siblings" in out and "apple" in out and "pear" in out
    context = out.strip().splitlines()[-1].removeprefix("context: ")
    code, out, _ = run_cli(capsys, "put", "cart", "apple,pear", "--context", context, *ep)
    assert code == EXIT_OK and "context:" in out
    code, out, _ = run_cli(capsys, "get", "cart", "-o", "json", *ep)
    record = json.loads(out)
    assert record["value"] == "apple,pear" and len(record["siblings"]) == 1


def test_cli_exit_codes_for_usage_and_unavailable(capsys, tmp_path):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    code, _, err = run_cli(capsys, "get", "k", "--endpoints", dead, "--timeout", "1")
    assert code == EXIT_UNAVAILABLE and "cannot connect" in err
    code, _, err = run_cli(capsys, "get", "k", "--endpoints", "localhost:2379")
    assert code == EXIT_USAGE and "http://" in err
    code, _, err = run_cli(capsys, "get", "k", "--no-such-flag")
    assert code == EXIT_USAGE
    code, _, err = run_cli(capsys, "serve", "--mode", "cp", "--cluster", str(tmp_path / "missing.toml"), "--node", "n1")
    assert code == EXIT_USAGE and "does not exist" in err
    write_cluster_file(tmp_path / "c.toml", 1)
    code, _, err = run_cli(capsys, "serve", "--mode", "cp", "--cluster", str(tmp_path / "c.toml"), "--node", "n7",
                           "--data-dir", str(tmp_path / "d"))  # fmt: skip
    assert code == EXIT_USAGE and "no node 'n7'" in err and "n1" in err
    code, _, err = run_cli(capsys, "serve", "--mode", "ap", "--cluster", str(tmp_path / "c.toml"), "--node", "n1",
                           "--data-dir", str(tmp_path / "d"), "--replicas", "2", "--write-quorum", "3")  # fmt: skip
    assert code == EXIT_USAGE and "--write-quorum 3 is more than --replicas 2" in err


def test_cli_invalid_key_is_a_usage_exit(fake_cluster, capsys):
    cluster = fake_cluster("cp", nodes=1)
    code, _, err = run_cli(capsys, "put", "k" * 5000, "v", "--endpoints", cluster.urls[0])
    assert code == EXIT_USAGE and "invalid_key" in err


def test_help_documents_exit_codes():
    result = subprocess.run([sys.executable, "-m", "api.cli", "--help"], capture_output=True, text=True, timeout=30,
                            cwd=PROJECT_ROOT)  # fmt: skip
    assert result.returncode == 0
    for fragment in ("Exit codes", "0  success", "1  the key was not found", "3  unavailable"):
        assert fragment in result.stdout


class _BinaryStdin:
    def __init__(self, data: bytes):
        import io

        self.buffer = io.BytesIO(data)


# --- capkv up ----------------------------------------------------------------------------------------


class UpProcess:
    """`capkv up` as a subprocess, its output collected by a thread."""

    def __init__(self, argv: list[str], cwd: Path):
        env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, "-m", "api.cli", "up", *argv], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for raw in iter(self.process.stdout.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(self, fragment: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(fragment in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{fragment!r} not seen; output:\n" + "\n".join(self.lines[-60:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _check_up(tmp_path: Path, extra: list[str], timeout: float) -> None:
    spec = write_cluster_file(tmp_path / "c.toml", 3)
    up = UpProcess(["--cluster", str(tmp_path / "c.toml"), "--data-dir", str(tmp_path / "data"), "--engine", "memory",
                    *extra], cwd=tmp_path)  # fmt: skip
    try:
        up.wait_for("Ctrl-C", timeout)
        text = "\n".join(up.lines)
        for node in spec.nodes:
            assert node.client_url in text
        assert "curl -X PUT" in text
        # it serves, through any node
        assert http("PUT", spec.nodes[0].client_url + "/v1/kv/up-test", b"works")[0] == 200
        assert http("GET", spec.nodes[0].client_url + "/v1/kv/up-test")[0] == 200
        # node logs are streamed, prefixed with the node id
        assert any(line.lstrip().startswith("n2 |") for line in up.lines)
        children = children_of_launcher(up.process.pid)
        assert len(children) == 3
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(timeout=30) == 0
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(p) for p in children)
        assert any("stopped" in line for line in up.lines)
    finally:
        up.stop()
        for pid in children_of_launcher(up.process.pid):
            os.kill(pid, signal.SIGKILL)


def test_capkv_up_starts_serves_and_stops_every_child_on_sigterm(tmp_path):
    _check_up(tmp_path, ["--service-factory", FAKE_FACTORIES["cp"]], timeout=60)


def test_capkv_up_real_cp_mode(tmp_path):
    require_service("cp")
    _check_up(tmp_path, ["--mode", "cp"], timeout=90)


def test_capkv_up_real_ap_mode(tmp_path):
    require_service("ap")
    _check_up(tmp_path, ["--mode", "ap"], timeout=90)


def test_capkv_up_refuses_ports_in_use(tmp_path, fake_cluster, capsys):
    cluster = fake_cluster("cp", nodes=1)
    code, _, err = run_cli(capsys, "up", "--cluster", str(cluster.cluster_file), "--data-dir", str(tmp_path / "d2"))
    assert code == EXIT_USAGE and "in use" in err


def test_cli_against_a_real_ap_cluster_shows_siblings_and_resolves_them(ap_cluster, capsys):
    cluster = ap_cluster(nodes=3, engine="memory")
    n1, n2 = cluster.url("n1"), cluster.url("n2")
    assert run_cli(capsys, "put", "cart", "apple", "--endpoints", n1)[0] == EXIT_OK
    assert run_cli(capsys, "put", "cart", "pear", "--endpoints", n2)[0] == EXIT_OK
    code, out, _ = run_cli(capsys, "get", "cart", "-o", "json", "--endpoints", n1)
    record = json.loads(out)
    assert code == EXIT_OK and sorted(s["value"] for s in record["siblings"]) == ["apple", "pear"]
    code, out, _ = run_cli(capsys, "put", "cart", "apple+pear", "--context", record["context"], "--endpoints", n2)
    assert code == EXIT_OK
    for url in cluster.urls:
        code, out, _ = run_cli(capsys, "get", "cart", "--endpoints", url)
        assert code == EXIT_OK and out.splitlines()[0] == "apple+pear"
    code, out, _ = run_cli(capsys, "cluster", "--endpoints", n1)
    assert code == EXIT_OK and out.startswith("ap cluster: N=3")


def test_nodes_stop_when_their_launcher_dies_without_cleaning_up(tmp_path):
    """A test runner killed with SIGKILL runs no teardown; its nodes must not linger."""
    write_cluster_file(tmp_path / "c.toml", 2)
    script = f"""
import sys, time
from clusters.launcher import LocalCluster
cluster = LocalCluster({str(tmp_path / 'c.toml')!r}, mode="cp", data_dir={str(tmp_path / 'data')!r}, engine="memory",
                       extra_args=("--service-factory", {FAKE_FACTORIES['cp']!r}))
cluster.start(timeout=30)
print(" ".join(str(n.pid) for n in cluster.nodes.values()), flush=True)
time.sleep(600)
"""
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        line = launcher.stdout.readline().decode()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(pid_alive(p) for p in pids)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in children_of_launcher(launcher.pid):
            os.kill(pid, signal.SIGKILL)
