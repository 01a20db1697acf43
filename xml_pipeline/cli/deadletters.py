"""``python -m xml_pipeline deadletters organism.yaml list|replay|purge``.

Dead letters live in the organism's backend; this works on the persistent ones
(``manager://``, ``redis://``, ``rediss://``, ``unix://``), whose dead letters outlive
the pump that wrote them. It joins the store as any other process does
(:func:`~xml_pipeline.backends.client_url`), never serving it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

import anyio

from ..backends import (
    SCHEMES,
    Backend,
    DeadLetter,
    backend_scheme,
    client_url,
    open_backend,
    redact_url,
)
from ..config import Organism
from ..exceptions import BackendUnavailable, ConfigError
from ..pump import StreamPump, unanswered_conversations
from ..reply import Reply, Unanswered
from ._common import _LOG_LEVELS, EXIT_OK, EXIT_USAGE, _add_log_format, _error, _positive

__all__ = [
    "add_parser",
    "joining_organism",
    "list_letters",
    "main",
    "purge_letters",
    "replay_letter",
    "replay_letters",
    "replay_unanswered",
]


# -- the command ---------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Add the ``deadletters`` subcommand to the subparsers ``sub`` of the command line."""
    dead = sub.add_parser(
        "deadletters",
        help="list, replay or purge the dead letters of a shared backend; list or replay "
        "what a crashed pump left unanswered",
        description="Dead letters of the organism's backend (manager:// or redis://).",
    )
    dead.add_argument("organism", type=Path, help="the organism YAML file")
    dead.add_argument(
        "action",
        choices=("list", "replay", "purge", "unanswered", "replay-unanswered"),
        help="unanswered: the accepted conversations with no answer (what a pump that "
        "crashed left); replay-unanswered: feed their input again",
    )
    dead.add_argument("--backend", metavar="URL", help="override the organism's backend URL")
    dead.add_argument(
        "--id",
        dest="ids",
        action="append",
        default=[],
        metavar="ID",
        help="only this dead letter, or conversation for replay-unanswered "
        "(repeatable); default: all",
    )
    dead.add_argument(
        "--older-than",
        type=float,
        default=0.0,
        metavar="S",
        help="unanswered, replay-unanswered: only conversations accepted at least S "
        "seconds ago (replay-unanswered needs it, or --id)",
    )
    dead.add_argument("--again", action="store_true",
                      help="replay-unanswered: also conversations fed back before")  # fmt: skip
    dead.add_argument("--json", action="store_true", help="list: one JSON object per line")
    dead.add_argument("--limit", type=_positive, metavar="N", help="list: at most N")
    dead.add_argument("--log-level", default="WARNING", type=str.upper, choices=_LOG_LEVELS)
    _add_log_format(dead)


def main(organism: Organism, args: argparse.Namespace) -> int:
    """Run the ``deadletters`` action of the parsed arguments. Returns the exit status."""
    try:
        # Join the store as any other process does; never serve one here.
        organism = joining_organism(organism)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    with asyncio.Runner() as runner:
        return runner.run(_main_async(organism, args))


async def _main_async(organism: Organism, args: argparse.Namespace) -> int:
    if args.action in ("unanswered", "replay-unanswered"):
        return await _unanswered(organism, args)
    if args.action == "replay":
        accepted, refused = await replay_letters(
            organism, args.ids, timeout_s=organism.settings.drain_timeout_s
        )
        print(f"replayed {accepted} dead letter(s); {refused} refused again", file=sys.stderr)
        return EXIT_OK
    backend = open_backend(organism.backend, organism.history, **organism.backend_options)
    try:
        await backend.ping()
        if args.action == "list":
            await list_letters(backend, sys.stdout, as_json=args.json, limit=args.limit)
            sys.stdout.flush()
        else:
            count = await purge_letters(backend, args.ids)
            print(f"purged {count} dead letter(s)", file=sys.stderr)
    finally:
        await backend.aclose()
    return EXIT_OK


