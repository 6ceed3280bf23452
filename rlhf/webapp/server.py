"""`rlhf serve` and `rlhf annotators`: run the app under uvicorn, and manage who may sign in."""

from __future__ import annotations

from sqlalchemy import select

from rlhf.config import ServeConfig
from rlhf.store.library import AnnotatorRow, Library


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from rlhf.webapp.app import create_app
    from rlhf.webapp.side_by_side import load_eval_folder

    library = Library(cfg.library)
    new_tasks = library.sync_rank_tasks()
    if cfg.compare:
        name, n, new = load_eval_folder(library, cfg.compare, cfg.compare_name)
        print(f"serve: side-by-side set {name!r}: {n} pairs from {cfg.compare} ({new} new)")
    with library.read() as s:
        people = s.scalars(select(AnnotatorRow.name).where(AnnotatorRow.kind == "human")).all()
    print(
        f"serve: {cfg.library}: {new_tasks} new ranking tasks; each task goes to {cfg.overlap} evaluators; "
        f"{len(people)} evaluators can sign in"
    )
    if not people:
        print(f"serve: nobody can sign in yet: rlhf annotators add NAME --admin --library {cfg.library}")
    print(f"serve: listening on http://{cfg.host}:{cfg.port} (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(cfg, library), host=cfg.host, port=cfg.port, log_level="warning", server_header=False)


def annotators(args) -> None:
    """`rlhf annotators add NAME [--admin]`, `token NAME`, `list`."""
    from rlhf.webapp.security import add_evaluator, new_token

    library = Library(args.library)
    if args.action == "list":
        with library.read() as s:
            for a in s.scalars(select(AnnotatorRow).order_by(AnnotatorRow.kind, AnnotatorRow.name)):
                print(f"{a.name}\t{a.kind}{' admin' if a.is_admin else ''}")
        return
    if not args.name:
        raise ValueError(f"rlhf annotators {args.action}: give the evaluator's NAME")
    token = add_evaluator(library, args.name, args.admin) if args.action == "add" else new_token(library, args.name)
    role = "admin" if args.admin else "evaluator"
    print(f"{'added ' + role if args.action == 'add' else 'new sign-in token for'} {args.name} in {args.library}")
    print("sign-in link (shown only now; send it to this person alone, it is their password):")
    print(f"  {args.url.rstrip('/')}/signin#token={token}")
