"""Studio captures in the Ava-256 / Goliath layout (SPEC §3): reader and writer.

Layout:
    camera_calibration.json        {"KRT": [{"cameraId", "K" (3×3, transposed), "T" (4×4, transposed,
                                    top 3×4 world-to-camera [R|t], millimetres), "distortion": [k1,k2,p1,p2]}]}
    frame_list.csv                 seg_id,frame_id
    image/cam{ID}.zip              cam{ID}/{frame:06d}.avif|.jpg|.png
    head_pose/head_pose.zip        {frame:06d}.txt — 3×4 head-to-world [R|t] (millimetres)
    segmentation_parts/cam{ID}.zip optional, cam{ID}/{frame:06d}.png

Everything we hand out is in the SPEC §4 convention: R, t world-to-camera in METRES.
Frames are read straight out of the zips (random access through fsspec, no extraction), so a
capture on s3:// costs one ranged read per frame.
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image

from dataprep.build_config import InputPolicy, PhotoFilters
from dataprep.errors import CalibrationError, CaptureError
from dataprep.studio.geometry import validate_camera, validate_rotation
from dataprep.inputs.image_formats import FRAME_FORMATS, MASK_FORMATS, FormatError, open_image
from dataprep.inputs.photos import Rejected
from dataprep.inputs.safe_fetch import read_capped, realpath_inside
from pippo_common.storage import NotRegularFile, is_local, open_regular

MM_PER_M = 1000.0
MAX_POSE_MM = 1e9           # a head pose further than 1000 km is a corrupt file (and overflows later)
FRAME_EXTENSIONS = (".avif", ".jpg", ".jpeg", ".png")
# Camera ids name files (image/cam{ID}.zip): plain names only, never a path.
CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
ZIP_RATIO_FLOOR = 1 << 20      # members smaller than this are never refused for their compression ratio


@dataclass
class Camera:
    """One calibrated camera, SPEC §4 convention (world-to-camera, metres)."""
    id: str
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    dist: np.ndarray = field(default_factory=lambda: np.zeros(4))

    @property
    def distorted(self) -> bool:
        return bool(np.any(self.dist != 0))


def parse_calibration(data: dict, where: str) -> tuple[dict[str, Camera], dict[str, str]]:
    """camera_calibration.json content -> ({id: Camera} valid, {id: reason} invalid)."""
    if not isinstance(data, dict) or not isinstance(data.get("KRT"), list):
        raise CalibrationError(f"{where}: camera_calibration.json has no 'KRT' list")
    cameras, invalid = {}, {}
    for n, entry in enumerate(data["KRT"]):
        cam_id = str(entry.get("cameraId", f"#{n}")) if isinstance(entry, dict) else f"#{n}"
        cam_where = f"{where}: camera {cam_id}"
        try:
            if not isinstance(entry, dict):
                raise CalibrationError(f"{cam_where}: entry is not an object")
            if not CAMERA_ID.fullmatch(cam_id) or ".." in cam_id:
                raise CalibrationError(f"{where}: camera {cam_id[:80]!r}: cameraId is not a plain name "
                                       "(letters, digits, _ . -; it names the camera's zip files)")
            model = entry.get("projectionModel", "Pinhole")
            if model != "Pinhole":
                raise CalibrationError(f"{cam_where}: projection model {model!r} is not Pinhole")
            try:
                K = np.array(entry["K"], np.float64).T          # stored transposed
                T = np.array(entry["T"], np.float64).T          # stored transposed
                dist = np.array(entry.get("distortion", [0, 0, 0, 0]), np.float64).ravel()
            except (KeyError, TypeError, ValueError) as exc:
                raise CalibrationError(f"{cam_where}: malformed K/T/distortion ({exc!r})") from None
            if K.shape != (3, 3) or T.shape != (4, 4) or dist.size > 8:
                raise CalibrationError(f"{cam_where}: K{K.shape} T{T.shape} distortion[{dist.size}], "
                                       "expected 3×3, 4×4, ≤8 coefficients")
            R, t = T[:3, :3], T[:3, 3] / MM_PER_M
            validate_camera(K, R, t, cam_where, dist)
            if cam_id in cameras:
                raise CalibrationError(f"{cam_where}: duplicate cameraId")
            cameras[cam_id] = Camera(cam_id, K, R, t, np.pad(dist, (0, max(0, 4 - dist.size))))
        except CalibrationError as exc:
            invalid[cam_id] = str(exc)
    return cameras, invalid


def camera_to_krt(cam: Camera) -> dict:
    """The SPEC §3 calibration entry of a camera (transposed K/T, millimetres)."""
    T = np.eye(4)
    T[:3, :3] = cam.R
    T[:3, 3] = np.asarray(cam.t) * MM_PER_M
    return {"cameraId": cam.id, "K": np.asarray(cam.K).T.tolist(), "T": T.T.tolist(),
            "distortion": [float(v) for v in cam.dist[:4]], "distortionModel": "RadialAndTangential",
            "projectionModel": "Pinhole"}


def decode_image(data: bytes, where: str, mode: str = "RGB", formats=FRAME_FORMATS,
                 max_pixels: int = PhotoFilters.max_pixels) -> np.ndarray:
    """Bytes of an AVIF/JPEG/PNG -> uint8 array; CaptureError naming `where` if it is another
    format (never handed to a decoder), claims more than max_pixels, or cannot be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # max_pixels decides
            with open_image(data, formats) as im:
                if im.width * im.height > max_pixels:
                    raise CaptureError(f"{where}: decompression bomb refused: {im.width}x{im.height} "
                                       f"exceeds {max_pixels} pixels")
                im.load()
                return np.asarray(im.convert(mode))
    except CaptureError:
        raise
    except FormatError as exc:
        raise CaptureError(f"{where}: {exc.reason}") from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError…)
        raise CaptureError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