async def _unanswered(organism: Organism, args: argparse.Namespace) -> int:
    if args.action == "unanswered":
        backend = open_backend(organism.backend, organism.history, **organism.backend_options)
        try:
            await backend.ping()
            found = await unanswered_conversations(backend, older_than_s=args.older_than)
        finally:
            await backend.aclose()
        for u in _select_threads(found, args.ids):
            if args.json:
                print(json.dumps(dataclasses.asdict(u), ensure_ascii=False))
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(u.timestamp))
            again = "  (replayed)" if u.replayed else ""
            print(f"{u.thread_id}  {when}  {u.sender:<15} {u.to or '-':<15} "
                  f"{u.message_id}  {u.payload}{again}")  # fmt: skip
        sys.stdout.flush()
        return EXIT_OK
    if args.older_than <= 0 and not args.ids:
        # A conversation a running pump is still working on is unanswered too: feeding
        # it again would run it twice. The operator says what counts as abandoned.
        _error(
            "replay-unanswered needs --older-than S (a conversation accepted at least S "
            "seconds ago, longer than any of your handlers runs, counts as abandoned) or "
            "--id THREAD"
        )
        return EXIT_USAGE
    fed, skipped = await replay_unanswered(
        organism, args.ids, older_than_s=args.older_than, again=args.again,
        timeout_s=organism.settings.drain_timeout_s,
    )  # fmt: skip
    print(f"replayed {fed} unanswered conversation(s); {skipped} skipped (answered, or "
          "replayed before: --again)", file=sys.stderr)  # fmt: skip
    return EXIT_OK


# -- the actions ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _replaying_pump(organism: Organism, timeout_s: float) -> AsyncIterator[StreamPump]:
    """The organism's pump joined to its store (:func:`joining_organism`), writing every
    reply to stdout, one per line; drained (at most ``timeout_s``) when the block ends.

    Raises:
        ConfigError: as :func:`joining_organism`.
    """
    out = sys.stdout.buffer

    def egress(reply: Reply) -> None:
        out.write(reply.to_xml() + b"\n")
        out.flush()

    async with StreamPump(joining_organism(organism), egress=egress) as pump:
        yield pump
        if not await pump.drain(timeout_s):
            print("xml_pipeline: warning: replay did not finish within the drain timeout",
                  file=sys.stderr)  # fmt: skip


def _select_threads(found: list[Unanswered], ids: Sequence[str]) -> list[Unanswered]:
    return found if not ids else [u for u in found if u.thread_id in set(ids)]


async def replay_unanswered(
    organism: Organism,
    ids: Sequence[str],
    *,
    older_than_s: float = 0.0,
    again: bool = False,
    timeout_s: float,
) -> tuple[int, int]:
    """Feed the input of unanswered conversations again, each into its own conversation
    (:meth:`~xml_pipeline.StreamPump.replay_conversation`); replies go to stdout.

    Returns:
        (fed back, skipped: answered meanwhile, or claimed by an earlier replay)

    Raises:
        ConfigError: as :func:`joining_organism`.
    """
    fed = skipped = 0
    async with _replaying_pump(organism, timeout_s) as pump:
        found = _select_threads(await pump.unanswered(older_than_s=older_than_s), ids)
        for u in found:
            if await pump.replay_conversation(u.thread_id, again=again):
                fed += 1
            else:
                skipped += 1
    return fed, skipped


def joining_organism(organism: Organism) -> Organism:
    """The organism with its backend replaced by how another process joins the store.

    A file that serves its own ``manager://`` store at a fixed address joins the
    store a running pump serves there; ``list``, ``purge`` and ``replay`` all work on
    the result, and none of them serves a store of its own.

    Raises:
        ConfigError: one line: the backend keeps no dead letters between runs
            (``memory://``), or it is served at a port only the serving pump knows.
    """
    url = organism.backend
    try:
        scheme = backend_scheme(url)
        if not scheme.persistent:
            kept = ", ".join(f"{s.name}://" for s in SCHEMES.values() if s.persistent)
            raise ConfigError(
                f"{redact_url(url)} keeps no dead letters between runs; deadletters needs "
                f"a backend that does ({kept})"
            )
        joined, options = client_url(url, organism.backend_options)
    except BackendUnavailable as exc:
        raise ConfigError(str(exc)) from exc
    return dataclasses.replace(organism, backend=joined, backend_options=options)


