"""Issue 10 items 6-8: credentials are never stored or printed; hostile or careless input ends as
one clear line on stderr (exit 2), never a traceback or a hang; -q/-v anywhere; quiet libraries.

Each test builds its hostile input itself and runs `pippo` in-process (pipelines.cli.main), so
the whole file takes seconds: no Ray, one subprocess (a real closed pipe)."""
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from support import free_port
from support import AWS_SECRET, KEY_ID, one_line, fake_version  # shared with this file's other half


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# ---- 6. secrets --------------------------------------------------------------------------------


# ---- 7. one clear line: object stores ----------------------------------------------------------


class _DenyAll(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every key: what a wrong AWS_ACCESS_KEY_ID gets."""
    requests = 0

    def _deny(self):
        type(self).requests += 1
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidAccessKeyId</Code>'
                b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _deny

    def log_message(self, *args):
        pass


def test_wrong_credentials_are_one_line(capsys, aws_env, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _DenyAll)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        start = time.monotonic()
        line = one_line(capsys, "data", "show", "s3://bucket/ds@latest")
        assert time.monotonic() - start < 5
    finally:
        server.shutdown()
    assert "access denied" in line and "credentials" in line
    assert AWS_SECRET not in line and _DenyAll.requests <= 2      # no retry storm


def test_missing_bucket_is_one_line(capsys, s3_server):
    import fsspec

    fsspec.filesystem("s3").mkdir("t10-present")
    assert "does not exist" in one_line(capsys, "data", "versions", "s3://t10-absent/ds")
    assert one_line(capsys, "data", "show", "s3://t10-present/ds@latest").endswith("no versions")


# ---- 7. one clear line: configs and arguments --------------------------------------------------


# ---- 7. one clear line: stores and versions ----------------------------------------------------


def test_closed_stdout_pipe_is_a_quiet_exit(tmp_path):
    """`pippo data versions D | head -1`: no BrokenPipeError traceback, the SIGPIPE status."""
    ds = tmp_path / "ds"
    for k in range(1500):       # ~160 KiB of listing > pipe + reader buffers: the writer meets the closed pipe
        fake_version(ds, f"{k:020d}", created=f"2026-01-01T00:00:{k % 60:02d}+00:00")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "data", "versions", str(ds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.readline()      # `head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


# ---- 7. one clear line: calibrations -----------------------------------------------------------


# ---- 8. quiet libraries, -q/-v anywhere --------------------------------------------------------
