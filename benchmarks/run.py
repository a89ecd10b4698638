#!/usr/bin/env python3
"""Download-throughput benchmark: checkpoint-sync against rclone, aria2c, curl and hf_transfer.

Unattended: installs missing peers, generates synthetic checkpoints, serves them with a
private nginx over HTTP and HTTPS on loopback, runs every tool in alternation for several
rounds and writes benchmarks/RESULTS.md.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CHECKPOINT_ID = "checkpoint-1"
SHM_ROOT = Path("/dev/shm/cs-bench")
TMP_ROOT = Path("/tmp/cs-bench")
VENV = TMP_ROOT / "venv"  # checkpoint-sync as a user installs it (see install_checkout)
APT_PACKAGES = {
    "nginx": "nginx-light",
    "aria2c": "aria2",
    "rclone": "rclone",
    "curl": "curl",
    "openssl": "openssl",
    "time": "time",  # GNU time: peak RSS of the tool itself (see run_measured)
}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# File-level concurrency shared by every tool, and per-file parallelism for tools that split files.
FILE_CONCURRENCY = 16
STREAMS_PER_FILE = 8
SPLIT_SIZE = "64M"
# The training job the listing server serves: checkpoint-sync mirrors under a directory of its name.
CS_JOB = "job"
# Seconds the far API's listing server waits before each answer (`many`'s third case).
FAR_API_DELAY = 0.1
HF_CHUNK_SIZE = 10 * MiB  # huggingface_hub's DOWNLOAD_CHUNK_SIZE
HF_MAX_FILES = STREAMS_PER_FILE  # open handles == parallel range requests per file

HF_SCRIPT = """\
import json, os, sys
from concurrent.futures import ThreadPoolExecutor
import hf_transfer

job = json.load(open(sys.argv[1]))

def fetch(pair):
    url, path = pair
    os.makedirs(os.path.dirname(path), exist_ok=True)
    hf_transfer.download(url, path, job["max_files"], job["chunk_size"], 3, 5)

with ThreadPoolExecutor(job["threads"]) as pool:
    for _ in pool.map(fetch, job["files"]):
        pass
"""


class BenchError(Exception):
    """A run or a setup step failed; the message ends up in RESULTS.md."""


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class FileSpec:
    rel: str  # "<node_rank>/<checkpoint_id>/<file path>"
    size: int


@dataclass(frozen=True)
class Profile:
    name: str
    ranks: int
    files: tuple[FileSpec, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _profile(name: str, ranks: int, path: Callable[[int], str], sizes: Sequence[int]) -> Profile:
    """sizes holds ranks * files-per-rank sizes; rank r gets the r-th slice."""
    per_rank = len(sizes) // ranks
    files = tuple(
        FileSpec(f"{rank}/{CHECKPOINT_ID}/{path(i)}", sizes[rank * per_rank + i])
        for rank in range(ranks)
        for i in range(per_rank)
    )
    return Profile(name, ranks, files)


def build_profiles(quick: bool) -> dict[str, Profile]:
    big_n, big_size = (2, 64 * MiB) if quick else (4, 512 * MiB)
    small_n = 200 if quick else 2000
    many_n = 5000 if quick else 100_000
    small_rng, many_rng = random.Random(1234), random.Random(5678)
    return {
        "big": _profile(
            "big",
            2,
            lambda i: f"model-{i + 1:05d}-of-{big_n:05d}.safetensors",
            [big_size] * 2 * big_n,
        ),
        "small": _profile(
            "small",
            2,
            lambda i: f"shards/{i // 100:03d}/shard-{i:05d}.bin",
            [small_rng.randint(64 * KiB, MiB) for _ in range(2 * small_n)],
        ),
        "many": _profile(
            "many",
            1,
            lambda i: f"tiny/{i // 1000:03d}/f{i:06d}.txt",
            [many_rng.randint(1, 32) for _ in range(many_n)],
        ),
    }


# --------------------------------------------------------------------------- data


def mem_available() -> int:
    fields = Path("/proc/meminfo").read_text().split()
    return int(fields[fields.index("MemAvailable:") + 1]) * KiB


def _tree_bytes(root: Path) -> int:
    return sum(Path(d, n).stat().st_size for d, _, names in os.walk(root) for n in names)


def pick_data_dir(profiles: Sequence[Profile], quick: bool) -> Path:
    """/dev/shm/cs-bench if RAM fits the data plus one destination copy, else /tmp/cs-bench."""
    name = "data-quick" if quick else "data"
    shm = SHM_ROOT / name
    data = sum(p.total_bytes + 4 * KiB * len(p.files) for p in profiles)
    dest = max(p.total_bytes + 4 * KiB * len(p.files) for p in profiles)
    with contextlib.suppress(OSError):
        room = min(shutil.disk_usage("/dev/shm").free, mem_available() - 2 * GiB)
        if room + _tree_bytes(shm) > data + dest:  # data already there is reused
            return shm
    return TMP_ROOT / name


def _write_random(path: Path, size: int) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, 16 * MiB))
            out.write(chunk)
            left -= len(chunk)
    tmp.replace(path)


def _remove_strays(base: Path, expected: set[str]) -> None:
    for dirpath, _, filenames in os.walk(base):
        for name in filenames:
            path = Path(dirpath, name)
            if path.relative_to(base).as_posix() not in expected:
                path.unlink()


def ensure_data(root: Path, profile: Profile) -> int:
    """Create missing or wrongly sized files; returns how many were written."""
    base = root / profile.name
    _remove_strays(base, {f.rel for f in profile.files})
    made_dirs: set[Path] = set()
    written = 0
    for spec in profile.files:
        path = base / spec.rel
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == spec.size:
                continue
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        _write_random(path, spec.size)
        written += 1
    return written


# --------------------------------------------------------------------------- processes


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((f"{d}/{name}" for d in SBIN_DIRS if os.access(f"{d}/{name}", os.X_OK)), None)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def log_tail(path: Path) -> str:
    with path.open("rb") as log:
        log.seek(max(0, path.stat().st_size - 4096))
        return last_line(log.read().decode(errors="replace"))


def capture(argv: Sequence[str], timeout: float = 60, cwd: Path | None = None) -> str:
    """Run a short command; return stdout+stderr, raise BenchError with its last line on failure."""
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{argv[0]}: {exc}") from exc
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise BenchError(f"{Path(argv[0]).name} exit {done.returncode}: {last_line(output)}")
    return output


def kill_group(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it if still there after 10 s."""
    if proc.poll() is None:
        kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] | None = None