def _select(letters: list[DeadLetter], ids: Sequence[str]) -> list[DeadLetter]:
    if not ids:
        return letters
    wanted = set(ids)
    return [letter for letter in letters if letter.id in wanted]


def _as_json(letter: DeadLetter) -> str:
    return json.dumps(
        {
            "id": letter.id,
            "time": letter.timestamp,
            "code": letter.code,
            "reason": letter.reason,
            "listener": letter.listener,
            "thread": letter.thread_id,
            "message": letter.message_id,
            "data": letter.data.decode("utf-8", "replace"),
            "stage": letter.stage,
            "sender": letter.sender,
            "to": letter.to,
            "re": letter.re,
            "attempts": letter.attempts,
            "last_error": letter.last_error,
        },
        ensure_ascii=False,
    )


async def list_letters(backend: Backend, out: IO[str], *, as_json: bool, limit: int | None) -> int:
    """Print dead letters, oldest first; return how many."""
    letters = await backend.deadletter_list(limit)
    for letter in letters:
        if as_json:
            print(_as_json(letter), file=out)
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.timestamp))
        reason = letter.reason.replace("\n", " ")[:120]
        print(f"{letter.id}  {when}  {letter.code:<15} {letter.listener or '-':<20} {reason}",
              file=out)  # fmt: skip
    return len(letters)


async def purge_letters(backend: Backend, ids: Sequence[str]) -> int:
    """Delete the given dead letters (all if none given); return how many went."""
    if not ids:
        return await backend.deadletter_purge()
    deleted = 0
    for letter_id in ids:
        deleted += await backend.deadletter_delete(letter_id)
    return deleted


async def replay_letters(
    organism: Organism, ids: Sequence[str], *, timeout_s: float
) -> tuple[int, int]:
    """Feed dead letters back to the organism; replies go to stdout, one per line.

    Each goes back where it failed (:meth:`~xml_pipeline.StreamPump.replay`): a failed
    delivery continues its conversation in its frame, a reply that could not be
    written is written again, refused input is fed in as from its first sender. Each
    letter is claimed before it is fed back, by deleting it (atomic on every backend):
    of replays running at once, exactly one feeds it. One refused again is replaced by
    the dead letter of its new refusal (which keeps the first code and reason and
    counts the attempts); one that could not be fed back for another reason (the
    backend down, the pump stopping) is written back.

    The pump joins the organism's store (see :func:`joining_organism`): it never
    serves one of its own.

    Returns:
        (replayed and accepted, refused again)

    Raises:
        ConfigError: as :func:`joining_organism`.
    """
    accepted = refused = 0
    async with _replaying_pump(organism, timeout_s) as pump:
        letters = _select(await pump.backend.deadletter_list(), ids)
        for letter in letters:
            fed = await replay_letter(pump, letter)
            if fed is None:
                continue  # claimed by another replay (or purged) meanwhile
            if fed:
                accepted += 1
            else:
                refused += 1
    return accepted, refused


async def replay_letter(pump: StreamPump, letter: DeadLetter) -> bool | None:
    """Claim ``letter`` and feed it back through ``pump``: the one replay step that
    ``deadletters replay`` and the dashboard share.

    The letter is claimed by deleting it from the pump's backend (atomic on every
    backend: of replays running at once, exactly one feeds it), then fed back
    (:meth:`~xml_pipeline.StreamPump.replay`). One refused again is replaced by the dead
    letter of its new refusal (which keeps the first code and reason and counts the
    attempts); one that could not be fed back (the backend down, the pump stopping,
    the caller cancelled) is written back under its own id.

    Returns:
        True if it was fed back and accepted, False if it was refused again, None if
        it was not there to claim (replayed or purged by someone else).
    """
    if not await pump.backend.deadletter_delete(letter.id):
        return None
    try:
        return await pump.replay(letter)
    except BaseException:
        # Not fed back: the letter goes back (under its own id).
        with anyio.CancelScope(shield=True):
            await pump.backend.deadletter_add(letter)
        raise
