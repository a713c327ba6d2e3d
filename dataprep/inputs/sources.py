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
import os
import posixpath
import re
import tarfile
import warnings
from dataclasses import asdict, dataclass

import pyarrow.parquet as pq
from PIL import Image

from dataprep.build_config import HttpConfig, InputPolicy, Source
from pippo_common.errors import DataError
from dataprep.inputs.image_formats import PHOTO_FORMATS, FormatError, open_image
from dataprep.inputs.photos import Rejected
from dataprep.inputs.safe_fetch import http_get, read_local, read_object, realpath_inside
from pippo_common.storage import fs_and_path, is_local, join, open_regular, url_of

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
    tag: str = ""             # ETag or mtime, when the listing tells: with `size`, what tells a
                              # photo replaced under the same name (re-processed) from an unchanged one
    list_pos: int = -1        # URL lists: where the entry is in its list file (`list_entry_at`)

    def to_row(self) -> dict:
        return asdict(self)


COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz",
                           ".tar.zst", ".tzst", ".tar.lz4", ".tar.lzma", ".taz")


def _reject(item: InputItem, stage: str, reason: str) -> dict:
    return {**item.to_row(), "sha256": "", "stage": stage, "reason": reason}


OUTSIDE = "local path outside the allowed directories (the source's own directory and inputs.local_roots)"


def enumerate_source(source: Source, policy: InputPolicy | None = None, depth: int | None = None,
                     allow_empty: bool = False) -> tuple[list[InputItem], list[dict]]:
    """Inputs of one source, plus reject rows for what is broken or refused at the source level.

    Nothing outside the source is read: local symlinks must resolve inside the source (or
    `policy.local_roots`), URL-list entries are limited to allowed schemes and directories. A
    source that yields no input to read fails the build (DataError): an empty or all-skipped
    source is a config mistake, not an empty dataset. `depth`: how deep to search a directory
    (None: the whole tree); `allow_empty`: for a part of a source (the build checks the whole)."""
    policy = policy or InputPolicy()
    fs, root = fs_and_path(source.uri)
    if not fs.exists(root):
        # a missing source is a config mistake: fail before building a version without it
        raise DataError(f"{source.kind} source {source.uri} does not exist")
    if source.kind == "captures":
        items, rejects = _captures(fs, root, policy)
    elif source.kind == "images":
        items, rejects = _images(fs, root, policy, depth)
    elif source.kind == "urls":
        items, rejects = _url_list(fs, root, policy)
    elif source.kind == "webdataset":
        items, rejects = _webdataset(fs, root, policy)
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")
    if not items and not allow_empty:
        raise DataError(empty_source_message(source, rejects))
    return items, rejects


def empty_source_message(source: Source, rejects: list[dict]) -> str:
    detail = f"; {len(rejects)} refused, e.g. {rejects[0]['reason']}" if rejects else ""
    return f"{source.kind} source {source.uri} yields no inputs to read{detail}"


def list_file_inputs(url: str, policy: InputPolicy | None = None,
                     split: tuple[int, int] = (0, 1)) -> tuple[list[InputItem], list[dict]]:
    """Inputs of one URL list file (.txt/.csv/.parquet), or of its split k of n (byte ranges of
    a text list, row groups of a parquet list: a giant list is read by n tasks)."""
    fs, root = fs_and_path(url)
    return _url_list(fs, root, policy or InputPolicy(), split)


def _local_roots(fs, root: str, policy: InputPolicy) -> list[str]:
    base = root if fs.isdir(root) else posixpath.dirname(root)
    return [base] + [fs_and_path(r)[1] for r in policy.local_roots]


def signature_tag(info: dict) -> str:
    """An object's change tag from its listing entry: ETag on object stores, else the mtime."""
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return str(tag)


def _listing(fs, root: str, depth: int | None = None) -> dict[str, dict]:
    return {root: fs.info(root)} if fs.isfile(root) else fs.find(root, maxdepth=depth, detail=True)


