"""Checkpoint folders on disk and on the Hub: atomic saves, stale weight files, and checks of the paths loaders get.

Every writer of this package (`save_pretrained` of the models and the processor, `export_to_transformers`,
`convert_lavis_checkpoint`, `save_with_remote_code` / `add_remote_code`) writes through `atomic_save`, and every Hub
push goes through `push_files`, so the rules below hold for all of them:

- A save never leaves a folder that does not load. Everything is written into a staging folder beside the target
  first (same parent, hence same filesystem); only when the whole save succeeded are its files moved into the target.
  A failure while writing (an exception, a full disk) leaves the target untouched, and no staging folder behind.
- Saves into one folder accumulate (`model.save_pretrained(d); processor.save_pretrained(d)` is the normal flow):
  the files a save writes replace their old versions one by one, every other file in the folder is kept (as
  transformers does), except weight files the save supersedes (see `stale_weight_files`).
- A push is one Hub commit that adds the new files and deletes the repo's weight files the new version no longer has,
  so `from_pretrained(repo)` can never pick up the weights of an older push.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import RevisionNotFoundError

# Top-level weight files of a transformers checkpoint: `model.safetensors`, `model-00001-of-00003.safetensors`,
# `model.safetensors.index.json`, their pickle twins (`pytorch_model*.bin`), each optionally with a variant
# (`model.fp16.safetensors`). Adapter weights (`adapter_model.*`) and files in subfolders are not weights here.
_WEIGHT_FILE = re.compile(
    r"(?:model|pytorch_model)(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)(?:\.index\.json)?"
)
# Keyword arguments of transformers' `save_pretrained(..., push_to_hub=True)` that describe the push.
HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "token")


def weight_file_variant(path: str) -> str | None:
    """The variant of a top-level weight file (`""` for none, `"fp16"` for `model.fp16.safetensors`), or None when
    `path` is not a weight file."""
    match = _WEIGHT_FILE.fullmatch(path)
    return None if match is None else match.group("variant") or ""


def stale_weight_files(existing: Iterable[str], written: Iterable[str]) -> list[str]:
    """The files of `existing` that a save writing `written` supersedes.

    A save that writes weights of a variant (say `model-0000*-of-00002.safetensors` + index) supersedes every other
    weight file of that variant, in either format (`model.safetensors`, old shards, `pytorch_model.bin`): left
    there, transformers would load `model.safetensors` before the new index, or the pickle with `allow_pickle=True`.
    Weights of other variants stay (a folder may hold `model.safetensors` and `model.fp16.safetensors` on purpose),
    and a save that writes no weights (a processor) supersedes none.
    """
    written = set(written)
    variants = {variant for path in written if (variant := weight_file_variant(path)) is not None}
    return sorted(path for path in existing if path not in written and weight_file_variant(path) in variants)


def relative_files(folder: str | os.PathLike) -> list[str]:
    """Every file below `folder`, as sorted POSIX paths relative to it."""
    folder = Path(folder)
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())


# -- atomic saves ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_save(save_directory: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder to write a save into; on success its files are moved into `save_directory`.

    Semantics (merge, not replace):

    - `save_directory` missing: the staging folder is renamed to it (one atomic rename).
    - `save_directory` present: each staged file replaces its namesake with `os.replace` (atomic per file), subfolders
      are merged the same way, weight files the save supersedes are removed (`stale_weight_files`), and every other
      file already there is kept, so a model and then its processor can be saved into one folder.
    - The block raises (or the disk fills up while it writes): the staging folder is deleted and `save_directory` is
      left exactly as it was.
    - Moving the files in fails (rare: renames need no space): what was moved is rolled back. Until the move is done
      the replaced files are kept (as hard links, free) in a `.<name>.previous-*` folder beside the target, so even a
      process killed during those few renames leaves every old file recoverable.

    The staging folder is `.<name>.saving-*` beside the target (the same filesystem, so renames are atomic), or inside
    it when the target is a mount point or its parent is not writable.
    """
    target = Path(os.path.abspath(save_directory))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it is a file, expected a folder (or a new path)")
    parent = _staging_parent(target)
    try:
        staging = _new_folder(parent, f".{target.name}.saving-")
    except PermissionError:
        if not target.is_dir():
            raise
        # A folder one may write to inside a parent one may not (e.g. a pre-created shared folder): stage inside it.
        parent = target.resolve()
        staging = _new_folder(parent, f".{target.name}.saving-")
    try:
        yield staging
        _move_in(staging, target, parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _staging_parent(target: Path) -> Path:
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.parent
    real = target.resolve()
    if real.parent == real or os.stat(real.parent).st_dev != os.stat(real).st_dev:
        return real  # a mount point (or /): files only rename atomically within its own filesystem
    return real.parent


def _new_folder(parent: Path, prefix: str) -> Path:
    # mkdir (unlike mkdtemp) honours the umask, so a folder renamed into place gets the usual permissions.
    for _ in range(100):
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            return folder
    raise FileExistsError(f"could not create a fresh {prefix}* folder in {parent}")


def _move_in(staging: Path, target: Path, parent: Path) -> None:
    if not target.exists():
        try:
            os.rename(staging, target)
            return
        except OSError:
            if not target.is_dir():  # anything but "someone created it meanwhile": a real error
                raise
    written = relative_files(staging)
    for relative in written:
        _check_no_conflict(target, relative)
    existing = [path.name for path in target.iterdir() if not path.is_dir()]
    stale = stale_weight_files(existing, written)
    # For a process killed midway (exceptions are rolled back): new weights first, config.json last, superseded
    # weights removed at the very end, so every intermediate state of the folder holds a complete set of weights.
    written.sort(key=lambda path: (weight_file_variant(path) is None, path == "config.json", path))
    backup = _new_folder(parent, f".{target.name}.previous-")
    journal: list[tuple[str, str]] = []
    try:
        for relative in written:
            destination = target / relative
            if destination.exists() or destination.is_symlink():
                _keep_copy(destination, backup / relative)
                journal.append(("replaced", relative))
            else:
                for folder in reversed(Path(relative).parents[:-1]):
                    if not (target / folder).is_dir():
                        (target / folder).mkdir()
                        journal.append(("folder", folder.as_posix()))
                journal.append(("added", relative))
            os.replace(staging / relative, destination)
        for relative in stale:
            journal.append(("removed", relative))
            os.replace(target / relative, backup / relative)
    except BaseException:
        _roll_back(journal, target, backup)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _check_no_conflict(target: Path, relative: str) -> None:
    """Refuses, before anything moves, a staged file whose place in the target is a folder or lies below a file."""
    destination = target / relative
    if destination.is_dir() and not destination.is_symlink():
        raise IsADirectoryError(f"cannot save {relative} into {target}: {destination} is a folder")
    for folder in Path(relative).parents[:-1]:
        if (target / folder).exists() and not (target / folder).is_dir():
            raise NotADirectoryError(f"cannot save {relative} into {target}: {target / folder} is a file")


def _keep_copy(path: Path, backup: Path) -> None:
    backup.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, backup, follow_symlinks=False)  # a hard link: no data copied, the target never lacks the file
    except OSError:
        os.replace(path, backup)  # no hard links on this filesystem: move it aside until the new file is in place


