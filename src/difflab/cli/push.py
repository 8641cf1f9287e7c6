"""difflab push: upload a model, a run's model, a LoRA or an exported Space to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "push", help="upload a model, a run's model, a LoRA or an exported Space to the Hugging Face Hub",
        description="Upload a model folder (with its model card), a run folder (its model/ and the sample grid "
                    "its card shows), a LoRA folder, or with --space a folder written by 'difflab demo --export', "
                    "to a repo on the Hugging Face Hub, created if needed. Prints the repo's URL. Uses the token "
                    "of 'hf auth login', or HF_TOKEN.",
    )
    p.add_argument("--model", required=True, type=Path, metavar="FOLDER",
                   help="run folder, model folder, LoRA folder, or (with --space) an exported Space folder")
    p.add_argument("--repo-id", required=True, metavar="USER/NAME",
                   help="the repo on the Hub: your user name or an organisation, and a name")
    p.add_argument("--space", action="store_true", help="push an exported Space (difflab demo --export) as a Space")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing public repo is refused, never uploaded to)")
    p.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if missing; default main)")
    p.add_argument("--commit-message", metavar="TEXT",
                   help="the commit's message (default: 'Upload … with difflab push')")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be uploaded (each file and its path in the repo, the card's metadata) "
                        "and stop: no token or network needed")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    import logging

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from difflab.errors import ConfigError
    from difflab.storage.hub import hub_token, push, upload_plan

    log = logging.getLogger("difflab")
    try:
        validate_repo_id(args.repo_id)
    except HFValidationError:
        raise ConfigError(f"--repo-id {args.repo_id!r} is not a Hub repo id: give USER/NAME (letters, digits, "
                          "'-', '_' and '.')") from None
    if args.revision is not None and not args.revision.strip():
        raise ConfigError("--revision must name a branch")
    plan = upload_plan(args.model, "space" if args.space else "model", repo_id=args.repo_id)
    for note in plan.notes:
        log.warning("%s", note)
    size = plan.total_bytes() / 1e6
    if args.dry_run:
        print(f"{plan.kind} {plan.folder} -> {plan.repo_type} repo {args.repo_id}: {len(plan.files)} files, "
              f"{size:.1f} MB")
        for local, path in plan.files:
            print(f"  {path}  <-  {local}" + ("  (card, as uploaded below)" if path == "README.md" else ""))
        print("card metadata: " + json.dumps(plan.metadata, ensure_ascii=False))
        return 0
    token = hub_token()
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    log.info("uploading %s (%d files, %.1f MB) to the %s repo %s", plan.folder, len(plan.files), size,
             plan.repo_type, args.repo_id)
    url = push(plan, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
               token=token)
    print(url)
    return 0