def _outside(fs, path: str, info: dict, roots: list[str], real_dirs: dict) -> bool:
    """Whether a listed local path resolves outside `roots` (only links and symlinked parents
    can; the resolved parent directories are cached, so a big listing costs one lstat per dir)."""
    if not is_local(fs):
        return False
    if info.get("islink"):
        return not realpath_inside(path, roots)
    parent = posixpath.dirname(path)
    if parent not in real_dirs:
        real_dirs[parent] = realpath_inside(parent, roots)
    return not real_dirs[parent]


def _images(fs, root: str, policy: InputPolicy, depth: int | None = None) -> tuple[list[InputItem], list[dict]]:
    return _image_items(fs, _listing(fs, root, depth), _local_roots(fs, root, policy), url_of(fs, root))


def _image_items(fs, listing: dict[str, dict], roots: list[str], label: str, real_dirs: dict | None = None):
    real_dirs = {} if real_dirs is None else real_dirs
    items, rejects, ignored = [], [], 0
    for p in sorted(listing):
        if not p.lower().endswith(IMAGE_EXTENSIONS) or posixpath.basename(p).startswith("."):
            ignored += 1
            continue
        item = InputItem(url_of(fs, p), "image", url_of(fs, p), size=int(listing[p].get("size", -1)),
                         tag=signature_tag(listing[p]))
        if _outside(fs, p, listing[p], roots, real_dirs):
            rejects.append(_reject(item, "source", OUTSIDE))
        else:
            items.append(item)
    if ignored:
        log.info("images source %s: %d non-image files ignored", label, ignored)
    return items, rejects


def _split_of(url: str, n: int) -> int:
    return int.from_bytes(hashlib.sha1(url.encode()).digest()[:8], "big") % n


def _top_entries(fs, root: str):
    """(path, is_dir, listing info or None) of a directory's entries, streamed: a flat directory
    or prefix of 10^9 objects is never held. Local: scandir (info: one stat, by the caller, for
    the entries it keeps); S3: ListObjectsV2 page by page (its info: size, ETag); other object
    stores: fsspec's whole listing."""
    if is_local(fs):
        with os.scandir(root) as it:
            for e in it:
                yield posixpath.join(root, e.name), e.is_dir(), None
    elif hasattr(fs, "_call_s3"):
        yield from _s3_pages(fs, root)
    else:
        for e in fs.ls(root, detail=True):
            yield e["name"], e["type"] == "directory", e


def _s3_pages(fs, root: str):
    """Deliberately below s3fs's public API: its ls/find return a prefix whole (and cache it),
    and its page iterator is async; this walks the pages of one delimited listing in order."""
    from fsspec.asyn import sync
    bucket, key, _ = fs.split_path(root)
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    while True:
        page = sync(fs.loop, fs._call_s3, "list_objects_v2", **kwargs)
        for d in page.get("CommonPrefixes", []):
            yield f"{bucket}/{d['Prefix'].rstrip('/')}", True, None
        for c in page.get("Contents", []):
            if not c["Key"].endswith("/"):          # a "directory marker" object
                yield f"{bucket}/{c['Key']}", False, {"name": f"{bucket}/{c['Key']}", "size": c["Size"],
                                                      "ETag": c.get("ETag", ""), "type": "file"}
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def list_directory_split(url: str, policy: InputPolicy, split: tuple[int, int]) -> tuple[list[InputItem], list[dict]]:
    """Split k of n of a photo directory: the top files and sub-trees whose URL hashes to k.
    Each split streams the top level and keeps only its share, so neither the driver nor one
    task holds a flat prefix whole."""
    k, n = split
    fs, root = fs_and_path(url)
    roots, real_dirs = _local_roots(fs, root, policy), {}
    files, items, rejects = {}, [], []
    # each split pages through the whole top level (n x the LIST requests of one listing) and
    # keeps its hash share: memory O(share) without knowing the key distribution
    for path, is_dir, info in _top_entries(fs, root):
        if _split_of(url_of(fs, path), n) != k:
            continue
        if is_dir:
            sub = _image_items(fs, _listing(fs, path), roots, url_of(fs, path), real_dirs)
            items += sub[0]
            rejects += sub[1]
        else:
            try:
                files[path] = info or fs.info(path)
            except FileNotFoundError:
                continue                        # deleted while listed
    top = _image_items(fs, files, roots, url_of(fs, root), real_dirs)
    return items + top[0], rejects + top[1]