@dataclass(frozen=True)
class Sample:
    wall: float
    cpu: float
    rss_mib: float


def _read_rss_kib(path: Path) -> float:
    """GNU time's %M line (it may be preceded by 'Command exited with non-zero status')."""
    try:
        return float(path.read_text().split()[-1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_measured(cmd: Command, log: Path, timeout: float, gnu_time: str) -> Sample:
    """Run cmd in its own process group: wall time, CPU of the reaped process tree, peak RSS.

    CPU comes from os.wait4.  Peak RSS comes from GNU time, which forks the tool from a
    small process: ru_maxrss of a child forked straight from this (large) Python process
    would report this process's RSS, which exec() carries over into the child's high-water mark.
    """
    rss_file = log.with_suffix(".rss")
    argv = [gnu_time, "-f", "%M", "-o", str(rss_file), *cmd.argv]
    with log.open("wb") as out:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=cmd.env,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"cannot start {cmd.argv[0]}: {exc}") from exc
        timer = threading.Timer(timeout, kill_group, (proc.pid,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
            kill_group(proc.pid)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        timed_out = wall >= timeout
        reason = f"timed out after {timeout:.0f} s" if timed_out else f"exit {proc.returncode}"
        raise BenchError(f"{reason}: {log_tail(log)}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, _read_rss_kib(rss_file) / KiB)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited {proc.returncode}: {log_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise BenchError(f"port {port} not listening after {timeout:.0f} s")


# --------------------------------------------------------------------------- install


def ensure_apt_packages() -> list[str]:
    """Install missing Debian packages one by one; returns notes about failures."""
    missing = [pkg for binary, pkg in APT_PACKAGES.items() if find_binary(binary) is None]
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        return [f"apt-get not available; missing: {', '.join(missing)}"]
    os.environ.setdefault("DEBIAN_FRONTEND", "noninteractive")
    notes: list[str] = []
    print(f"installing Debian packages: {' '.join(missing)}", flush=True)
    with contextlib.suppress(BenchError):
        capture(["apt-get", "update", "-qq"], timeout=600)
    for pkg in missing:
        try:
            capture(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", pkg], timeout=900
            )
        except BenchError as exc:
            notes.append(f"apt-get install {pkg} failed: {exc}")
    return notes


def python_can_import(module: str) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, cwd=REPO, check=False
    )
    return probe.returncode == 0


def pip_install(requirements: Sequence[str]) -> None:
    capture(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            *requirements,
        ],
        timeout=900,
    )


def ensure_hf_transfer() -> list[str]:
    if python_can_import("hf_transfer"):
        return []
    print("installing hf_transfer from PyPI", flush=True)
    try:
        pip_install(["hf_transfer"])
    except BenchError as exc:
        return [f"pip install hf_transfer failed: {exc}"]
    return []


# --------------------------------------------------------------------------- TLS and nginx


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(openssl: str, workdir: Path) -> Tls:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (ECDSA P-256)."""
    ca, ca_key = workdir / "ca.pem", workdir / "ca.key"
    cert, key, csr = workdir / "server.pem", workdir / "server.key", workdir / "server.csr"
    ext = workdir / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    capture(
        [
            openssl,
            "req",
            "-x509",
            *ec,
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
            "-days",
            "7",
            "-subj",
            "/CN=cs-bench test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )
    capture([openssl, "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1"])
    capture(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            "7",
            "-extfile",
            str(ext),
        ]
    )
    return Tls(ca, cert, key)


NGINX_CONF = """\
daemon off;
worker_processes auto;
worker_rlimit_nofile 65536;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    output_buffers 2 1m;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    server {{
        listen 127.0.0.1:{http_port} reuseport backlog=4096;
        listen 127.0.0.1:{https_port} ssl reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        root {root};
        autoindex on;
        autoindex_exact_size on;
        location / {{ }}
    }}
}}
"""


@dataclass(frozen=True)
class Nginx:
    http_port: int
    https_port: int

    def base_url(self, scheme: str) -> str:
        port = self.http_port if scheme == "http" else self.https_port
        return f"{scheme}://127.0.0.1:{port}/"


@contextlib.contextmanager
def run_nginx(binary: str, root: Path, tls: Tls, workdir: Path) -> Iterator[Nginx]:
    server = Nginx(free_port(), free_port())
    conf = workdir / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            work=workdir,
            root=root,
            cert=tls.cert,
            key=tls.key,
            http_port=server.http_port,
            https_port=server.https_port,
        )
    )
    log = workdir / "nginx.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_for_port(server.http_port, proc, log, 20)
        wait_for_port(server.https_port, proc, log, 20)
        yield server
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Job:
    profile: Profile
    scheme: str
    base_url: str  # ends with "/<profile>/"
    ca: Path
    workdir: Path
    api_url: str = ""  # checkpoint-sync management API (set once its server runs)
    far_api_url: str = ""  # the same, answering every request FAR_API_DELAY s late

    @property
    def key(self) -> str:
        return f"{self.profile.name}-{self.scheme}"

    def urls(self) -> Iterator[tuple[str, FileSpec]]:
        for spec in self.profile.files:
            yield self.base_url + urllib.parse.quote(spec.rel), spec


class Tool(Protocol):
    name: str
    is_peer: bool

    def problem(self) -> str | None:
        """Why the tool cannot run here, or None."""

    def tuning(self) -> str:
        """The flags used, for RESULTS.md."""

    def command(self, job: Job, dest: Path) -> Command:
        """The command that downloads every file of job into dest."""


def _with_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


class Rclone:
    name = "rclone"
    is_peer = True
    flags = (
        "--transfers",
        str(FILE_CONCURRENCY),
        "--checkers",
        str(2 * FILE_CONCURRENCY),
        "--multi-thread-streams",
        str(STREAMS_PER_FILE),
        "--multi-thread-cutoff",
        SPLIT_SIZE,
    )

    def problem(self) -> str | None:
        return None if find_binary("rclone") else "rclone not installed"

    def tuning(self) -> str:
        return f"rclone copy :http: DEST --http-url URL {' '.join(self.flags)} --ca-cert CA"

    def command(self, job: Job, dest: Path) -> Command:
        config = job.workdir / "rclone.conf"
        config.touch()
        return Command(
            [
                "rclone",
                "copy",
                ":http:",
                str(dest),
                "--http-url",
                job.base_url,
                *self.flags,
                "--ca-cert",
                str(job.ca),
                "--config",
                str(config),
                "-q",
            ]
        )


class Aria2:
    name = "aria2c"
    is_peer = True
    flags = (
        "-j",
        str(FILE_CONCURRENCY),
        "-x",
        str(STREAMS_PER_FILE),
        "-s",
        str(STREAMS_PER_FILE),
        "-k",
        SPLIT_SIZE,
        "--file-allocation=none",
    )

    def problem(self) -> str | None:
        return None if find_binary("aria2c") else "aria2c not installed"

    def tuning(self) -> str:
        return f"aria2c -i URLLIST -d DEST {' '.join(self.flags)} --ca-certificate=CA"

    def command(self, job: Job, dest: Path) -> Command:
        urllist = job.workdir / f"aria2-{job.key}.txt"
        urllist.write_text("".join(f"{url}\n out={spec.rel}\n" for url, spec in job.urls()))
        return Command(
            [
                "aria2c",
                "-i",
                str(urllist),
                "-d",
                str(dest),
                *self.flags,
                f"--ca-certificate={job.ca}",
                "--check-certificate=true",
                "--allow-overwrite=true",
                "--auto-file-renaming=false",
                "--summary-interval=0",
                "--console-log-level=error",
                "--download-result=hide",
                "--quiet",
            ]
        )


class Curl:
    name = "curl"
    is_peer = True
    flags = ("--parallel", "--parallel-max", str(FILE_CONCURRENCY))

    def problem(self) -> str | None:
        return None if find_binary("curl") else "curl not installed"

    def tuning(self) -> str:
        return (
            f"curl {' '.join(self.flags)} --config URL_OUTPUT_PAIRS --create-dirs --fail "
            "--cacert CA (no intra-file splitting: curl has none)"
        )

    def command(self, job: Job, dest: Path) -> Command:
        config = job.workdir / f"curl-{job.key}.cfg"
        config.write_text(
            "".join(f'url = "{url}"\noutput = "{dest / spec.rel}"\n' for url, spec in job.urls())
        )
        return Command(
            [
                "curl",
                *self.flags,
                "--config",
                str(config),
                "--create-dirs",
                "--fail",
                "--silent",
                "--show-error",
                "--cacert",
                str(job.ca),
            ]
        )


class HfTransfer:
    name = "hf_transfer"
    is_peer = True

    def problem(self) -> str | None:
        return None if python_can_import("hf_transfer") else "hf_transfer not importable"

    def tuning(self) -> str:
        return (
            f"hf_transfer.download(url, file, max_files={HF_MAX_FILES}, "
            f"chunk_size={HF_CHUNK_SIZE // MiB} MiB, parallel_failures=3, max_retries=5) "
            f"per file, {FILE_CONCURRENCY} files at once (Python thread pool; the call "
            "releases the GIL); SSL_CERT_FILE=CA"
        )

    def command(self, job: Job, dest: Path) -> Command:
        spec_file = job.workdir / f"hf-{job.key}.json"
        spec_file.write_text(
            json.dumps(
                {
                    "max_files": HF_MAX_FILES,
                    "chunk_size": HF_CHUNK_SIZE,
                    "threads": FILE_CONCURRENCY,
                    "files": [[url, str(dest / spec.rel)] for url, spec in job.urls()],
                }
            )
        )
        return Command(
            [sys.executable, "-c", HF_SCRIPT, str(spec_file)], _with_env(SSL_CERT_FILE=str(job.ca))
        )


def install_checkout(venv: Path) -> Path:
    """checkpoint-sync from this checkout, installed as the README's quick start does it
    (``pip install .`` into a venv): byte-compiled, with its own dependencies. Run from the
    source tree instead, every run would compile the package again wherever
    PYTHONDONTWRITEBYTECODE is set, which no user install does."""
    python = venv / "bin" / "python"
    if not python.exists():
        capture([sys.executable, "-m", "venv", str(venv)], timeout=300)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    capture([*pip, str(REPO)], timeout=900)
    # The version number does not change with the code: reinstall so the venv runs this checkout.
    capture([*pip, "--force-reinstall", "--no-deps", str(REPO)], timeout=900)
    return venv / "bin" / "checkpoint-sync"


def server_python() -> str:
    """The Python that runs checkpoint-sync's listing server: the venv's, which has its
    dependencies (aiohttp), unless --cs-command left it uninstalled."""
    python = VENV / "bin" / "python"
    return str(python) if python.exists() else sys.executable


class CheckpointSync:
    name = "checkpoint-sync"
    is_peer = False

    def __init__(self, command: str, extra_args: str) -> None:
        self.extra = shlex.split(extra_args)
        self.argv: list[str] = shlex.split(command) if command else []
        self.error: str | None = None

    def resolve(self, install: bool) -> None:
        """Install checkpoint-sync into the benchmark's venv (unless told not to) and probe it."""
        if not self.argv:
            script = VENV / "bin" / "checkpoint-sync"
            if install:
                print(f"installing checkpoint-sync from {REPO} into {VENV}", flush=True)
                try:
                    script = install_checkout(VENV)
                except BenchError as exc:
                    self.error = f"installing checkpoint-sync failed: {exc}"
                    return
            if not script.exists():
                self.error = f"no {script} (run without --no-install, or pass --cs-command)"
                return
            self.argv = [str(script)]
        try:
            capture([*self.argv, "sync", "--help"], timeout=60, cwd=REPO)
            capture([server_python(), "-c", "import checkpoint_sync.localserver"], cwd=REPO)
        except BenchError as exc:
            self.error = str(exc)

    def problem(self) -> str | None:
        return self.error

    def tuning(self) -> str:
        extra = " ".join(self.extra) or "(tool defaults: no --concurrency/--part-size)"
        return (
            f"checkpoint-sync sync --api-url API --project bench --job {CS_JOB} --dest DEST "
            f"--json --quiet {extra}; SSL_CERT_FILE=CA"
        )

    def version(self) -> str:
        if self.argv:
            with contextlib.suppress(BenchError):
                return capture([*self.argv, "--version"]).strip()
        return f"not run ({self.error})"

    def command(self, job: Job, dest: Path) -> Command:
        return Command(
            [
                *self.argv,
                "sync",
                "--api-url",
                job.api_url,
                "--project",
                "bench",
                "--job",
                CS_JOB,
                "--dest",
                str(dest),
                "--json",
                "--quiet",
                *self.extra,
            ],
            _with_env(BASETEN_API_KEY="bench", SSL_CERT_FILE=str(job.ca)),
        )


