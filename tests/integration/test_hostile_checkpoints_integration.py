"""Hostile checkpoint metadata and configs (issue 15, items 6, 8 and 9), through the real commands
in this process: a run directory written by someone else (its model.json, run.json), a config
override pointing at a device or a FIFO, names that would leave their root. Each is refused with
one `pippo: error:` line and exit 2, and nothing is fetched or written outside its root."""
import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from support import refused, crafted_run, sample_argv  # shared with this file's other half

PIXEL = {"space": "pixel", "latent_channels": 3, "vae_downsample": 1, "patch_size": 4, "resolution": 16,
         "dim": 32, "depth": 1, "heads": 1, "camera_hidden": 16, "max_views": 8, "siren_channels": [4],
         "camera_mlp": False, "control_mlp": False}
LATENT = {**PIXEL, "space": "latent", "latent_channels": 4, "vae_downsample": 8, "patch_size": 2,
          "resolution": 32}



@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "me.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path



class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):   # noqa: N802 (http.server's name)
        _Recorder.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_server():
    _Recorder.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.hits
    server.shutdown()
    server.server_close()


def test_vae_path_of_a_checkpoint_goes_through_the_address_policy(tmp_path, photo, loopback_server, monkeypatch):
    """model.json's vae_path is a URL `pippo sample` fetches: loopback, cloud metadata and private
    addresses are refused before any request; other schemes and fsspec chains are refused too."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))          # the weights cache (~/.cache/pippo)
    base, hits = loopback_server
    cases = {f"{base}/vae": "loopback", "http://169.254.169.254/latest/vae": "link-local",
             "http://[::1]:9/vae": "loopback", "http://10.1.2.3/vae": "private",
             "ftp://example.com/vae": "only local paths, http(s) and object stores",
             f"simplecache::{base}/vae": "not chained URLs"}
    for i, (url, says) in enumerate(cases.items()):
        run = crafted_run(tmp_path / f"run{i}", {**LATENT, "vae_path": url})
        refused(sample_argv(run, photo, tmp_path / "out.gif"), says)
    assert hits == []                                            # nothing reached the server
    assert not list(tmp_path.glob("out*"))
    cache = tmp_path / "home" / ".cache" / "pippo"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