def _webdataset(fs, root: str, policy: InputPolicy) -> tuple[list[InputItem], list[dict]]:
    listing = _listing(fs, root)
    roots, real_dirs = _local_roots(fs, root, policy), {}
    items, rejects, ignored = [], [], 0
    for p in sorted(listing):
        name = posixpath.basename(p).lower()
        item = InputItem(url_of(fs, p), "wds", url_of(fs, p), size=int(listing[p].get("size", -1)))
        if name.endswith(COMPRESSED_TAR_SUFFIXES):
            rejects.append(_reject(item, "source", "compressed tars are not read (decompress them to .tar)"))
        elif not name.endswith(".tar"):
            ignored += 1
        elif _outside(fs, p, listing[p], roots, real_dirs):
            rejects.append(_reject(item, "source", OUTSIDE))
        else:
            items.append(item)
    if ignored:
        log.info("webdataset source %s: %d files that are not tars ignored", url_of(fs, root), ignored)
    return items, rejects


def _captures(fs, root: str, policy: InputPolicy) -> tuple[list[InputItem], list[dict]]:
    listing = _listing(fs, root)
    calibs = sorted(p for p in listing if posixpath.basename(p) == "camera_calibration.json")
    roots, real_dirs = _local_roots(fs, root, policy), {}
    items, rejects = [], []
    for calib in calibs:
        cap_dir = posixpath.dirname(calib)
        cap_url = url_of(fs, cap_dir)
        if _outside(fs, join(cap_dir, "frame_list.csv"), {}, roots, real_dirs):
            rejects.append(_reject(InputItem(cap_url, "studio", cap_url), "capture", OUTSIDE))
            continue
        try:
            data = read_input(fs, join(cap_dir, "frame_list.csv"), policy.max_bytes, within=[cap_dir])
            frames = [int(r["frame_id"]) for r in csv.DictReader(io.StringIO(data.decode("utf-8")))]
        except (Rejected, KeyError, ValueError, TypeError) as exc:
            why = exc.reason if isinstance(exc, Rejected) else f"{type(exc).__name__}: {exc}"
            rejects.append(_reject(InputItem(cap_url, "studio", cap_url), "capture",
                                   f"unreadable frame_list.csv ({why})"))
            continue
        items += [InputItem(f"{cap_url}#frame={fr}", "studio", cap_url, frame=fr) for fr in frames]
    return items, rejects


_IPV6_HOST = re.compile(r"^(https?://(?:[^/?#@\[\]]*@)?)\[[0-9A-Za-z:.%-]*\]", re.IGNORECASE)


def is_chained(url: str) -> bool:
    """Whether `url` chains fsspec filesystems (`zip://a::file://b`, `simplecache::...`). The
    `::` of an http(s) URL's IPv6 literal host (`http://[2001:db8::1]/a.jpg`) is an address, not
    a chain: that host is left out of the test (the address policy judges it when fetched; http(s)
    never goes through fsspec, see `fetch`)."""
    return "::" in _IPV6_HOST.sub(r"\1[]", url, count=1)


def url_list_entry(entry: str, fs, list_path: str, policy: InputPolicy) -> tuple[str, str | None]:
    """(target URL, None) for an allowed URL-list entry, or (input id, reason it is refused).

    Allowed: http(s) and `policy.allowed_schemes`, the list's own object-store scheme, and local
    paths (relative, absolute or file://) that stay inside the list's directory or
    `policy.local_roots` once symlinks are resolved. Refused: chained URLs (`zip://…::file://…`,
    `simplecache::…`), every other scheme (file outside, memory://, ftp://, data:…). The reason for
    a local path outside is the same whether or not the file exists."""
    list_dir = posixpath.dirname(list_path)
    if is_chained(entry):
        return entry, "chained URLs (::) are not allowed"
    local = is_local(fs)
    if "://" in entry:
        scheme = entry.split("://", 1)[0].lower()
        if scheme == "file":
            path = entry[len("file://"):]
        else:
            own = [] if local else [p.lower() for p in (fs.protocol if isinstance(fs.protocol, (tuple, list))
                                                         else (fs.protocol,))]
            if scheme in policy.allowed_schemes or scheme in own:
                return scheme + entry[len(scheme):], None      # HTTP:// -> http:// (fetch's dispatch)
            allowed = sorted(set(policy.allowed_schemes) | set(own))
            return entry, f"scheme {scheme}:// not allowed (allowed: {', '.join(allowed)}, local paths)"
    else:
        path = entry if entry.startswith("/") and local else posixpath.join(list_dir, entry)
    if not local and not entry.lower().startswith("file://"):
        key = posixpath.normpath(path)         # a path relative to a list on an object store
        if key.startswith(list_dir.rstrip("/") + "/"):
            return url_of(fs, key), None
        return url_of(fs, key), "object path outside the list's directory"
    path = os.path.normpath(path)
    target = f"file://{path}"
    roots = ([list_dir] if local else []) + [fs_and_path(r)[1] for r in policy.local_roots]
    if "\0" in path or not realpath_inside(path, roots):
        return target, OUTSIDE
    return target, None