class Capture:
    """Lazy reader of one capture at a local path or fsspec URL.

    `strict=True` raises the first calibration error; `strict=False` keeps the valid cameras and
    lists the others in `invalid_cameras` (id -> reason) so a build can reject just those.

    Untrusted input: on a local filesystem every file read must be a regular file that resolves
    inside the capture (a symlinked zip pointing elsewhere is refused); each read is capped at
    `inputs.max_bytes` (zip members by their declared size and compression ratio before being
    inflated); frames must be AVIF/JPEG/PNG within `max_pixels`, masks PNG.
    """

    def __init__(self, uri: str, strict: bool = True, storage_options: dict | None = None,
                 max_pixels: int = PhotoFilters.max_pixels, inputs: InputPolicy | None = None):
        self.uri = str(uri).rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.name = posixpath.basename(self.root.rstrip("/"))
        self.max_pixels = max_pixels
        self.inputs = inputs or InputPolicy()
        self._local = is_local(self.fs)
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._members: dict[str, dict[int, str]] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        calib = self._read_json("camera_calibration.json")
        self.cameras, self.invalid_cameras = parse_calibration(calib, self.name)
        if strict and self.invalid_cameras:
            raise CalibrationError(next(iter(self.invalid_cameras.values())))
        self.frames = self._read_frame_list()

    # -- pickling for Ray tasks: drop open handles, reopen lazily ---------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zips"] = {}
        return state

    def close(self) -> None:
        for zf in self._zips.values():
            zf.close()
        self._zips.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- files ------------------------------------------------------------------------------------
    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def _open(self, rel: str, where: str):
        """A file of the capture for reading: on a local filesystem a regular file resolving
        inside the capture (the same refusal whether an outside target exists or not)."""
        path = self._path(rel)
        if not self._local:
            return self.fs.open(path, "rb")
        if not realpath_inside(path, [self.root]):
            raise CaptureError(f"{where}: {rel} points outside the capture")
        try:
            return open_regular(path)
        except NotRegularFile:
            raise CaptureError(f"{where}: {rel} is not a regular file") from None

    def _read_small(self, rel: str) -> bytes:
        try:
            with self._open(rel, self.name) as f:
                return read_capped(f, self.inputs.max_bytes)
        except Rejected as exc:
            raise CaptureError(f"{self.name}: {rel}: {exc.reason}") from None

    def _read_json(self, rel: str) -> dict:
        try:
            return json.loads(self._read_small(rel))
        except FileNotFoundError:
            raise CaptureError(f"{self.uri}: missing {rel}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CalibrationError(f"{self.name}: {rel} is not valid JSON ({exc})") from None
        except RecursionError:
            raise CalibrationError(f"{self.name}: {rel} is nested too deeply to be a calibration") from None

    def _read_frame_list(self) -> list[int]:
        try:
            text = self._read_small("frame_list.csv").decode("utf-8")
            rows = list(csv.DictReader(io.StringIO(text)))
        except FileNotFoundError:
            raise CaptureError(f"{self.name}: missing frame_list.csv") from None
        except UnicodeDecodeError:
            raise CaptureError(f"{self.name}: frame_list.csv is not UTF-8 text") from None
        try:
            return [int(r["frame_id"]) for r in rows]
        except (KeyError, TypeError, ValueError):
            raise CaptureError(f"{self.name}: frame_list.csv needs a header seg_id,frame_id and integer frame ids") from None

    def _zip(self, rel: str, where: str) -> zipfile.ZipFile:
        if rel not in self._zips:
            try:
                handle = self._open(rel, where)
            except FileNotFoundError:
                raise CaptureError(f"{where}: missing {rel}") from None
            try:
                self._zips[rel] = zipfile.ZipFile(handle)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                handle.close()
                raise CaptureError(f"{where}: {rel} is not a readable zip ({exc})") from None
        return self._zips[rel]

    def _member(self, rel: str, member: str, where: str) -> bytes:
        """A zip member's bytes, refused before inflating when its declared size exceeds
        inputs.max_bytes or it inflates more than inputs.max_zip_ratio (zipfile never returns
        more than the declared size)."""
        zf = self._zip(rel, where)
        cap = self.inputs.max_bytes
        try:
            info = zf.getinfo(member)
            if info.file_size > cap:
                raise CaptureError(f"{where}: {rel}:{member} is {info.file_size} bytes, more than "
                                   f"inputs.max_bytes ({cap})")
            ratio = info.file_size / max(info.compress_size, 1)
            if info.file_size > ZIP_RATIO_FLOOR and ratio > self.inputs.max_zip_ratio:
                raise CaptureError(f"{where}: {rel}:{member} inflates {ratio:.0f}x, more than "
                                   f"inputs.max_zip_ratio ({self.inputs.max_zip_ratio:g})")
            with zf.open(info) as f:
                data = f.read(cap + 1)
            if len(data) > cap:
                raise CaptureError(f"{where}: {rel}:{member} is larger than inputs.max_bytes ({cap})")
            return data
        except KeyError:
            raise CaptureError(f"{where}: {rel} has no member {member}") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as exc:
            # CRC error, truncated data, encrypted or unsupported compression
            raise CaptureError(f"{where}: {rel}:{member} is corrupt ({exc})") from None

    def _frame_member(self, kind: str, cam_id: str, frame: int) -> tuple[str, str]:
        """(zip path, member name) of a frame of a camera, whatever its extension."""
        rel = f"{kind}/cam{cam_id}.zip"
        where = f"{self.name}: camera {cam_id} frame {frame}"
        if rel not in self._members:
            index = {}
            for name in self._zip(rel, where).namelist():
                stem, ext = posixpath.splitext(posixpath.basename(name))
                if ext.lower() in FRAME_EXTENSIONS and stem.isdigit():
                    index[int(stem)] = name
            self._members[rel] = index
        member = self._members[rel].get(int(frame))
        if member is None:
            raise CaptureError(f"{where}: frame missing from {rel}")
        return rel, member

    # -- public access ----------------------------------------------------------------------------
    def camera(self, cam_id: str) -> Camera:
        if cam_id not in self.cameras:
            reason = self.invalid_cameras.get(cam_id, "not in camera_calibration.json")
            raise CaptureError(f"{self.name}: camera {cam_id}: {reason}")
        return self.cameras[cam_id]

    def image_bytes(self, cam_id: str, frame: int) -> tuple[bytes, str]:
        """Raw encoded bytes of a frame and its extension ('.avif', '.jpg', '.png')."""
        rel, member = self._frame_member("image", cam_id, frame)
        data = self._member(rel, member, f"{self.name}: camera {cam_id} frame {frame}")
        return data, posixpath.splitext(member)[1].lower()

    def image(self, cam_id: str, frame: int) -> np.ndarray:
        """Frame of a camera as (H, W, 3) uint8 RGB (as recorded: distortion not removed)."""
        data, _ = self.image_bytes(cam_id, frame)
        img = decode_image(data, f"{self.name}: camera {cam_id} frame {frame}", max_pixels=self.max_pixels)
        self._sizes.setdefault(cam_id, img.shape[:2])
        return img

    def image_size(self, cam_id: str) -> tuple[int, int]:
        """(height, width) of a camera's frames, read from the first frame's header."""
        if cam_id not in self._sizes:
            data, _ = self.image_bytes(cam_id, self.frames[0])
            try:
                with open_image(data, FRAME_FORMATS) as im:
                    self._sizes[cam_id] = (im.height, im.width)
            except FormatError as exc:
                raise CaptureError(f"{self.name}: camera {cam_id}: {exc.reason}") from None
            except Exception as exc:
                raise CaptureError(f"{self.name}: camera {cam_id}: cannot read image size ({exc})") from None
        return self._sizes[cam_id]

    def describe(self) -> dict:
        """JSON-able summary: cameras in the SPEC §4 convention (metres), frames, invalid cameras."""
        cams = []
        for cam_id in sorted(self.cameras):
            cam = self.cameras[cam_id]
            h, w = self.image_size(cam_id)
            cams.append({"camera_id": cam_id, "K": cam.K.tolist(), "R": cam.R.tolist(), "t": cam.t.tolist(),
                         "center": (-cam.R.T @ cam.t).tolist(), "distortion": cam.dist.tolist(),
                         "height": h, "width": w})
        return {"capture": self.name, "uri": self.uri, "units": "m", "frames": self.frames,
                "cameras": cams, "invalid_cameras": self.invalid_cameras, "has_masks": self.has_masks}

    @property
    def has_masks(self) -> bool:
        return self.fs.exists(self._path("segmentation_parts"))

    def mask(self, cam_id: str, frame: int) -> np.ndarray | None:
        """Segmentation parts of a frame as (H, W) uint8 labels (0 = background), or None if absent."""
        rel = f"segmentation_parts/cam{cam_id}.zip"
        # lexists: a symlink to an outside zip is refused by _open, the same whether its target exists
        exists = os.path.lexists if self._local else self.fs.exists
        if not exists(self._path(rel)):
            return None
        rel, member = self._frame_member("segmentation_parts", cam_id, frame)
        data = self._member(rel, member, f"{self.name}: camera {cam_id} frame {frame}")
        return decode_image(data, f"{self.name}: camera {cam_id} frame {frame} mask", mode="L",
                            formats=MASK_FORMATS, max_pixels=self.max_pixels)

    def head_pose(self, frame: int) -> np.ndarray:
        """3×4 head-to-world [R|t] of a frame, translation in metres."""
        where = f"{self.name}: frame {frame} head pose"
        text = self._member("head_pose/head_pose.zip", f"{int(frame):06d}.txt", where)
        try:
            pose = np.loadtxt(io.StringIO(text.decode("utf-8")), dtype=np.float64).reshape(3, 4)
        except (ValueError, UnicodeDecodeError):
            raise CalibrationError(f"{where}: not a 3×4 matrix") from None
        if not np.all(np.isfinite(pose)) or np.abs(pose).max() > MAX_POSE_MM:
            raise CalibrationError(f"{where}: non-finite or absurd values (|v| > {MAX_POSE_MM:g})")
        validate_rotation(pose[:, :3], where)
        pose[:, 3] /= MM_PER_M
        return pose


class CaptureWriter:
    """Writes a capture in the SPEC §3 layout into a temporary directory, renamed on `commit()`.

    Local only: captures are inputs we synthesise for tests and demos; upload a finished capture
    to object storage with `fsspec` (`fs.put(local, remote, recursive=True)`).
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.final = Path(out_dir)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._zips: dict[str, zipfile.ZipFile] = {}

    def _zip(self, rel: str) -> zipfile.ZipFile:
        if rel not in self._zips:
            (self.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            # Frames are already compressed (AVIF/JPEG/PNG): store them, as Ava-256 does.
            self._zips[rel] = zipfile.ZipFile(self.tmp / rel, "w", zipfile.ZIP_STORED)
        return self._zips[rel]

    def write_calibration(self, cameras: list[Camera]) -> None:
        (self.tmp / "camera_calibration.json").write_text(
            json.dumps({"KRT": [camera_to_krt(c) for c in cameras]}, indent=1))

    def write_frame_list(self, frames: list[int], seg_id: str = "seg0") -> None:
        lines = ["seg_id,frame_id"] + [f"{seg_id},{f}" for f in frames]
        (self.tmp / "frame_list.csv").write_text("\n".join(lines) + "\n")

    def add_image(self, cam_id: str, frame: int, image: np.ndarray, fmt: str = "png", quality: int = 92) -> None:
        buf = io.BytesIO()
        pil_format = {"jpg": "JPEG", "png": "PNG", "avif": "AVIF"}[fmt]
        kwargs = {"quality": quality} if fmt in ("jpg", "avif") else {}
        Image.fromarray(image).save(buf, pil_format, **kwargs)
        self._zip(f"image/cam{cam_id}.zip").writestr(f"cam{cam_id}/{frame:06d}.{fmt}", buf.getvalue())

    def add_mask(self, cam_id: str, frame: int, labels: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(labels.astype(np.uint8)).save(buf, "PNG")
        self._zip(f"segmentation_parts/cam{cam_id}.zip").writestr(f"cam{cam_id}/{frame:06d}.png", buf.getvalue())

    def add_head_pose(self, frame: int, pose: np.ndarray) -> None:
        pose = np.array(pose, np.float64)
        pose[:, 3] *= MM_PER_M
        text = "\n".join(" ".join(repr(float(v)) for v in row) for row in pose) + "\n"
        self._zip("head_pose/head_pose.zip").writestr(f"{frame:06d}.txt", text)

    def commit(self) -> Path:
        for zf in self._zips.values():
            zf.close()
        self._zips.clear()
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final

