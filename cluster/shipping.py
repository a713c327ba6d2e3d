"""What `pippo submit` ships as the job's working_dir, and the private staging copy Ray uploads.

A working_dir is readable by every job on the cluster and kept in its package store, so only what
the project needs travels:

- the files git tracks in the checkout (their working-tree content), or, when the checkout is not
  a git work tree, the package's own sources: the packages pyproject.toml names, configs/, and
  the top-level project files;
- plus the files the job's ARGS name explicitly (`configs/stages/mine.yaml` not yet committed);
- never a credential-shaped file (id_rsa*, credentials, *service-account*.json, .aws/, .ssh/,
  .netrc, kubeconfig, *.pem, *.key, .env ...; or a private-key block in its first bytes), even
  when tracked or named;
- never anything a symlink points to outside the tree (a file whose real path, parents
  included, leaves the tree), nor a FIFO, device or directory posing as a file.

Ray's own packager (ray._private.runtime_env.packaging) walks a directory with `is_dir()` and
`ZipFile.write`, both of which follow symlinks, and honours .gitignore/.rayignore inside it. So
it is handed a staging copy: a fresh `mkdtemp` directory (0700) holding exactly the selected
files as regular files, without ignore files (which could only make Ray drop a selected file).
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from pippo_common.errors import UserError

# Never shipped, whatever git says: build outputs, caches, environments.
SKIP_DIRS = {".venv", ".git", ".pippo", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
ROOT_ONLY = {"out", "build"}
SKIP_FILES = ("*.pyc", ".gitignore", ".rayignore")   # ignore files: see the module docstring
# Credential-shaped names (matched case-insensitively against each path's file name) and
# directories whose whole content is credentials or per-user config that may hold them.
CREDENTIAL_FILES = (
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.ppk", "authorized_keys", "known_hosts",
    "credentials", "credentials.*", "*credential*.json", "*service-account*.json",
    "*service_account*.json", "application_default_credentials.json", ".git-credentials",
    ".npmrc", ".netrc", "_netrc", ".pypirc", ".pgpass", ".my.cnf", ".htpasswd", ".s3cfg", ".boto",
    ".dockercfg", ".vault-token", "auth_token", "*.token", "kubeconfig", "*.kubeconfig",
    "*.p12", "*.pfx", "*.pem", "*.key", "*.jks", "*.keystore", "*.gpg", "*.asc", "*.tfstate",
    "*.tfstate.*", ".env", ".env.*", "*.env", "secrets.*", "*.secret", "*.secrets",
)
CREDENTIAL_DIRS = {".aws", ".ssh", ".gnupg", ".kube", ".docker", ".azure", "gcloud", ".gcloud",
                   ".terraform.d", ".password-store", "secrets"}
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----")
SNIFF_BYTES = 64 * 1024
TOP_LEVEL = ("pyproject.toml", "requirements.lock", "README.md", "Makefile")   # no-git fallback


class ShippingError(UserError):
    """A named file cannot be shipped (one line for the user)."""


@dataclass
class Selection:
    root: Path
    files: list[str]          # relative POSIX paths, sorted: what travels
    withheld: list[str]       # relative paths left out because they look like credentials
    source: str               # "git" or "package": how the list was made

    @property
    def total_bytes(self) -> int:
        return sum((self.root / f).stat().st_size for f in self.files)


def is_credential_path(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    if any(p.lower() in CREDENTIAL_DIRS for p in parts[:-1]):
        return True
    name = parts[-1].lower()
    return any(fnmatch(name, pat) for pat in CREDENTIAL_FILES)


def _skipped(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    if any(p in SKIP_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
        return True
    if len(parts) > 1 and parts[0] in ROOT_ONLY:
        return True
    return any(fnmatch(parts[-1], pat) for pat in SKIP_FILES)


def _inside(root_real: str, path: Path) -> str | None:
    """The real path of `path` if it is a regular file inside the tree (symlinks resolved, the
    parents' too), else None."""
    real = os.path.realpath(path)
    if os.path.commonpath([root_real, real]) != root_real:
        return None
    try:
        st = os.stat(real, follow_symlinks=False)
    except OSError:
        return None                              # tracked but deleted, or unreadable
    return real if stat.S_ISREG(st.st_mode) else None


def _holds_private_key(real: str) -> bool:
    # O_NONBLOCK: a FIFO swapped in after the check must not block the open.
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        return bool(PRIVATE_KEY.search(f.read(SNIFF_BYTES)))


def git_files(root: Path) -> list[str] | None:
    """The paths git tracks under `root`, or None when `root` is not in a git work tree (or git
    is missing). Repository config cannot run commands here: fsmonitor and hooks are disabled."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        proc = subprocess.run(
            [git, "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null",
             "ls-files", "-z", "--cached"],
            cwd=root, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    names = [n.decode("utf-8", "surrogateescape") for n in proc.stdout.split(b"\0") if n]
    return sorted(set(names))


def package_files(root: Path) -> list[str]:
    """The package's own source list: the packages pyproject.toml's setuptools `include` names,
    configs/, and the top-level project files. Directory symlinks are not followed."""
    import tomllib

    try:
        find = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
        packages = sorted({p.split("*")[0].rstrip(".") for p in find["include"]})
    except (OSError, KeyError, ValueError):
        raise ShippingError(f"{root}/pyproject.toml does not name the packages to ship") from None
    out = [f for f in TOP_LEVEL if (root / f).is_file()]
    for top in [*packages, "configs"]:
        for dirpath, dirnames, filenames in os.walk(root / top):      # followlinks=False
            dirnames.sort()
            out += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames]
    return sorted(set(out))


def named_files(root: Path, args: list[str]) -> list[str]:
    """ARGS that name an existing file in the tree, relative to it (the job runs in the tree)."""
    out = []
    for arg in args:
        if arg.startswith("-") or "://" in arg or "=" in arg or os.path.isabs(arg):
            continue
        if (root / arg).is_file() or (root / arg).is_symlink():
            out.append(PurePosixPath(os.path.normpath(arg)).as_posix())
    return out


def select(root: Path, args: list[str] = ()) -> Selection:
    """The files to ship (see the module docstring). A credential-shaped or escaping file an
    ARG names explicitly is an error (the job would fail without it); tracked ones are withheld."""
    root = root.resolve()
    root_real = os.path.realpath(root)
    listed = git_files(root)
    source = "git" if listed is not None else "package"
    candidates = listed if listed is not None else package_files(root)
    named = named_files(root, list(args))
    files, withheld = set(), set()
    for rel in sorted(set(candidates) | set(named)):
        explicit = rel in named
        if rel.startswith("../") or (_skipped(rel) and not explicit):
            continue
        real = _inside(root_real, root / rel)
        if real is None:
            if explicit:
                raise ShippingError(f"{rel}: not a regular file inside {root} (a symlink out of "
                                    "the tree is never shipped)")
            continue
        target = os.path.relpath(real, root_real)
        if is_credential_path(rel) or is_credential_path(target) or _holds_private_key(real):
            if explicit:
                raise ShippingError(f"{rel} looks like a credential file and is never shipped; "
                                    "give the cluster its credentials (README: Run it on your cluster)")
            withheld.add(rel)
            continue
        files.add(rel)
    return Selection(root, sorted(files), sorted(withheld), source)


@contextmanager
def staged(selection: Selection):
    """A private copy (mkdtemp, 0700) of exactly the selected files, removed on exit. Files are
    read through their checked real path, O_NOFOLLOW | O_NONBLOCK, and must still be regular."""
    stage = Path(tempfile.mkdtemp(prefix="pippo-submit-"))
    try:
        root_real = os.path.realpath(selection.root)
        for rel in selection.files:
            real = _inside(root_real, selection.root / rel)
            if real is None:
                raise ShippingError(f"{rel} changed while it was being staged; submit again")
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as src:
                st = os.fstat(src.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ShippingError(f"{rel} changed while it was being staged; submit again")
                dest = stage / rel
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fdd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                              0o700 if st.st_mode & 0o111 else 0o600)
                with os.fdopen(fdd, "wb") as out:
                    shutil.copyfileobj(src, out)
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