MAX_LIST_LINE = 64 * 1024      # bytes of one URL-list line (a longer one is refused, not read whole)


def _open_list(fs, path: str):
    """A list file opened for (range) reads: local ones must be regular files (never a FIFO)."""
    try:
        return open_regular(path) if is_local(fs) else fs.open(path, "rb")
    except FileNotFoundError:
        raise Rejected("fetch", "list file not found") from None
    except (OSError, ValueError) as exc:
        raise Rejected("fetch", f"cannot read the list file ({type(exc).__name__})") from None


def _text_lines(f, start: int, end: int):
    """(byte offset, line) of the lines of a text file that START in [start, end): a list split
    in byte ranges across tasks reads each line exactly once (the line crossing `start` belongs
    to the range before). Lines longer than MAX_LIST_LINE come back as None (skipped over)."""
    pos = max(start - 1, 0)
    f.seek(pos)
    if start > 0:
        while True:                                  # the rest of the line holding byte start-1
            chunk = f.readline(MAX_LIST_LINE)
            pos += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                break
    while pos < end:
        line = f.readline(MAX_LIST_LINE + 1)
        if not line:
            return
        at, pos = pos, pos + len(line)
        if len(line) > MAX_LIST_LINE and not line.endswith(b"\n"):
            while True:
                chunk = f.readline(MAX_LIST_LINE)
                pos += len(chunk)
                if not chunk or chunk.endswith(b"\n"):
                    break
            yield at, None
            continue
        yield at, line