def _read_ready_line(fd: int, sink: IO[bytes], deadline: float) -> str:
    """Copy fd to sink until a `ready URL` line appears; returns URL."""
    pending = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError("localserver did not print 'ready' in time")
        if not select.select([fd], [], [], remaining)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise BenchError("localserver closed stdout before printing 'ready'")
        sink.write(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"ready "):
                return line.split()[1].decode()


def _drain(fd: int, sink: IO[bytes]) -> None:
    for chunk in iter(lambda: os.read(fd, 65536), b""):
        sink.write(chunk)


@contextlib.contextmanager
def cs_localserver(
    job: Job, settings: Settings, timeout: float, api_delay: float = 0.0
) -> Iterator[str]:
    """Run `python -m checkpoint_sync.localserver serve-tree` for job, answering every API request
    ``api_delay`` s late; yields its API URL."""
    log = settings.logs / f"localserver-{job.key}{'-far' if api_delay else ''}.log"
    argv = [
        server_python(),
        "-m",
        "checkpoint_sync.localserver",
        "serve-tree",
        "--root",
        str(settings.data_root / job.profile.name),
        "--file-base-url",
        job.base_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--project",
        "bench",
        "--job",
        CS_JOB,
        "--api-delay",
        str(api_delay),
    ]
    with log.open("wb", buffering=0) as sink:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        drain = threading.Thread(target=_drain, args=(fd, sink), daemon=True)
        try:
            try:
                url = _read_ready_line(fd, sink, time.monotonic() + timeout)
            except BenchError as exc:
                raise BenchError(f"{exc}; log: {log_tail(log)}") from exc
            drain.start()
            yield url
        finally:
            stop_process(proc)
            if drain.is_alive():
                drain.join(timeout=5)
            proc.stdout.close()


