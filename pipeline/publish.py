"""Upload the export folder (``artifacts/export``: weights, GGUF files, model card) to the Hugging Face hub.

    python -m pipeline.publish --repo <owner/name> [--folder artifacts/export] [--private] [--dry-run]

``--dry-run`` lists every file that would be uploaded, with its size, and the first lines of the model
card, without touching the network. Otherwise the repository is created if needed (``exist_ok``) and
the folder uploaded in one commit with ``HfApi().upload_folder``. The token is read from ``HF_TOKEN``
only; it is never printed or written, and any error message has it masked. A missing token, folder or
model card is an error with the fix (exit status 2); a failed upload exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import paths
from pipeline.errors import ConfigError, PipelineError
from pipeline.model_card import size

DEFAULT_FOLDER = paths.stage_dir("export")
CARD = "README.md"
CARD_LINES = 20
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MASK = "***"
HIDDEN = [".*", "**/.*", ".*/**", "**/.*/**"]  # dotfiles and dot-folders are not part of an export


class UploadError(PipelineError):
    """The hub refused or failed the upload (exit status 1)."""


def mask(text: str, token: str | None) -> str:
    """``text`` with ``token`` (and anything shaped like a hub token) replaced by ``***``."""
    token = (token or "").strip()
    if token:
        text = text.replace(token, MASK)
    return re.sub(r"hf_[A-Za-z0-9]{8,}", MASK, text)


def files(folder: Path) -> list[tuple[str, int]]:
    """``(relative path, bytes)`` of every file that would be uploaded (not dotfiles), sorted."""
    return [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def check(repo: str, folder: Path) -> list[tuple[str, int]]:
    """The folder's files; a clear error for a bad repo id, a missing folder or a folder without a card."""
    if not REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise ConfigError(f"--repo {repo!r} is not a hub repository id", "use owner/name, e.g. --repo me/my-model")
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist", "run the export stage first (`dvc repro export`) or pass "
                          "--folder")
    listed = files(folder)
    if not listed:
        raise ConfigError(f"{folder} is empty", "run the export stage (`dvc repro export`)")
    if not (folder / CARD).is_file():
        raise ConfigError(f"{folder} has no {CARD} (model card)", "run the export stage (`dvc repro export`), "
                          "which writes it")
    return listed


def dry_run(repo: str, folder: Path, private: bool) -> None:
    listed = check(repo, folder)
    print(f"would upload {len(listed)} files ({size(sum(n for _, n in listed))}) from {folder} to "
          f"{'private' if private else 'public'} model repository {repo}:")
    width = max(len(name) for name, _ in listed)
    for name, n_bytes in listed:
        print(f"  {name:<{width}}  {size(n_bytes):>10}")
    card = (folder / CARD).read_text().splitlines()
    print(f"\n{CARD}, first {min(CARD_LINES, len(card))} of {len(card)} lines:")
    for line in card[:CARD_LINES]:
        print(f"  {line}")


def upload(repo: str, folder: Path, private: bool) -> str:
    """Create the repository if needed and upload the folder; returns the commit URL."""
    check(repo, folder)
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise ConfigError("HF_TOKEN is not set", "export HF_TOKEN=<a write token from "
                          "https://huggingface.co/settings/tokens> (or use --dry-run to see what would be uploaded)")
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                                   ignore_patterns=HIDDEN,  # as listed by `files`
                                   commit_message="Upload refusal-direction export (weights, GGUF, model card)")
    except Exception as error:  # any hub failure becomes one message, with the token masked
        raise UploadError(mask(f"upload to {repo} failed: {type(error).__name__}: {error}", token),
                          "check that HF_TOKEN has write access to this namespace, and the network") from None
    return str(getattr(commit, "commit_url", None) or commit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="hub model repository id, owner/name")
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help=f"folder to upload ({DEFAULT_FOLDER})")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            dry_run(args.repo, args.folder, args.private)
        else:
            print(f"uploaded: {upload(args.repo, args.folder, args.private)}")
    except UploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except PipelineError as error:
        print(f"error: {mask(str(error), os.environ.get('HF_TOKEN'))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
