"""Build inputs: enumerate the sources of a build config and fetch their bytes.

An input is one thing that becomes one sample or one reject row: a frame of a capture, a photo
file, a listed URL, or a sample inside an existing WebDataset tar. `input_id` is a stable URL-like
identity (`file:///abs/path`, `s3://b/k`, `https://…`, `…tar#key`, `…capture#frame=10`), used for
incremental builds and in the rejects ledger.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import posixpath
import tarfile
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from dataprep.build_config import HttpConfig, Source
from dataprep.errors import DataError
from dataprep.photos import Rejected
from dataprep.storage import fs_and_path, join, url_of

log = logging.getLogger("pippo.data.sources")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".gif")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "avif")


@dataclass
class InputItem:
    input_id: str
    kind: str                 # studio | image | wds
    uri: str                  # capture URL, photo/URL to fetch, or tar URL
    frame: int = -1           # studio frame
    member: str = ""          # wds: the sample key inside the tar
    size: int = -1            # bytes, when the listing tells (exact duplicates have equal sizes)

    def to_row(self) -> dict:
        return asdict(self)


def enumerate_source(source: Source, depth: int | None = None) -> tuple[list[InputItem], list[dict]]:
    """Inputs of one source, plus reject rows for what is broken at the source level.
    `depth`: how deep to search a directory (None: the whole tree)."""
    fs, root = fs_and_path(source.uri)
    if not fs.exists(root):
        # a missing source is a config mistake: fail before building a version without it
        raise DataError(f"{source.kind} source {source.uri} does not exist")
    if source.kind == "captures":
        return _captures(fs, root)
    if source.kind == "images":
        listing = {root: fs.info(root)} if fs.isfile(root) else fs.find(root, maxdepth=depth, detail=True)
        files = sorted(listing)
        items = [InputItem(url_of(fs, p), "image", url_of(fs, p), size=int(listing[p].get("size", -1))) for p in files
                 if p.lower().endswith(IMAGE_EXTENSIONS) and not posixpath.basename(p).startswith(".")]
        ignored = len(files) - len(items)
        if ignored:
            log.info("images source %s: %d non-image files ignored", source.uri, ignored)
        return items, []
    if source.kind == "urls":
        return _url_list(fs, root)
    if source.kind == "webdataset":
        tars = [root] if fs.isfile(root) else sorted(p for p in fs.find(root) if p.endswith(".tar"))
        return [InputItem(url_of(fs, p), "wds", url_of(fs, p)) for p in tars], []
    raise ValueError(f"unknown source kind {source.kind!r}")


def list_file_inputs(url: str) -> tuple[list[InputItem], list[dict]]:
    """Inputs of one URL list file (.txt/.csv/.parquet)."""
    fs, root = fs_and_path(url)
    return _url_list(fs, root)


def _captures(fs, root: str) -> tuple[list[InputItem], list[dict]]:
    calibs = sorted(p for p in fs.find(root) if posixpath.basename(p) == "camera_calibration.json")
    items, rejects = [], []
    for calib in calibs:
        cap_dir = posixpath.dirname(calib)
        cap_url = url_of(fs, cap_dir)
        try:
            with fs.open(join(cap_dir, "frame_list.csv"), "rb") as f:
                frames = [int(r["frame_id"]) for r in csv.DictReader(io.TextIOWrapper(f, "utf-8"))]
        except (OSError, KeyError, ValueError, TypeError) as exc:
            rejects.append({**InputItem(cap_url, "studio", cap_url).to_row(), "sha256": "", "stage": "capture",
                            "reason": f"unreadable frame_list.csv ({type(exc).__name__}: {exc})"})
            continue
        items += [InputItem(f"{cap_url}#frame={fr}", "studio", cap_url, frame=fr) for fr in frames]
    return items, rejects


def _url_list(fs, root: str) -> tuple[list[InputItem], list[dict]]:
    with fs.open(root, "rb") as f:
        data = f.read()
    if root.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        column = "url" if "url" in table.column_names else table.column_names[0]
        entries = [str(v) for v in table.column(column).to_pylist() if v]
    elif root.endswith(".csv"):
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
        col = rows[0].index("url") if rows and "url" in rows[0] else 0
        start = 1 if rows and "url" in rows[0] else 0
        entries = [r[col].strip() for r in rows[start:] if r and r[col].strip()]
    else:
        entries = [ln.strip() for ln in data.decode("utf-8").splitlines()
                   if ln.strip() and not ln.lstrip().startswith("#")]
    items = []
    for entry in entries:
        # relative entries are relative to the list file, wherever it lives
        target = entry if "://" in entry else url_of(fs, posixpath.join(posixpath.dirname(root), entry))
        items.append(InputItem(target, "image", target))
    return items, []


# ---- fetching ----------------------------------------------------------------------------------

_SESSION: dict[tuple, requests.Session] = {}


def http_session(cfg: HttpConfig) -> requests.Session:
    """A pooled session retrying connection errors and 429/5xx with exponential backoff."""
    key = (cfg.retries, cfg.backoff_s)
    if key not in _SESSION:
        retry = Retry(total=cfg.retries, connect=cfg.retries, read=cfg.retries, status=cfg.retries,
                      backoff_factor=cfg.backoff_s, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=frozenset({"GET"}), raise_on_status=False)
        session = requests.Session()
        session.mount("http://", HTTPAdapter(max_retries=retry))
        session.mount("https://", HTTPAdapter(max_retries=retry))
        _SESSION[key] = session
    return _SESSION[key]


def fetch(uri: str, http: HttpConfig) -> bytes:
    """Bytes of a photo at any fsspec URL or http(s) URL; Rejected('fetch', …) when unavailable."""
    if uri.startswith(("http://", "https://")):
        try:
            resp = http_session(http).get(uri, timeout=http.timeout_s)
        except requests.RequestException as exc:
            raise Rejected("fetch", f"HTTP error after {http.retries} retries: {type(exc).__name__}") from None
        if resp.status_code != 200:
            raise Rejected("fetch", f"HTTP {resp.status_code} after {http.retries} retries")
        return resp.content
    try:
        fs, path = fs_and_path(uri)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("fetch", "file not found") from None
    except OSError as exc:
        raise Rejected("fetch", f"cannot read ({exc})") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    """Samples of a WebDataset tar held in memory: key -> {extension: bytes} (webdataset's rule:
    the key is the member name up to the first dot of its basename)."""
    samples: dict[str, dict[str, bytes]] = {}
    # "r:" = uncompressed only: a gzip bomb named .tar is refused, never inflated in memory
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            key = posixpath.join(dirname, stem)
            f = tar.extractfile(member)
            samples.setdefault(key, {})[ext] = f.read() if f else b""
    return samples


def wds_image(members: dict[str, bytes]) -> bytes | None:
    for ext in WDS_IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    return None