def _list_entries(fs, root: str, policy: InputPolicy, split: tuple[int, int] = (0, 1)):
    """(position, entry or None) of a list file's entries in split k of n. Positions: the byte
    offset of the line (.txt), the row index (.csv, .parquet); None: an unreadable entry."""
    k, n = split
    if root.endswith(".parquet"):
        with _open_list(fs, root) as f:
            meta = pq.ParquetFile(f)
            column = "url" if "url" in meta.schema_arrow.names else meta.schema_arrow.names[0]
            first = 0
            for g in range(meta.num_row_groups):     # row groups across tasks: k, k+n, ...
                rows = meta.metadata.row_group(g).num_rows
                if g % n == k:
                    values = meta.read_row_group(g, columns=[column]).column(0).to_pylist()
                    yield from ((first + i, str(v)) for i, v in enumerate(values) if v)
                first += rows
    elif root.endswith(".csv"):
        if k:            # records may hold quoted newlines: a csv list is read whole, by split 0
            return
        data = read_input(fs, root, policy.max_bytes)
        rows = list(csv.reader(io.StringIO(data.decode("utf-8", errors="replace"))))
        header = bool(rows) and "url" in rows[0]
        col = rows[0].index("url") if header else 0
        for i, r in enumerate(rows[1:] if header else rows):
            if len(r) > col and r[col].strip():
                yield i, r[col].strip()
    else:
        with _open_list(fs, root) as f:
            size = f.seek(0, 2)
            for at, line in _text_lines(f, size * k // n, size * (k + 1) // n):
                if line is None:
                    yield at, None
                    continue
                text = line.decode("utf-8", errors="replace").strip()
                if text and not text.startswith("#"):
                    yield at, text


def _url_list(fs, root: str, policy: InputPolicy, split: tuple[int, int] = (0, 1)):
    items, rejects = [], []
    for pos, entry in _list_entries(fs, root, policy, split):
        if entry is None:
            rejects.append(_reject(InputItem(f"{url_of(fs, root)}#byte={pos}", "image", "", list_pos=pos),
                                   "source", f"list line longer than {MAX_LIST_LINE} bytes"))
            continue
        target, refused = url_list_entry(entry, fs, root, policy)
        item = InputItem(target, "image", target, list_pos=pos)
        if refused:
            rejects.append(_reject(item, "source", refused))
        else:
            items.append(item)
    return items, rejects


def list_entry_at(list_url: str, pos: int, policy: InputPolicy) -> tuple[str, str | None]:
    """The entry at `pos` of a list file, judged again (url_list_entry): how a failed download
    is retried with the credentials of its row, which no ledger stores."""
    fs, root = fs_and_path(list_url)
    if root.endswith((".parquet", ".csv")):
        for at, entry in _list_entries(fs, root, policy):
            if at == pos:
                return url_list_entry(entry, fs, root, policy)
            if at > pos:
                break
        raise Rejected("fetch", f"row {pos} is no longer in {url_of(fs, root)}")
    with _open_list(fs, root) as f:
        f.seek(pos)
        line = f.readline(MAX_LIST_LINE + 1)
    text = line.decode("utf-8", errors="replace").strip()
    if not text or len(line) > MAX_LIST_LINE:
        raise Rejected("fetch", f"byte {pos} of {url_of(fs, root)} holds no entry")
    return url_list_entry(text, fs, root, policy)


# ---- fetching ----------------------------------------------------------------------------------

def read_input(fs, path: str, max_bytes: int, within: list[str] | None = None) -> bytes:
    """Bytes of a file of any filesystem, at most max_bytes; local files must be regular files
    (and resolve inside `within` when given). Rejected('fetch', ...) otherwise."""
    if is_local(fs):
        if within is not None and not realpath_inside(path, within):
            raise Rejected("fetch", OUTSIDE)
        return read_local(path, max_bytes)
    return read_object(fs, path, max_bytes)


def fetch(uri: str, http: HttpConfig, max_bytes: int = InputPolicy.max_bytes) -> bytes:
    """Bytes of an input at an fsspec URL or http(s) URL, at most max_bytes; Rejected('fetch', …)
    when unavailable or refused."""
    if uri[:8].lower().startswith(("http://", "https://")):    # never fsspec's unguarded http
        return http_get(uri, http, max_bytes)
    if "::" in uri:
        raise Rejected("fetch", "chained URLs (::) are not allowed")
    try:
        fs, path = fs_and_path(uri)
    except (ValueError, ImportError) as exc:
        raise Rejected("fetch", f"cannot read ({type(exc).__name__})") from None
    return read_input(fs, path, max_bytes)


def check_body(data: bytes, kind: str, max_pixels: int) -> None:
    """Rejected unless a downloaded body is what the input should be: a tar (its first header
    parses) for `wds`, else an image of an allowed format whose header parses within max_pixels.
    Only such bodies go into the store's URL cache (never, say, a JSON of credentials)."""
    if kind == "wds":
        try:
            tarfile.open(fileobj=io.BytesIO(data), mode="r:").close()
        except tarfile.TarError as exc:
            raise Rejected("decode", f"not a readable tar ({type(exc).__name__}: {exc})") from None
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(data, PHOTO_FORMATS) as im:
                width, height = im.size
    except FormatError as exc:
        raise Rejected("decode", exc.reason) from None
    except Image.DecompressionBombError as exc:
        raise Rejected("decode", f"decompression bomb refused: {exc}") from None
    except Exception as exc:
        raise Rejected("decode", f"not a readable image ({type(exc).__name__}: {exc})") from None
    if width * height > max_pixels:
        raise Rejected("decode", f"decompression bomb refused: {width}x{height} exceeds {max_pixels} pixels")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class TarContents:
    samples: dict[str, dict[str, memoryview]]    # readable samples: key -> {extension: bytes}
    rejected: dict[str, str]                     # sample key -> why the sample is rejected
    others: dict[str, str]                       # id of what is no sample (a directory entry, an
                                                 # unreadable remainder) -> reason


def read_tar(data: bytes, max_bytes: int = InputPolicy.max_bytes) -> TarContents:
    """Every member of a WebDataset tar held in memory, accounted for (webdataset's rule: the key
    is the member name up to the first dot of its basename).

    A link, a device, a sparse or an oversized member, an unreadable one or a name seen twice
    rejects its sample only; directory entries are reported; a header that cannot be parsed
    ends the read with the samples so far kept and the rest reported as one unreadable
    remainder (tarfile itself ends quietly there). Members are views into `data` (no copies)."""
    view = memoryview(data)
    samples: dict[str, dict[str, memoryview]] = {}
    rejected: dict[str, str] = {}
    others: dict[str, str] = {}
    seen: set[str] = set()
    try:
        # "r:" = uncompressed only: a gzip bomb named .tar is refused, never inflated in memory
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as exc:
        raise Rejected("decode", f"not a readable tar ({type(exc).__name__}: {exc})") from None
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, UnicodeError, ValueError) as exc:
                others[f"remainder@{tar.offset}"] = (f"unreadable tar header at byte {tar.offset} "
                                                     f"({type(exc).__name__}): the rest is not read")
                break
            if member is None:
                rest = bytes(view[tar.offset:]).strip(b"\0") if tar.offset < len(data) else b""
                if rest:
                    others[f"remainder@{tar.offset}"] = (f"corrupt tar header at byte {tar.offset}: the "
                                                         f"remaining {len(data) - tar.offset} bytes are not read")
                break
            name = member.name
            if member.isdir():
                others[name.rstrip("/") + "/"] = "directory entry (holds no sample)"
                continue
            dirname, base = posixpath.split(name)
            stem, _, ext = base.partition(".")
            key = posixpath.join(dirname, stem)
            why = None
            if name in seen:
                why = f"member {name} appears twice"
            elif member.issym() or member.islnk():
                why = f"member {name} is a link"
            elif not member.isreg():
                why = f"member {name} is not a regular file"
            elif member.issparse():
                why = f"member {name} is sparse"
            elif member.size > max_bytes:
                why = f"member {name}: {member.size} bytes exceed inputs.max_bytes ({max_bytes})"
            elif member.offset_data + member.size > len(data):
                why = f"member {name} is truncated"
            seen.add(name)
            if why:
                rejected.setdefault(key, why)
                continue
            samples.setdefault(key, {})[ext] = view[member.offset_data:member.offset_data + member.size]
    for key in rejected:
        samples.pop(key, None)
    return TarContents(samples, rejected, others)


