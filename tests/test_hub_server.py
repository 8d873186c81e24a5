"""Run the real huggingface_hub client against the loopback Hub server in tests/hub_server.py."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from tests.conftest import _start_hub_server, _stop_process

REPO_ID = "hbll-test/tiny-model"


def write_files(folder: Path, files: dict[str, str]) -> Path:
    for relative_path, text in files.items():
        path = folder / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


@pytest.fixture
def populated_repo(hub_server, tmp_path: Path) -> dict[str, str]:
    """Create REPO_ID with a folder under "model/" on main and a changed config on branch "dev".

    Returns the commit ids of main and dev.
    """
    api = HfApi()
    api.create_repo(REPO_ID, exist_ok=True)
    main_folder = write_files(
        tmp_path / "main_upload",
        {"config.json": '{"width": 6}', "weights/block0.txt": "w0", "weights/block1.txt": "w1"},
    )
    main_commit = api.upload_folder(repo_id=REPO_ID, folder_path=main_folder, path_in_repo="model")
    api.create_branch(REPO_ID, branch="dev")
    dev_folder = write_files(tmp_path / "dev_upload", {"config.json": '{"width": 8}'})
    dev_commit = api.upload_folder(repo_id=REPO_ID, folder_path=dev_folder, path_in_repo="model", revision="dev")
    return {"main": main_commit.oid, "dev": dev_commit.oid}


def test_client_targets_loopback_endpoint(hub_server):
    assert hub_server.endpoint.startswith("http://127.0.0.1:")
    assert constants.ENDPOINT == hub_server.endpoint
    assert HfApi().endpoint == hub_server.endpoint
    assert huggingface_hub.hf_api.api.endpoint == hub_server.endpoint
    assert hf_hub_url(REPO_ID, "config.json") == f"{hub_server.endpoint}/{REPO_ID}/resolve/main/config.json"

    HfApi().create_repo(REPO_ID)
    huggingface_hub.model_info(REPO_ID)
    assert hub_server.requests() == [("POST", "/api/repos/create"), ("GET", f"/api/models/{REPO_ID}")]


def test_client_blocks_other_origins(hub_server):
    # Port 1 on loopback: another origin that the guard must reject before connecting.
    with pytest.raises(RuntimeError, match="Blocked request"):
        get_session().get("http://127.0.0.1:1/api/whoami-v2")


def test_whoami_returns_test_user(hub_server):
    assert HfApi().whoami()["name"] == "hbll-test"


def test_create_repo_conflict_and_private(hub_server):
    api = HfApi()
    url = api.create_repo(REPO_ID)
    assert url.repo_id == REPO_ID
    assert url.endpoint == hub_server.endpoint

    assert api.create_repo(REPO_ID, exist_ok=True).repo_id == REPO_ID
    with pytest.raises(HfHubHTTPError) as raised:
        api.create_repo(REPO_ID)
    assert raised.value.response.status_code == 409

    api.create_repo("hbll-test/private-model", private=True)
    assert api.model_info("hbll-test/private-model").private is True
    assert api.model_info(REPO_ID).private is False


def test_new_repo_has_initial_commit(hub_server):
    api = HfApi()
    api.create_repo(REPO_ID)
    assert api.list_repo_files(REPO_ID) == [".gitattributes"]
    commits = api.list_repo_commits(REPO_ID)
    assert [commit.title for commit in commits] == ["initial commit"]


def test_upload_folder_subfolder_and_branch(hub_server, populated_repo):
    api = HfApi()
    main_files = ["model/config.json", "model/weights/block0.txt", "model/weights/block1.txt"]
    assert api.list_repo_files(REPO_ID) == [".gitattributes", *main_files]
    assert api.list_repo_files(REPO_ID, revision="dev") == [".gitattributes", *main_files]

    branches = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO_ID).branches}
    assert branches == {"main": populated_repo["main"], "dev": populated_repo["dev"]}

    tree = list(api.list_repo_tree(REPO_ID, path_in_repo="model"))
    assert [(entry.path, type(entry).__name__) for entry in tree] == [
        ("model/weights", "RepoFolder"),
        ("model/config.json", "RepoFile"),
    ]


def test_model_info_siblings_and_sha(hub_server, populated_repo):
    api = HfApi()
    info = api.model_info(REPO_ID, files_metadata=True)
    assert info.id == REPO_ID
    assert info.sha == populated_repo["main"]
    siblings = {sibling.rfilename: sibling.size for sibling in info.siblings}
    assert siblings["model/config.json"] == len('{"width": 6}')
    assert siblings["model/weights/block0.txt"] == 2

    dev_info = api.model_info(REPO_ID, revision="dev", files_metadata=True)
    assert dev_info.sha == populated_repo["dev"]
    dev_siblings = {sibling.rfilename: sibling.size for sibling in dev_info.siblings}
    assert dev_siblings["model/config.json"] == len('{"width": 8}')

    by_commit = api.model_info(REPO_ID, revision=populated_repo["main"])
    assert by_commit.sha == populated_repo["main"]


def test_hf_hub_download_subfolder_and_revision(hub_server, populated_repo):
    main_path = hf_hub_download(REPO_ID, "config.json", subfolder="model")
    assert Path(main_path).read_text() == '{"width": 6}'
    assert populated_repo["main"] in main_path

    dev_path = hf_hub_download(REPO_ID, "config.json", subfolder="model", revision="dev")
    assert Path(dev_path).read_text() == '{"width": 8}'
    assert populated_repo["dev"] in dev_path

    nested_path = hf_hub_download(REPO_ID, "model/weights/block1.txt", revision=populated_repo["main"])
    assert Path(nested_path).read_text() == "w1"
    assert str(constants.HF_HUB_CACHE) in nested_path


def test_snapshot_download_main_and_dev(hub_server, populated_repo):
    main_snapshot = Path(snapshot_download(REPO_ID))
    assert main_snapshot.name == populated_repo["main"]
    assert (main_snapshot / "model" / "config.json").read_text() == '{"width": 6}'
    assert (main_snapshot / "model" / "weights" / "block0.txt").read_text() == "w0"
    assert (main_snapshot / ".gitattributes").is_file()

    dev_snapshot = Path(snapshot_download(REPO_ID, revision="dev"))
    assert (dev_snapshot / "model" / "config.json").read_text() == '{"width": 8}'


def test_missing_repo_raises_repository_not_found(hub_server):
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("hbll-test/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("hbll-test/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("hbll-test/missing")


def test_missing_file_raises_entry_not_found(hub_server, populated_repo):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "missing.json", subfolder="model")
    with pytest.raises(EntryNotFoundError):
        list(HfApi().list_repo_tree(REPO_ID, path_in_repo="missing-folder"))


def test_missing_revision_raises_revision_not_found(hub_server, populated_repo):
    api = HfApi()
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO_ID, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO_ID, "config.json", subfolder="model", revision="no-such-branch")
    # As on the Hub, a commit to a branch that does not exist fails until create_branch runs.
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID, revision="no-such-branch")


def test_create_commit_deletes_and_skips_unchanged(hub_server, populated_repo):
    api = HfApi()
    commit = api.create_commit(
        REPO_ID,
        operations=[
            CommitOperationDelete("model/weights/"),
            CommitOperationAdd("model/config.json", b'{"width": 6}'),
            CommitOperationAdd("notes.txt", b"notes"),
        ],
        commit_message="Drop weights",
    )
    assert api.list_repo_files(REPO_ID) == [".gitattributes", "model/config.json", "notes.txt"]
    assert api.list_repo_commits(REPO_ID)[0].commit_id == commit.oid
    assert commit.commit_url == f"{hub_server.endpoint}/{REPO_ID}/commit/{commit.oid}"

    # The preupload response carries each file's blob id, so re-uploading the same bytes makes no commit.
    unchanged = api.upload_file(path_or_fileobj=b"notes", path_in_repo="notes.txt", repo_id=REPO_ID)
    assert unchanged.oid == commit.oid


def test_readme_upload_validates_metadata(hub_server):
    api = HfApi()
    api.create_repo(REPO_ID)
    readme = b"---\nlicense: apache-2.0\n---\n# Tiny model\n"
    api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=REPO_ID)
    assert ("POST", "/api/validate-yaml") in hub_server.requests()
    assert Path(hf_hub_download(REPO_ID, "README.md")).read_bytes() == readme


def test_injected_commit_failure_surfaces_message(hub_server):
    api = HfApi()
    api.create_repo(REPO_ID)
    hub_server.fail("/commit/", status=500, message="Storage quota exceeded on the test Hub")

    with pytest.raises(HfHubHTTPError) as raised:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID)
    assert raised.value.response.status_code == 500
    assert "Storage quota exceeded on the test Hub" in str(raised.value)
    assert raised.value.server_message == "Storage quota exceeded on the test Hub"

    hub_server.reset()
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO_ID)
    assert "x.txt" in api.list_repo_files(REPO_ID)


def test_injected_failure_expires_after_times(hub_server):
    api = HfApi()
    api.create_repo(REPO_ID)
    hub_server.fail(f"/api/models/{REPO_ID}", status=403, message="Forbidden once", method="GET", times=1)

    with pytest.raises(HfHubHTTPError) as raised:
        api.model_info(REPO_ID)
    assert raised.value.response.status_code == 403
    assert api.model_info(REPO_ID).id == REPO_ID


def test_restarted_server_keeps_repos(hub_server, populated_repo, tmp_path: Path):
    hub_server.process.terminate()
    hub_server.process.wait(timeout=5)

    port_file = tmp_path / "restart.port"
    process = _start_hub_server(hub_server.root, port_file, tmp_path / "restart.log")
    try:
        url = f"http://127.0.0.1:{port_file.read_text()}/api/models/{REPO_ID}/revision/dev"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as response:
            info = json.loads(response.read())
    finally:
        _stop_process(process)
    assert info["sha"] == populated_repo["dev"]
    assert "model/weights/block1.txt" in [sibling["rfilename"] for sibling in info["siblings"]]
