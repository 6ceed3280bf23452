"""The response library in SQL through SQLAlchemy: SQLite by default (a path), any database URL works unchanged.

Tables
- prompts:      id, chat messages, where the prompt came from
- samples:      one response to a prompt: text, the model and round it came from, token count, finish reason;
                `key` makes writing idempotent (re-running a stage never duplicates a sample)
- annotators:   who ranks: a simulated evaluator, an AI judge, a user function, an importer, a person
- rankings:     one annotator's ranking of one task (a prompt's samples): tiers over indices into sample_ids,
                ties, "all bad", rationale, when; unique per (annotator, prompt, task_key)
- gold:         the simulated panel's mean utility of a sample: for evaluation only, never for training
- comparisons:  what `rlhf filter` selected for reward-model training: per task, (better, worse, strength) pairs

The web app (`rlhf serve`) adds
- web_tasks:    a unit of work for people: a prompt's samples of one round to rank, or one side-by-side pair
- assignments:  which evaluator got which task, in which shown order; unique per (evaluator, task)
- side_by_side: one prompt answered by two models (from an `rlhf eval` folder), for blind A/B judgement
- side_by_side_votes: one evaluator's verdict on a pair ("a", "b" or "tie"); unique per (evaluator, pair)
- web_sessions: signed-in browsers (the sha256 of the session cookie, never the cookie itself) and their CSRF token
A person's ranking is an ordinary row of `rankings`, so `rlhf filter` aggregates it with every other label.

Every write is one transaction; on SQLite it begins IMMEDIATE (takes the write lock up front) and waits for a
busy database instead of failing, in WAL mode, so concurrent writers (annotators, the web app) lose nothing.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class PromptRow(Base):
    __tablename__ = "prompts"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    messages: Mapped[list] = mapped_column(JSON)  # [{"role", "content"}, ...] ending with the user's turn
    source: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SampleRow(Base):
    __tablename__ = "samples"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(1024), unique=True)  # idempotency: "r0|MODEL|PROMPT|3", "import|..."
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id"), index=True)
    model: Mapped[str] = mapped_column(String(1024))
    round: Mapped[int] = mapped_column(Integer, default=0, index=True)
    text: Mapped[str] = mapped_column(Text)
    n_tokens: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(16))  # "eos", "length" (cut at max_new_tokens), "imported"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AnnotatorRow(Base):
    __tablename__ = "annotators"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # simulated, judge, function, import, human
    meta: Mapped[dict | None] = mapped_column(JSON)
    token_hash: Mapped[str | None] = mapped_column(String(255))  # people signing in to the web app
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RankingRow(Base):
    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("annotator", "prompt_id", "task_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id"), index=True)
    annotator: Mapped[str] = mapped_column(ForeignKey("annotators.name"), index=True)
    task_key: Mapped[str] = mapped_column(String(1024))  # which set of samples: "r0", "import|FILE|LINE", ...
    sample_ids: Mapped[list] = mapped_column(JSON)  # the ranked samples; tiers index into this list
    tiers: Mapped[list] = mapped_column(JSON)  # best first, ties share a tier
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    rationale: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class GoldRow(Base):
    __tablename__ = "gold"
    sample_id: Mapped[int] = mapped_column(ForeignKey("samples.id"), primary_key=True)
    utility: Mapped[float] = mapped_column(Float)
    panel: Mapped[str] = mapped_column(String(1024))  # the panel config that defines this gold


class ComparisonRow(Base):
    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    selection: Mapped[str] = mapped_column(String(255), index=True)
    prompt_id: Mapped[str] = mapped_column(ForeignKey("prompts.id"), index=True)
    task_key: Mapped[str] = mapped_column(String(1024))
    sample_ids: Mapped[list] = mapped_column(JSON)
    pairs: Mapped[list] = mapped_column(JSON)  # [[better_index, worse_index, strength], ...] into sample_ids
    n_evaluators: Mapped[int] = mapped_column(Integer)


class SideBySideRow(Base):
    __tablename__ = "side_by_side"
    __table_args__ = (UniqueConstraint("set_name", "prompt_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    set_name: Mapped[str] = mapped_column(String(255), index=True)  # which evaluation: "demo/eval"
    prompt_id: Mapped[str] = mapped_column(String(255))
    prompt: Mapped[str] = mapped_column(Text)
    a_label: Mapped[str] = mapped_column(String(1024))  # the models' names: stored, never shown to evaluators
    b_label: Mapped[str] = mapped_column(String(1024))
    a_text: Mapped[str] = mapped_column(Text)
    b_text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VoteRow(Base):
    __tablename__ = "side_by_side_votes"
    __table_args__ = (UniqueConstraint("annotator", "pair_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("side_by_side.id"), index=True)
    annotator: Mapped[str] = mapped_column(ForeignKey("annotators.name"), index=True)
    verdict: Mapped[str] = mapped_column(String(8))  # "a", "b" or "tie": the models, not the sides shown
    rationale: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebTaskRow(Base):
    __tablename__ = "web_tasks"
    __table_args__ = (UniqueConstraint("kind", "prompt_id", "task_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # "rank" or "compare"
    prompt_id: Mapped[str] = mapped_column(String(255))
    task_key: Mapped[str] = mapped_column(String(1024))  # rank: the rankings' task_key ("r0"); compare: set_name
    sample_ids: Mapped[list | None] = mapped_column(JSON)  # rank: sorted; a ranking's tiers index into this list
    pair_id: Mapped[int | None] = mapped_column(ForeignKey("side_by_side.id"))  # compare: the pair
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AssignmentRow(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("annotator", "task_id"),)  # nobody gets the same task twice
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    annotator: Mapped[str] = mapped_column(ForeignKey("annotators.name"), index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("web_tasks.id"), index=True)
    shown: Mapped[list] = mapped_column(JSON)  # the order shown: sample ids (rank), ["b", "a"] (compare)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # None while open


class WebSessionRow(Base):
    __tablename__ = "web_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's value
    annotator: Mapped[str] = mapped_column(ForeignKey("annotators.name"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def database_url(library: str | Path) -> str:
    """A path means SQLite at that path; anything with '://' is a SQLAlchemy URL (postgresql://...)."""
    text = str(library)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser()}"