def tar_samples(data: bytes, max_bytes: int = InputPolicy.max_bytes) -> dict[str, dict[str, memoryview]]:
    """The readable samples of a WebDataset tar: key -> {extension: bytes}."""
    return read_tar(data, max_bytes).samples


def tar_rows(item: InputItem, data: bytes, max_bytes: int) -> list[dict]:
    """One ledger row per sample of a tar (input fields + sha256 of its image, or a reject) and
    one per member that is no sample; `…tar#key` / `…tar#member` input ids."""
    contents = read_tar(data, max_bytes)
    rows = []
    for key in sorted(set(contents.samples) | set(contents.rejected)):
        if key in contents.rejected:
            member = InputItem(f"{item.uri}#{key}", "wds", item.uri, member=key)
            rows.append(_reject(member, "decode", contents.rejected[key]))
            continue
        image = wds_image(contents.samples[key])
        member = InputItem(f"{item.uri}#{key}", "wds", item.uri, member=key, size=len(image or b""))
        if image is None:
            rows.append(_reject(member, "decode", "sample has no image member"))
        else:
            rows.append({**member.to_row(), "sha256": sha256(image), "stage": "", "reason": ""})
    for mid in sorted(contents.others):
        rows.append(_reject(InputItem(f"{item.uri}#{mid}", "wds", item.uri, member=mid), "decode",
                            contents.others[mid]))
    if not rows:
        raise Rejected("decode", "tar holds no samples")
    return rows


def wds_image(members: dict[str, bytes]) -> bytes | None:
    for ext in WDS_IMAGE_EXTENSIONS:
        if ext in members:
            return members[ext]
    return None
