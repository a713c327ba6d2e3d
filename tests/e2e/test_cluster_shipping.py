"""`pippo submit` ships only what the project needs and no credential leaves with a job: the file
selection and its staging copy (checked against Ray's own packager), `--dry-run` through the real
command, credential ARGS refused before anything is submitted, the env allow-list, the torch build.
No Ray head needed (the real submission check is in test_cluster.py)."""
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cluster import shipping

ROOT = Path(__file__).resolve().parents[2]
PEM = "-----BEGIN OPENSSH " + "PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"   # split: this file ships
# credential-shaped files a careless tree holds; each is planted tracked AND untracked
CREDENTIAL_FILES = ["id_rsa", "id_ed25519.pub", "credentials", "configs/service-account.json",
                    ".git-credentials", ".aws/config", ".ssh/known_hosts", ".npmrc", ".netrc",
                    ".pypirc", "kubeconfig", "configs/cert.p12", "tls.pfx", "server.pem",
                    "api.key", ".env", "configs/.env.prod", "dataprep/my-gcp-credentials.json"]


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def make_project(tmp_path, with_git=True):
    """A project tree like ours with credentials planted: tracked ones, untracked ones, a file
    holding a private key, and symlinks (file and directory) to secrets outside the tree."""
    proj, outside = tmp_path / "proj", tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "aws_credentials").write_text("aws_secret_access_key=OUTSIDE-SECRET\n")
    (outside / "dir" / "x.py").write_text("OUTSIDE = 1\n")
    files = {"pyproject.toml": (ROOT / "pyproject.toml").read_text(), "requirements.lock": (ROOT / "requirements.lock").read_text(),
             "pipelines/__init__.py": "", "pipelines/cli/__init__.py": "print('cli')\n",
             "dataprep/__init__.py": "", "configs/a.yaml": "a: 1\n", "scripts/run.sh": "#!/bin/sh\n",
             ".gitignore": "out/\n"}
    for rel, text in files.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text(text)
    (proj / "scripts/run.sh").chmod(0o755)
    for rel in CREDENTIAL_FILES:
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text("SECRET-" + rel)
    (proj / "pipelines/deploy_key.txt").write_text(PEM)                       # content, not name
    (proj / "configs/creds.yaml").symlink_to(outside / "aws_credentials")      # file link out
    (proj / "pipelines/ext").symlink_to(outside / "dir")                       # dir link out
    (proj / "configs/alias.yaml").symlink_to("a.yaml")                         # in-tree link: fine
    if with_git:
        git(proj, "init", "-q")
        git(proj, "add", "-A")
        git(proj, "add", "-f", ".env", "configs/.env.prod")
        git(proj, "commit", "-qm", "x")
    # untracked after the commit: never shipped under git, the same names again
    (proj / "notes.txt").write_text("untracked")
    (proj / ".ssh").mkdir(exist_ok=True)
    (proj / ".ssh/id_rsa").write_text("SECRET-untracked")
    (proj / "configs/mine.yaml").write_text("b: 2\n")
    return proj


def assert_no_secret_shipped(files):
    assert not any(f.startswith(("id_", ".aws/", ".ssh/")) for f in files), files
    for rel in CREDENTIAL_FILES + ["pipelines/deploy_key.txt", "configs/creds.yaml"]:
        assert rel not in files
    assert not any(f.startswith("pipelines/ext") for f in files)


def test_git_tree_ships_tracked_files_without_credentials_or_links_out(tmp_path):
    proj = make_project(tmp_path)
    sel = shipping.select(proj, ["data", "build", "configs/mine.yaml", "workers=2"])
    assert sel.source == "git"
    assert sel.files == ["configs/a.yaml", "configs/alias.yaml", "configs/mine.yaml", "dataprep/__init__.py",
                         "pipelines/__init__.py", "pipelines/cli/__init__.py", "pyproject.toml",
                         "requirements.lock", "scripts/run.sh"]
    assert_no_secret_shipped(sel.files)
    tracked_creds = set(CREDENTIAL_FILES) | {"pipelines/deploy_key.txt"}
    assert tracked_creds <= set(sel.withheld)          # said so (names only) on submission
    assert sel.total_bytes == sum((proj / f).stat().st_size for f in sel.files)

    # the staging copy Ray uploads: private, exactly these regular files, and Ray's own packager
    # (which follows symlinks and honours .gitignore) zips exactly them
    from ray._private.runtime_env.packaging import _zip_files
    with shipping.staged(sel) as stage:
        assert stat.S_IMODE(stage.stat().st_mode) == 0o700
        on_disk = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if not p.is_dir())
        assert on_disk == sel.files
        assert not any(p.is_symlink() for p in stage.rglob("*"))
        assert (stage / "configs/alias.yaml").read_text() == "a: 1\n"
        assert os.access(stage / "scripts/run.sh", os.X_OK)
        zipped = tmp_path / "pkg.zip"
        _zip_files(str(stage), [], str(zipped), include_gitignore=True)
        names = sorted(n for n in zipfile.ZipFile(zipped).namelist() if not n.endswith("/"))
        assert names == sel.files
        blob = b"".join(zipfile.ZipFile(zipped).read(n) for n in names)
        assert b"SECRET" not in blob and b"PRIVATE KEY" not in blob
    assert not stage.exists()