# --------------------------------------------------------------------------- verification


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            block = fa.read(MiB)
            if block != fb.read(MiB):
                return False
            if not block:
                return True


def _walk_files(dest: Path) -> Iterator[Path]:
    """Files under dest, skipping dot-files and dot-dirs (tool state such as resume markers)."""
    for dirpath, dirnames, filenames in os.walk(dest):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        yield from (Path(dirpath, n) for n in filenames if not n.startswith("."))


def verify(dest: Path, profile: Profile, source: Path) -> None:
    """Same file count and byte total as the source, and every file byte-identical, where the
    tool's layout puts it (a file of the right size that was never written is caught too)."""
    files = list(_walk_files(dest))
    total = sum(f.stat().st_size for f in files)
    if (len(files), total) != (len(profile.files), profile.total_bytes):
        raise BenchError(
            f"verify: got {len(files)} files / {total} B, expected "
            f"{len(profile.files)} files / {profile.total_bytes} B"
        )
    for spec in profile.files:
        placed = _placed(dest, spec.rel)
        if not placed.is_file() or not _same_bytes(placed, source / spec.rel):
            raise BenchError(f"verify: {spec.rel} missing or differs from the source")


def _placed(dest: Path, rel: str) -> Path:
    """Where a tool put the file the data holds at ``rel`` (``<rank>/<checkpoint>/<path>``):
    at ``rel`` (the peers, which copy the tree), or at checkpoint-sync's
    ``<job>/<checkpoint>/<rank>/<path>``."""
    exact = dest / rel
    if exact.exists():
        return exact
    rank, checkpoint, path = rel.split("/", 2)
    return dest / CS_JOB / checkpoint / rank / path


