import os

import pytest

os.environ.setdefault("RAY_ADDRESS", "")  # never attach tests to a stray cluster
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def synth_capture_dir(tmp_path_factory):
    """One small synthetic capture (6 cameras, 2 frames, masks, PNG) shared by read-only tests."""
    from dataprep.synth import synth_capture

    return synth_capture(tmp_path_factory.mktemp("captures") / "cap0", cameras=6, frames=2,
                         height=96, width=64, seed=5)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    import time
    import urllib.error
    import urllib.request
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return                      # the server answers, even if with an error status
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, its endpoint exported for s3fs/boto (and so for Ray
    workers, which inherit the environment when the session's local Ray starts)."""
    import subprocess
    import sys
    from pathlib import Path
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        os.environ.update(env)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One in-process local Ray for the session, started after the S3 endpoint is exported."""
    from pippo_common.ray_start import ensure_ray
    ray = ensure_ray(dashboard=True)   # Ray Train's controller polls the state API
    yield ray
    ray.shutdown()