def _roll_back(journal: list[tuple[str, str]], target: Path, backup: Path) -> None:
    for kind, relative in reversed(journal):
        with contextlib.suppress(OSError):
            if kind in ("replaced", "removed"):
                os.replace(backup / relative, target / relative)
            elif kind == "added":
                (target / relative).unlink(missing_ok=True)
            else:
                (target / relative).rmdir()
    shutil.rmtree(backup, ignore_errors=True)


# -- the Hub --------------------------------------------------------------------------------------------------------
def pop_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Removes the push arguments of transformers' `save_pretrained(..., push_to_hub=True)` from `kwargs`."""
    return {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}


def push_files(
    folder: str | os.PathLike,
    repo_id: str,
    files: Iterable[str] | None = None,
    *,
    extra_files: Mapping[str, bytes] | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload BLIP-2 checkpoint",
    commit_description: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
) -> Any:
    """Uploads `files` of `folder` (all of them by default) and `extra_files` (path -> content) as one commit.

    The same commit deletes the repo's weight files the upload supersedes (`stale_weight_files`), so a repo pushed
    unsharded and then sharded (or the reverse) holds only the new weights. The repo is created if needed. Returns
    the `CommitInfo`.
    """
    api = HfApi()
    folder = Path(folder)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    files = relative_files(folder) if files is None else sorted(files)
    extra_files = extra_files or {}
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in files
    ]
    operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in extra_files.items()]
    written = [operation.path_in_repo for operation in operations]
    if any(weight_file_variant(path) is not None for path in written):
        existing = _repo_files(api, repo_id, revision, token)
        operations += [CommitOperationDelete(path_in_repo=path) for path in stale_weight_files(existing, written)]
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


def _repo_files(api: HfApi, repo_id: str, revision: str | None, token: str | None) -> list[str]:
    try:
        return api.list_repo_files(repo_id, revision=revision, token=token)
    except RevisionNotFoundError:
        # A branch this push creates starts from the default branch: those are the files it would inherit.
        return api.list_repo_files(repo_id, token=token)


# -- checks of the paths loaders are given --------------------------------------------------------------------------
def check_local_checkpoint(
    path: str | os.PathLike | None,
    caller: str,
    required: tuple[str, ...] = ("config.json",),
    *,
    subfolder: str = "",
    allow_json_file: bool = False,
) -> None:
    """Raises a clear error when a local `path` cannot be the checkpoint folder `caller` reads.

    A file where a folder is expected (typically a weights file such as `model.safetensors`) raises
    `NotADirectoryError` naming the folder to pass instead (config loaders also take a `.json` file when
    `allow_json_file`). An existing folder holding none of `required` (in `subfolder`; empty: no such check) raises
    `FileNotFoundError` naming the folder, the missing file and what the folder does hold. Anything else (a Hub id,
    a missing path) is left to the loader.
    """
    if path is None:
        return
    path = Path(path)
    if path.is_file():
        if allow_json_file and path.suffix == ".json" and weight_file_variant(path.name) is None:
            return
        raise NotADirectoryError(
            f"{caller} expects a checkpoint folder"
            + (f" (the one holding {required[0]})" if required else "")
            + (" or a config .json file" if allow_json_file else "")
            + f", got the file {path}"
            + (f" (a weights file): pass its folder {path.parent}" if _looks_like_weights(path.name) else "")
        )
    folder = path / subfolder if subfolder else path
    if not path.is_dir() or not required or any((folder / name).is_file() for name in required):
        return
    held = sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []
    listed = ", ".join(held[:12]) + (f" ... ({len(held)} files)" if len(held) > 12 else "") if held else "nothing"
    raise FileNotFoundError(
        f"{caller}: {folder} has no {' or '.join(required)}, so it is not a checkpoint folder saved by "
        f"save_pretrained (it holds {listed})"
    )


def _looks_like_weights(name: str) -> bool:
    return weight_file_variant(name) is not None or name.endswith((".safetensors", ".bin", ".pth", ".pt", ".gguf"))