# --------------------------------------------------------------------------- benchmark loop


@dataclass(frozen=True)
class Case:
    label: str
    tool: Tool
    fresh: bool = True  # False: re-run into the previous case's destination
    moves_bytes: bool = True
    far_api: bool = False  # listed by the API that answers FAR_API_DELAY s late


@dataclass
class Row:
    label: str
    is_peer: bool
    moves_bytes: bool
    samples: list[Sample] = dataclasses.field(default_factory=list)
    error: str | None = None
    missing: bool = False  # could not run at all (not installed, server did not start)


@dataclass
class Section:
    title: str
    profile: Profile
    rows: list[Row]


@dataclass(frozen=True)
class Settings:
    rounds: int
    timeout: float
    data_root: Path
    workdir: Path  # url lists, configs, certificates
    logs: Path  # one output file per run, kept after exit
    gnu_time: str


def fs_type(path: Path) -> str:
    """File-system type of the mount holding path (from /proc/mounts)."""
    path = path.resolve()
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if path.is_relative_to(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def clear_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _run_case(
    case: Case, job: Job, dest: Path, settings: Settings, flush: bool, tag: str
) -> Sample:
    if case.fresh:
        clear_dir(dest)
    if flush:
        os.sync()
    log = settings.logs / f"{tag}-{case.label.replace(' ', '_')}.log"
    if case.far_api:
        job = dataclasses.replace(job, api_url=job.far_api_url)
    sample = run_measured(case.tool.command(job, dest), log, settings.timeout, settings.gnu_time)
    if flush:  # disk destination: count the write-back too
        start = time.perf_counter()
        os.sync()
        sample = dataclasses.replace(sample, wall=sample.wall + time.perf_counter() - start)
    verify(dest, job.profile, settings.data_root / job.profile.name)
    return sample


def bench(
    cases: Sequence[Case],
    job: Job,
    dest: Path,
    settings: Settings,
    problems: dict[str, str],
    flush: bool = False,
) -> list[Row]:
    """Run every case once per round, in alternation; a failing case is not retried."""
    rows = {}
    for case in cases:
        problem = case.tool.problem() or problems.get(case.tool.name)
        rows[case.label] = Row(
            case.label,
            case.tool.is_peer,
            case.moves_bytes,
            error=problem,
            missing=problem is not None,
        )
    # Removed however the rounds end: Ctrl-C or SIGTERM mid-run left the destination (by
    # default /dev/shm, RAM: up to 4.3 GB) holding the interrupted run's files.
    try:
        for rnd in range(1, settings.rounds + 1):
            previous_ok = True
            for case in cases:
                row = rows[case.label]
                if row.error is None and not case.fresh and not previous_ok:
                    row.error = "skipped: the run it repeats failed"
                if row.error is not None:
                    previous_ok = False
                    continue
                tag = f"{job.key}{'-disk' if flush else ''}-r{rnd}"
                try:
                    row.samples.append(_run_case(case, job, dest, settings, flush, tag))
                    previous_ok = True
                    print(
                        f"  [{tag}] {case.label}: {describe(row.samples[-1], job.profile)}",
                        flush=True,
                    )
                except BenchError as exc:
                    row.error, previous_ok = str(exc), False
                    print(f"  [{tag}] {case.label}: FAILED {exc}", flush=True)
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return list(rows.values())


def describe(sample: Sample, profile: Profile) -> str:
    return (
        f"{sample.wall:.2f} s, {profile.total_bytes / 1e6 / sample.wall:.0f} MB/s, "
        f"{len(profile.files) / sample.wall:.0f} files/s, cpu {sample.cpu:.2f} s, "
        f"rss {sample.rss_mib:.0f} MiB"
    )


def median_wall(row: Row) -> float:
    return statistics.median(s.wall for s in row.samples)


def fastest_peer(rows: Sequence[Row]) -> Row | None:
    """The peer with the lowest median among those that passed every round: one that failed
    a round (its output wrong, or it exited non-zero) is no reference for the others."""
    peers = [r for r in rows if r.is_peer and r.samples and r.moves_bytes and r.error is None]
    return min(peers, key=median_wall, default=None)


# --------------------------------------------------------------------------- report


def _num(value: float | None) -> str:
    """About three significant digits, thousands separated; '-' for not applicable."""
    if value is None:
        return "-"
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 0.1 else 4
    return f"{value:,.{digits}f}"


TABLE_HEAD = (
    "| tool | median s | MB/s | files/s | CPU s | CPU s/GB | peak RSS MiB | vs fastest peer |"
)


def _cells(row: Row, profile: Profile, best: Row | None) -> list[str]:
    wall = median_wall(row)
    cpu = statistics.median(s.cpu for s in row.samples)
    rss = statistics.median(s.rss_mib for s in row.samples)
    if not row.moves_bytes:
        return [f"{wall:.2f}", "-", "-", f"{cpu:.2f}", "-", f"{rss:.0f}", "-"]
    rate = profile.total_bytes / 1e6 / wall
    ratio = f"{median_wall(best) / wall:.2f}x" if best else "-"
    return [
        f"{wall:.2f}",
        _num(rate),
        _num(len(profile.files) / wall),
        f"{cpu:.2f}",
        _num(cpu / (profile.total_bytes / 1e9)),
        f"{rss:.0f}",
        ratio,
    ]


def table(section: Section) -> list[str]:
    best = fastest_peer(section.rows)
    out = [f"### {section.title}", "", TABLE_HEAD, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in section.rows:
        if not row.samples:
            out.append(f"| {row.label} | {'missing' if row.missing else 'failed'} | | | | | | |")
            continue
        note = f" ({len(row.samples)} ok, then failed)" if row.error else ""
        out.append(f"| {row.label}{note} | {' | '.join(_cells(row, section.profile, best))} |")
    return [*out, ""]


def machine_info() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / MiB
    return [
        (
            f"- Machine: {os.cpu_count()} CPUs ({model}), {mem_gib:.1f} GiB RAM, "
            f"kernel {os.uname().release}, Python {sys.version.split()[0]}"
        )
    ]


@dataclass(frozen=True)
class Conditions:
    """How busy the machine was: other work, or too little memory for a destination in RAM
    (the kernel then reclaims pages during the runs), slows every tool alike."""

    load_at_start: float
    available: int
    memory_short: str | None

    @classmethod
    def now(cls, profiles: Sequence[Profile], dest_dir: Path) -> Conditions:
        available = mem_available()
        needed = max(p.total_bytes for p in profiles) + 2 * GiB
        short = None
        if _on_tmpfs(dest_dir) and available < needed:
            short = (
                f"only {available / GiB:.1f} GiB of memory is available for destinations in RAM "
                f"({dest_dir}) that need {needed / GiB:.1f} GiB with headroom: the numbers "
                "below include memory reclaim (free some of /dev/shm and run again)"
            )
        return cls(os.getloadavg()[0], available, short)

    def lines(self) -> list[str]:
        load_at_end = os.getloadavg()[0]
        lines = [
            f"- Conditions: load average {self.load_at_start:.2f} before the runs and "
            f"{load_at_end:.2f} after them (1 min); {self.available / GiB:.1f} GiB of memory "
            "available at the start"
        ]
        return [*lines, f"- **Warning:** {self.memory_short}"] if self.memory_short else lines


def _on_tmpfs(path: Path) -> bool:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return capture(["stat", "--file-system", "--format=%T", str(probe)]).strip() == "tmpfs"


def tool_versions(cs: CheckpointSync) -> list[str]:
    probes = {
        "nginx": ["-v"],
        "aria2c": ["--version"],
        "rclone": ["version"],
        "curl": ["--version"],
        "openssl": ["version"],
    }
    lines = []
    for name, args in probes.items():
        binary = find_binary(name)
        try:
            version = last_line(capture([binary, *args]).splitlines()[0]) if binary else "missing"
        except BenchError as exc:
            version = f"error: {exc}"
        lines.append(f"- {name}: {version}")
    code = "import importlib.metadata as m; print(m.version('hf_transfer'))"
    try:
        lines.append(f"- hf_transfer: {capture([sys.executable, '-c', code]).strip()}")
    except BenchError:
        lines.append("- hf_transfer: missing")
    lines.append(f"- checkpoint-sync: {cs.version()}")
    return lines


def write_report(
    path: Path,
    sections: Sequence[Section],
    tools: Sequence[Tool],
    header: Sequence[str],
    notes: Sequence[str],
) -> None:
    lines = ["# checkpoint-sync download benchmark", "", *header, ""]
    lines += ["## Results", ""]
    for section in sections:
        lines += table(section)
    lines += ["## Tuning", "", TUNING_NOTE, ""]
    lines += [f"- **{tool.name}**: `{tool.tuning()}`" for tool in tools]
    lines += ["", "## Notes", "", *[f"- {note}" for note in notes], ""]
    failures: dict[tuple[str, str], list[str]] = {}
    for section in sections:
        for row in section.rows:
            if row.error:
                failures.setdefault((row.label, row.error), []).append(section.title)
    if failures:
        lines += ["## Failures", ""]
        lines += [
            f"- {label}: {error} (in: {'; '.join(where)})"
            for (label, error), where in failures.items()
        ]
        lines.append("")
    path.write_text("\n".join(lines))


TUNING_NOTE = (
    f"Common settings: {FILE_CONCURRENCY} files in flight for every peer (checkpoint-sync's "
    f"default `--concurrency` is 16 too); {STREAMS_PER_FILE} connections per file for the peers "
    f"that split files (rclone, aria2c, hf_transfer) with {SPLIT_SIZE}iB pieces (hf_transfer: "
    f"{HF_CHUNK_SIZE // MiB} MiB, huggingface_hub's chunk size); curl cannot split a file. "
    "A 3-round sweep on big (rclone and aria2c at 16x8, 8x4 and 8x1 files x streams) found "
    "differences mostly within run-to-run noise on loopback, so one common setting is used."
)

METHOD_NOTES = [
    (
        "Every tool downloads every file of the profile from the same nginx on loopback "
        "(HTTP/1.1, sendfile on, keepalive 300 s / 1M requests, access log off, "
        "worker_processes auto) into a fresh directory, deleted before each run."
    ),
    (
        "Tools run in alternation (round 1: every tool, round 2: every tool, ...); tables show "
        "the median over rounds (wall, CPU and RSS each taken as its own median)."
    ),
    "MB/s = bytes / 1e6 / median wall seconds; files/s = files / median wall seconds.",
    (
        "CPU s = user + sys of the tool's process tree (os.wait4 rusage, which includes reaped "
        "children); nginx and checkpoint-sync's listing server are not counted. Peak RSS = GNU "
        "time's %M in MiB (ru_maxrss: the largest single process of the tree, not a sum)."
    ),
    (
        "'vs fastest peer' = this row's MB/s / the fastest peer's MB/s in the same table, "
        "among the peers that passed every round."
    ),
    (
        "Client and server share the machine's cores: CPU a client burns is CPU nginx (and its "
        "TLS) cannot use, so CPU efficiency feeds directly into throughput here."
    ),
    (
        "Each run is verified (file count and byte total, dot-files excluded; every file "
        "compared byte for byte with the source); a run that fails verification is reported as "
        "failed."
    ),
    (
        "`many`: checkpoint-sync runs a first sync, then the same command again into the same "
        "destination (no-op re-sync: seconds only), then again against a listing server that "
        f"answers every API request {FAR_API_DELAY} s late, as a far API would (the full "
        "profile's 100 pages of 1,000 files, asked for one after another, would wait 10 s). curl "
        "is the only peer, for reference: rclone "
        "would crawl 100k files through HTML autoindex pages plus a HEAD each, and "
        "aria2c/hf_transfer have nothing to split in few-byte files."
    ),
    (
        "Disk destination (big/HTTP only: checkpoint-sync and the fastest peer of big/HTTP): "
        "the timed interval includes a final sync(2), so page-cache write-back counts for every "
        "tool alike; an untimed sync(2) also runs before each run."
    ),
]


# --------------------------------------------------------------------------- main


PROFILES = ("big", "small", "many")
SCHEMES = ("http", "https")
TOOLS = ("checkpoint-sync", "rclone", "aria2c", "curl", "hf_transfer")


def _subset(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names from allowed, kept in allowed's order."""

    def parse(text: str) -> list[str]:
        names = set(text.split(","))
        if not names <= set(allowed):
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return [name for name in allowed if name in names]

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="scaled-down smoke run (~1 min)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per tool (median taken)")
    parser.add_argument(
        "--profiles",
        type=_subset(PROFILES),
        default=list(PROFILES),
        help="comma list from: " + ",".join(PROFILES),
    )
    parser.add_argument(
        "--schemes",
        type=_subset(SCHEMES),
        default=list(SCHEMES),
        help="comma list from: " + ",".join(SCHEMES),
    )
    parser.add_argument(
        "--tools",
        type=_subset(TOOLS),
        default=list(TOOLS),
        help="comma list from: " + ",".join(TOOLS),
    )
    parser.add_argument("--data-dir", type=Path, help="default /dev/shm/cs-bench/data[-quick]")
    parser.add_argument("--dest-dir", type=Path, default=SHM_ROOT / "dest")
    parser.add_argument(
        "--disk-dest-dir",
        default="/var/tmp/cs-bench-dest",
        help="disk destination for the big/HTTP disk run ('' to skip)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("--output", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument(
        "--logs-dir",
        type=Path,
        default=TMP_ROOT / "logs",
        help="per-run tool output (emptied at start)",
    )
    parser.add_argument(
        "--cs-command",
        default="",
        help=f"checkpoint-sync command (default: this checkout, pip-installed into {VENV})",
    )
    parser.add_argument("--cs-args", default="", help="extra args for `checkpoint-sync sync`")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get/pip install")
    return parser.parse_args(argv)


def select_tools(names: Sequence[str], cs: CheckpointSync) -> list[Tool]:
    available: list[Tool] = [cs, Rclone(), Aria2(), Curl(), HfTransfer()]
    return [t for t in available if t.name in names]


def cases_for(profile: Profile, tools: Sequence[Tool]) -> list[Case]:
    if profile.name != "many":
        return [Case(t.name, t) for t in tools]
    cases = []
    for tool in tools:
        if not tool.is_peer:
            cases += [
                Case(f"{tool.name} (first sync)", tool),
                Case(f"{tool.name} (no-op re-sync)", tool, fresh=False, moves_bytes=False),
                Case(
                    f"{tool.name} (no-op re-sync, API {FAR_API_DELAY} s late)",
                    tool,
                    fresh=False,
                    moves_bytes=False,
                    far_api=True,
                ),
            ]
        elif tool.name == "curl":
            cases.append(Case(tool.name, tool))
    return cases


@contextlib.contextmanager
def job_with_api(
    job: Job, tools: Sequence[Tool], settings: Settings
) -> Iterator[tuple[Job, dict[str, str]]]:
    """Start checkpoint-sync's listing server if it is benchmarked; yields (job, problems)."""
    if not any(isinstance(t, CheckpointSync) and t.problem() is None for t in tools):
        yield job, {}
        return
    problems: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        try:
            api_url = stack.enter_context(cs_localserver(job, settings, timeout=120))
            job = dataclasses.replace(job, api_url=api_url)
            if any(case.far_api for case in cases_for(job.profile, tools)):
                far = cs_localserver(job, settings, timeout=120, api_delay=FAR_API_DELAY)
                job = dataclasses.replace(job, far_api_url=stack.enter_context(far))
        except BenchError as exc:
            problems[CheckpointSync.name] = f"localserver: {exc}"
        yield job, problems


def run_profile(
    profile: Profile,
    schemes: Sequence[str],
    tools: Sequence[Tool],
    nginx: Nginx,
    settings: Settings,
    ca: Path,
    dest: Path,
    disk_dest: Path | None,
) -> list[Section]:
    sections = []
    cases = cases_for(profile, tools)
    for scheme in schemes:
        print(f"== {profile.name} / {scheme.upper()}", flush=True)
        base = Job(
            profile, scheme, f"{nginx.base_url(scheme)}{profile.name}/", ca, settings.workdir
        )
        with job_with_api(base, tools, settings) as (job, problems):
            rows = bench(cases, job, dest, settings, problems)
            sections.append(
                Section(f"{profile.name} — {scheme.upper()} — dest {dest}", profile, rows)
            )
            best = fastest_peer(rows)
            if profile.name == "big" and scheme == "http" and disk_dest and best:
                disk_cases = [c for c in cases if not c.tool.is_peer or c.label == best.label]
                print(f"== {profile.name} / HTTP / disk {disk_dest}", flush=True)
                disk_rows = bench(disk_cases, job, disk_dest, settings, problems, flush=True)
                sections.append(
                    Section(
                        f"{profile.name} — HTTP — dest {disk_dest} "
                        f"({fs_type(disk_dest)}, timed incl. final sync)",
                        profile,
                        disk_rows,
                    )
                )
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    all_profiles = build_profiles(args.quick)
    profiles = [all_profiles[name] for name in args.profiles]
    notes = [] if args.no_install else ensure_apt_packages() + ensure_hf_transfer()
    nginx_bin, openssl, gnu_time = find_binary("nginx"), find_binary("openssl"), find_binary("time")
    if nginx_bin is None or openssl is None or gnu_time is None:
        raise SystemExit(
            "nginx, openssl and GNU time are required (apt-get install nginx-light openssl time)"
        )
    cs = CheckpointSync(args.cs_command, args.cs_args)
    tools = select_tools(args.tools, cs)
    if cs in tools:
        cs.resolve(install=not args.no_install)
    data_root = args.data_dir or pick_data_dir(profiles, args.quick)
    for profile in profiles:
        t0 = time.monotonic()
        written = ensure_data(data_root, profile)
        print(
            f"data {profile.name}: {len(profile.files)} files, {profile.total_bytes / 1e9:.2f} GB"
            f" ({written} written in {time.monotonic() - t0:.1f} s)",
            flush=True,
        )
    disk_dest = Path(args.disk_dest_dir) if args.disk_dest_dir else None
    conditions = Conditions.now(profiles, args.dest_dir)
    if conditions.memory_short:
        print(f"warning: {conditions.memory_short}", flush=True)
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="cs-bench-") as tmp:
        workdir = Path(tmp)
        settings = Settings(args.rounds, args.timeout, data_root, workdir, args.logs_dir, gnu_time)
        clear_dir(settings.logs)
        tls = make_tls(openssl, workdir)
        with run_nginx(nginx_bin, data_root, tls, workdir) as nginx:
            for profile in profiles:
                sections += run_profile(
                    profile, args.schemes, tools, nginx, settings, tls.ca, args.dest_dir, disk_dest
                )
    header = report_header(args, profiles, data_root, time.monotonic() - started, cs, conditions)
    write_report(args.output, sections, tools, header, [*METHOD_NOTES, *notes])
    for section in sections:
        print("\n".join(table(section)))
    print(f"wrote {args.output}")
    return 0


def report_header(
    args: argparse.Namespace,
    profiles: Sequence[Profile],
    data_root: Path,
    elapsed: float,
    cs: CheckpointSync,
    conditions: Conditions,
) -> list[str]:
    date = capture(["date", "-u"]).strip()
    mode = (
        "QUICK smoke run (scaled down; numbers are not representative)"
        if args.quick
        else "full run"
    )
    lines = [
        (
            f"Generated by `benchmarks/run.py` — {mode}, {args.rounds} round(s), "
            f"median reported; total time {elapsed / 60:.1f} min."
        ),
        "",
        f"- Date: {date}",
        *machine_info(),
        f"- Data: {data_root} (served by nginx); destinations: {args.dest_dir}"
        + (f" and {args.disk_dest_dir}" if args.disk_dest_dir else ""),
        *conditions.lines(),
        "",
    ]
    lines += ["| profile | ranks | files | total bytes | layout |", "|---|---:|---:|---:|---|"]
    lines += [
        f"| {p.name} | {p.ranks} | {len(p.files):,} | {p.total_bytes:,} | `{p.files[0].rel}` |"
        for p in profiles
    ]
    return [*lines, "", "## Tool versions", "", *tool_versions(cs)]


if __name__ == "__main__":
    sys.exit(main())
