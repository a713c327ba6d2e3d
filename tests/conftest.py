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