def test_without_git_the_package_source_list_ships(tmp_path):
    proj = make_project(tmp_path, with_git=False)
    sel = shipping.select(proj, [])
    assert sel.source == "package"
    # pyproject's packages (dataprep*, pipelines*, ...) + configs/ + top-level project files
    assert sel.files == ["configs/a.yaml", "configs/alias.yaml", "configs/mine.yaml", "dataprep/__init__.py",
                         "pipelines/__init__.py", "pipelines/cli/__init__.py", "pyproject.toml", "requirements.lock"]
    assert_no_secret_shipped(sel.files)
    assert "notes.txt" not in sel.files and "scripts/run.sh" not in sel.files


@pytest.mark.parametrize("named, message", [("configs/creds.yaml", "symlink out of the tree"),
                                            ("api.key", "looks like a credential"),
                                            ("pipelines/deploy_key.txt", "looks like a credential")])
def test_a_named_file_that_cannot_ship_is_an_error(tmp_path, named, message):
    proj = make_project(tmp_path)
    with pytest.raises(shipping.ShippingError, match=message) as err:
        shipping.select(proj, ["data", "build", named])
    assert "SECRET" not in str(err.value)


def pippo(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def project_with_our_code(tmp_path):
    """This project's real code in a git tree with credentials planted, run by PYTHONPATH so
    `pippo submit` ships that tree."""
    proj = make_project(tmp_path)
    for rel in shipping.select(ROOT).files:
        if rel.startswith(("pippo_common/", "pipelines/", "dataprep/", "cluster/", "pippo_model/", "configs/stages/")):
            (proj / rel).parent.mkdir(parents=True, exist_ok=True)
            (proj / rel).write_bytes((ROOT / rel).read_bytes())
    git(proj, "add", "pippo_common", "pipelines", "dataprep", "cluster", "pippo_model", "configs/stages")
    git(proj, "commit", "-qm", "code")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PIPPO_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(proj), HOME=str(tmp_path))
    return proj, env


def test_dry_run_lists_the_files_and_size_and_submits_nothing(tmp_path):
    proj, env = project_with_our_code(tmp_path)
    # an address nothing listens on: a dry run must not contact it
    proc = pippo("submit", "--dry-run", "--address", "http://127.0.0.1:1", "--",
                 "train", "configs/mine.yaml", "workers=2", env=env, cwd=proj)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    listed = [line.split(None, 1)[1] for line in lines[:-1]]
    sizes = [int(line.split(None, 1)[0]) for line in lines[:-1]]
    assert listed == shipping.select(proj, ["train", "configs/mine.yaml"]).files
    assert {"configs/mine.yaml", "pipelines/cli/__init__.py", "cluster/shipping.py"} <= set(listed)
    assert_no_secret_shipped(listed)
    assert sizes == [(proj / f).stat().st_size for f in listed]
    assert lines[-1].startswith(f"{len(listed)} files, {sum(sizes)} bytes")
    assert "not shipping" in proc.stderr and "id_rsa" in proc.stderr and "SECRET" not in proc.stderr
    assert "submitted" not in proc.stderr and "cannot reach" not in proc.stderr


@pytest.mark.parametrize("arg", ["https://alice:hunter2pw@data.example/list.txt",
                                 "https://ghp_TOKENVALUE@github.com/org/repo",
                                 "sources.0.uri=https://h.example/x?X-Amz-Signature=sigvalue99",
                                 "storage.aws_secret_access_key=s3cretvalue", "openai_key=sk-abcdef99"])
def test_credential_args_are_refused_with_one_line_before_any_submission(tmp_path, arg):
    proj, env = project_with_our_code(tmp_path)
    proc = pippo("submit", "--address", "http://127.0.0.1:1", "--", "data", "build", "configs/a.yaml", arg,
                 env=env, cwd=proj)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("pippo: error: argument 4")
    assert "cannot reach" not in proc.stderr                       # refused before any network
    for secret in ("hunter2pw", "ghp_TOKENVALUE", "sigvalue99", "s3cretvalue", "sk-abcdef99"):
        assert secret not in proc.stderr