class Library:
    def __init__(self, library: str | Path):
        self.url = database_url(library)
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(self.url, connect_args={"timeout": 60} if self.is_sqlite else {})
        if self.is_sqlite:
            _sqlite_transactions(self.engine)
        self._write_engine = self.engine.execution_options(sqlite_immediate=True)
        Base.metadata.create_all(self._write_engine)  # IMMEDIATE: two processes may open a new library at once

    @contextlib.contextmanager
    def read(self):
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextlib.contextmanager
    def write(self):
        """One transaction, committed on leaving the block (rolled back on error) before anything is acknowledged."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    # -- prompts and samples -------------------------------------------------------------------------------
    def add_prompts(self, prompts, source: str | None = None) -> int:
        """Insert prompts not yet in the library; a known id with different messages is an error. Returns #new."""
        new = 0
        with self.write() as s:
            existing = {p.id: p.messages for p in s.scalars(select(PromptRow))}
            for p in prompts:
                messages = [dict(m) for m in p.messages]
                if p.id in existing:
                    if existing[p.id] != messages:
                        raise ValueError(
                            f"prompt id {p.id!r} is already in the library with different text; give it another id"
                        )
                    continue
                s.add(PromptRow(id=p.id, messages=messages, source=source))
                existing[p.id] = messages
                new += 1
        return new

    def prompt_messages(self) -> dict[str, list]:
        with self.read() as s:
            return {p.id: p.messages for p in s.scalars(select(PromptRow))}

    def sample_keys(self, prefix: str = "") -> set[str]:
        with self.read() as s:
            return set(s.scalars(select(SampleRow.key).where(SampleRow.key.startswith(prefix, autoescape=True))))

    def samples(self, round: int | None = None) -> list[SampleRow]:
        with self.read() as s:
            q = select(SampleRow).order_by(SampleRow.id)
            if round is not None:
                q = q.where(SampleRow.round == round)
            return list(s.scalars(q))

    def ranking_tasks(self, round: int | None = None) -> list[tuple[str, str, list[SampleRow]]]:
        """(prompt_id, task_key, samples sorted by id) for every prompt and round with at least 2 samples.

        A task is what one ranking covers: a prompt's samples of one round (task_key "r0", "r1", ...). Imported
        comparisons arrive already ranked and are no task."""
        groups: dict[tuple[str, int], list[SampleRow]] = {}
        for sample in self.samples(round):
            if sample.finish_reason != "imported":
                groups.setdefault((sample.prompt_id, sample.round), []).append(sample)
        return [(pid, f"r{r}", samples) for (pid, r), samples in sorted(groups.items()) if len(samples) >= 2]

    # -- annotators, rankings, gold ------------------------------------------------------------------------
    def ensure_annotator(self, session: Session, name: str, kind: str, meta: dict | None = None) -> None:
        if session.get(AnnotatorRow, name) is None:
            session.add(AnnotatorRow(name=name, kind=kind, meta=meta))
            session.flush()

    def ranked_tasks(self, annotator_prefix: str = "") -> set[tuple[str, str, str]]:
        """(annotator, prompt_id, task_key) of every ranking whose annotator name starts with the prefix."""
        with self.read() as s:
            rows = s.execute(select(RankingRow.annotator, RankingRow.prompt_id, RankingRow.task_key))
            return {tuple(r) for r in rows if r[0].startswith(annotator_prefix)}

    def rankings(self) -> list[RankingRow]:
        with self.read() as s:
            return list(s.scalars(select(RankingRow).order_by(RankingRow.id)))

    def gold(self) -> dict[int, float]:
        with self.read() as s:
            return {g.sample_id: g.utility for g in s.scalars(select(GoldRow))}

    def comparisons(self, selection: str = "default") -> list[ComparisonRow]:
        with self.read() as s:
            q = select(ComparisonRow).where(ComparisonRow.selection == selection).order_by(ComparisonRow.id)
            return list(s.scalars(q))

    # -- the web app: tasks for people, side-by-side pairs and votes ----------------------------------------------
    def sync_rank_tasks(self) -> int:
        """Make every ranking task (ranking_tasks) a web task people can be given; returns how many were new."""
        with self.write() as s:
            known = set(s.execute(select(WebTaskRow.prompt_id, WebTaskRow.task_key).where(WebTaskRow.kind == "rank")))
            new = [
                WebTaskRow(kind="rank", prompt_id=pid, task_key=key, sample_ids=[x.id for x in samples])
                for pid, key, samples in self.ranking_tasks()
                if (pid, key) not in known
            ]
            s.add_all(new)
        return len(new)

    def last_sample_id(self) -> int:
        with self.read() as s:
            return s.scalar(select(func.max(SampleRow.id))) or 0

    def add_side_by_side(self, set_name: str, a_label: str, b_label: str, rows: list[dict]) -> int:
        """Pairs {prompt_id, prompt, a, b} of one evaluation as side-by-side tasks; returns how many were new.

        Loading the same set again adds nothing; a prompt whose texts differ from what the set already holds is an
        error (votes on the old texts would otherwise be counted for the new ones)."""
        with self.write() as s:
            known = {
                r.prompt_id: r for r in s.scalars(select(SideBySideRow).where(SideBySideRow.set_name == set_name))
            }
            new = 0
            for row in rows:
                old = known.get(row["prompt_id"])
                if old is not None:
                    if (old.prompt, old.a_text, old.b_text) != (row["prompt"], row["a"], row["b"]):
                        raise ValueError(
                            f"side-by-side set {set_name!r} already holds prompt {row['prompt_id']!r} with other "
                            "texts (the evaluation was run again?); load it under another name (--compare-name)"
                        )
                    continue
                pair = SideBySideRow(
                    set_name=set_name,
                    prompt_id=row["prompt_id"],
                    prompt=row["prompt"],
                    a_label=a_label,
                    b_label=b_label,
                    a_text=row["a"],
                    b_text=row["b"],
                )
                s.add(pair)
                s.flush()
                s.add(WebTaskRow(kind="compare", prompt_id=pair.prompt_id, task_key=set_name, pair_id=pair.id))
                known[pair.prompt_id] = pair
                new += 1
        return new

    def side_by_side_outcomes(self, set_name: str) -> dict[str, list[float]]:
        """{prompt_id: [1 for each vote for B, 0.5 for each tie, 0 for each vote for A]} of one side-by-side set."""
        with self.read() as s:
            rows = s.execute(
                select(SideBySideRow.prompt_id, VoteRow.verdict)
                .join(VoteRow, VoteRow.pair_id == SideBySideRow.id)
                .where(SideBySideRow.set_name == set_name)
                .order_by(VoteRow.id)
            )
            out: dict[str, list[float]] = {}
            for prompt_id, verdict in rows:
                out.setdefault(prompt_id, []).append({"a": 0.0, "tie": 0.5, "b": 1.0}[verdict])
            return out

    def side_by_side_sets(self) -> list[str]:
        with self.read() as s:
            return sorted(set(s.scalars(select(SideBySideRow.set_name))))

    def count(self, table) -> int:
        from sqlalchemy import func

        with self.read() as s:
            return s.scalar(select(func.count()).select_from(table))


def _sqlite_transactions(engine) -> None:
    """WAL + our own BEGIN: pysqlite's implicit transactions would take the write lock only at the first write,
    and a reader that then wants to write can fail at once with 'database is locked' instead of waiting."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged label survives power loss, not only a crash
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN")
