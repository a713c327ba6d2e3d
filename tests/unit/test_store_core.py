"""dataprep.store.core: claiming a dataset root."""
import pytest

from dataprep.store.core import MARKER, DatasetStore
from pippo_common.errors import DataError


def test_a_concurrent_builds_marker_in_flight_is_a_claim_not_foreign_files(tmp_path):
    """Two builds starting on one empty root: the one that lists while the other writes its
    marker (temp file, then rename) must not refuse the root as "not empty"."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / f"{MARKER}.tmp-1a2b3c4d").write_bytes(b"{}")
    DatasetStore(str(root)).claim_root()
    assert (root / MARKER).is_file()


def test_a_directory_with_other_files_is_refused(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not empty"):
        DatasetStore(str(root)).claim_root()
