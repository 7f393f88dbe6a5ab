"""Per-user vector store: a directory of per-user edits that users can copy, with the memory
operations long-lived personalisation needs (add, update, forget, decay, compress, list/get).

Layout
------
``index.json``
    the commit point: ``users``, one ``entries[user]`` per user (``file``, ``method``,
    ``model_fingerprint``, ``sites``, evidence ``weight``, ``compressed``), the shared ``basis``
    (after :meth:`VectorStore.compress`) and a ``generation`` counter bumped by every write.
``<user>@<g>.safetensors`` + ``<user>@<g>.json``
    the user's edit as the store wrote it at generation ``g`` (:meth:`UserEdit.save` format, or the
    compressed format of :mod:`repedit.store.compress`). ``@`` never occurs in a user id, so these
    names cannot collide with another user's files.
``<user>.safetensors`` + ``<user>.json``
    the layout ``repedit fit`` wrote before version 0.2 (an index without ``entries``): still read
    as a store, as is; the next write moves it to the layout above. ``repedit fit`` and
    :func:`save_edits` now write through the store.
``_basis@<g>.safetensors`` + ``.json``
    the shared PCA basis of a compressed store (``_`` never starts a user id).
``.lock``
    taken (``fcntl.flock``) by writers only.

Crash safety and concurrency
----------------------------
Files are never modified in place: a write creates new files under new names (each written
atomically: temporary file, fsync, rename), then replaces ``index.json`` atomically — the commit —
and only then deletes the files the new index no longer refers to. A crash before the commit leaves
the old index, whose files are all intact (the new files are orphans that the next write deletes); a
crash after it leaves the new version plus stale files. Readers take no lock: they read the index,
then the files it names; if a writer committed and deleted those files in between, the reader sees
the generation change and retries. Writers serialise on ``.lock``.

Running statistics (update)
---------------------------
A ``caa``/``stylevector`` edit is, per site, the mean over the user's pairs of (personalised −
neutral) activations. The store keeps that mean as the edit's vector and the amount of evidence
behind it as ``weight`` (the number of pairs, decayed). :meth:`VectorStore.update` folds ``n`` new
pairs with mean difference ``m``: ``v ← (γ·W·v + n·m) / (γ·W + n)``, ``W ← γ·W + n``, with decay
``γ`` (1 = none): exactly the fit on all pairs from scratch when ``γ = 1``, and exponential
forgetting of old evidence when ``γ < 1``. The vector is itself the sufficient statistic, so no
extra tensors (and never any text) are stored, and a compressed user stores only coefficients.

Privacy: the store holds vectors and metadata (sites, strengths, pair counts, model fingerprint,
data hashes) only, never a user's texts; :meth:`VectorStore.forget` deletes every file of the user.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

from ..io import USER_ID_PATTERN, InputError, check_user_id, expect, read_json, write_json
from ..model.sites import site_layer
from ..steering.edit import FORMAT as EDIT_FORMAT
from ..steering.edit import UserEdit, check_model
from .compress import (
    COMPRESSED_FORMAT,
    CompressionReport,
    fit_bases,
    load_compressed,
    not_compressible,
    reconstruction_errors,
    steering_effect,
    write_basis,
    write_compressed,
)

INDEX_FORMAT = "repedit.edits_index"
INDEX_VERSION = 2
RUNNING_MEAN_METHODS = ("caa", "stylevector")
_VERSIONED = re.compile(r"(?:" + USER_ID_PATTERN.pattern + r"|_basis)@\d+")
_SUFFIXES = (".json", ".safetensors")
_READ_RETRIES = 8


class UnknownUserError(KeyError):
    """The store has no edit for this user."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "unknown user"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a single writer at a time is then the caller's job
        yield
        return
    with open(directory / ".lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass
class Transaction:
    """One write in progress: a private copy of the index and the new files written so far."""

    directory: Path
    index: dict
    generation: int
    written: list[str] = field(default_factory=list)

    def new_base(self, name: str) -> str:
        """A file base (no suffix) for ``name`` at this generation; remembered for clean-up on failure."""
        base = f"{name}@{self.generation}"
        self.written.append(base)
        return base


def evidence_weight(edit: UserEdit) -> float | None:
    """Number of pairs behind a running-mean edit (``caa``/``stylevector``, ``add`` only), else ``None``."""
    if edit.method not in RUNNING_MEAN_METHODS or not all(e.is_additive for e in edit.edits):
        return None
    n_pairs = edit.provenance.get("n_pairs")
    return float(n_pairs) if isinstance(n_pairs, (int, float)) and n_pairs > 0 else None


def describe(edit: UserEdit, base: str, weight: float | None, compressed: bool = False) -> dict:
    """An index entry for ``edit`` stored under file base ``base``."""
    return {"file": base, "method": edit.method, "model_fingerprint": edit.model_fingerprint, "sites": edit.sites,
            "weight": weight, "compressed": compressed, "in_basis": compressed}


class VectorStore:
    """A directory of per-user edits (layout, crash safety and update rule in the module docstring).

    Args:
        directory: the store's directory; it must hold an ``index.json`` unless ``create=True``
            (then an empty store is made if there is none).
    """

    def __init__(self, directory: str | Path, *, create: bool = False) -> None:
        self.directory = Path(directory)
        if create and not (self.directory / "index.json").is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            with _locked(self.directory):
                if not (self.directory / "index.json").is_file():
                    write_json(self.directory / "index.json", self._finish_index({"users": [], "entries": {}, "basis": None}, 0))
        if not (self.directory / "index.json").is_file():
            raise InputError(f"{self.directory}: not a vector store (no index.json); create one with `repedit fit` or `repedit store add`")
        if self._index().get("format", INDEX_FORMAT) != INDEX_FORMAT:
            raise InputError(f"{self.directory}/index.json: not a repedit store index (field 'format')")

    # ----------------------------------------------------------------- reading (no lock)

    def _index(self) -> dict:
        path = self.directory / "index.json"
        return check_index(read_json(path, dict), path)

    def list_users(self) -> list[str]:
        """User ids in the store, sorted."""
        return sorted(self._index().get("users", []))

    def has(self, user_id: str) -> bool:
        return check_user_id(user_id) in self.list_users()

    def _entry(self, index: dict, user_id: str) -> dict:
        entry = index.get("entries", {}).get(user_id)
        if entry is not None:
            return entry
        # A save_edits (`repedit fit`) user: <id>.json + <id>.safetensors, described from its JSON.
        meta = read_json(self.directory / f"{user_id}.json", dict)
        edits = [e for e in meta.get("edits", []) if isinstance(e, dict)] if isinstance(meta.get("edits"), list) else []
        provenance = meta.get("provenance") if isinstance(meta.get("provenance"), dict) else {}
        n_pairs = provenance.get("n_pairs")
        running = meta.get("method") in RUNNING_MEAN_METHODS and all(e.get("operator") == "add" for e in edits)
        weight = float(n_pairs) if running and isinstance(n_pairs, (int, float)) and n_pairs > 0 else None
        return {"file": user_id, "method": meta.get("method", ""), "model_fingerprint": meta.get("model_fingerprint", ""),
                "sites": list(dict.fromkeys(e.get("site") for e in edits)), "weight": weight, "compressed": False, "in_basis": False}

    def _load(self, index: dict, user_id: str) -> UserEdit:
        base = self.directory / self._entry(index, user_id)["file"]
        meta = read_json(base.with_name(base.name + ".json"), dict)
        if meta.get("format") == COMPRESSED_FORMAT:
            return load_compressed(self.directory, base, meta)
        if meta.get("format") != EDIT_FORMAT:
            raise InputError(f"{base}.json: not a repedit user edit (field 'format')")
        return UserEdit.load(base)

    def get(self, user_id: str, model=None) -> UserEdit:
        """The user's :class:`UserEdit`; with ``model``, checked against it (fingerprint, ``d_model``).

        Raises :class:`UnknownUserError` (a ``KeyError``) when the store has no such user.
        """
        check_user_id(user_id)
        for attempt in range(_READ_RETRIES):
            index = self._index()
            if user_id not in index.get("users", []):
                raise UnknownUserError(f"no steering edit for user {user_id!r} in {self.directory}")
            try:
                edit = self._load(index, user_id)
                break
            except (InputError, FileNotFoundError):
                # A writer may have committed and deleted the files this index named: read again.
                if attempt + 1 == _READ_RETRIES or self._index().get("generation") == index.get("generation"):
                    raise
        if model is not None:
            from ..steering.edit_files import check_magnitudes

            check_model(edit, model)
            check_magnitudes(edit, model, f"{self.directory}/{user_id}")
        return edit

    def entries(self) -> dict[str, dict]:
        """``{user: {file, method, model_fingerprint, sites, weight, compressed}}`` for every user."""
        index = self._index()
        return {user: self._entry(index, user) for user in sorted(index.get("users", []))}

    def weight(self, user_id: str) -> float | None:
        """The evidence weight behind the user's running-mean edit (``None``: not updatable)."""
        if not self.has(user_id):
            raise UnknownUserError(f"no steering edit for user {user_id!r} in {self.directory}")
        return self._entry(self._index(), user_id)["weight"]

    # ----------------------------------------------------------------- writing (locked, atomic)

    def _finish_index(self, index: dict, generation: int) -> dict:
        entries = index.get("entries", {})
        return {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "generation": generation, "users": sorted(entries),
            "entries": entries, "basis": index.get("basis"),
            "methods": sorted({e["method"] for e in entries.values()}),
            "model_fingerprints": sorted({e["model_fingerprint"] for e in entries.values()}),
        }

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Lock, give a :class:`Transaction` to fill, then commit its index and delete unreferenced files.

        On an exception the new files are removed and the store is left exactly as it was.
        """
        with _locked(self.directory):
            old = self._index()
            index = copy.deepcopy(old)
            index["entries"] = {user: self._entry(old, user) for user in old.get("users", [])}
            old_refs = self._referenced(index)
            txn = Transaction(self.directory, index, int(old.get("generation", 0)) + 1)
            try:
                yield txn
                new = self._finish_index(txn.index, txn.generation)
                write_json(self.directory / "index.json", new)  # the commit: an atomic rename
            except BaseException:
                for base in txn.written:
                    for suffix in _SUFFIXES:
                        (self.directory / (base + suffix)).unlink(missing_ok=True)
                raise
            self._collect_garbage(old_refs, new)

    @staticmethod
    def _referenced(index: dict) -> set[str]:
        bases = {entry["file"] for entry in index.get("entries", {}).values()}
        return bases | ({index["basis"]} if index.get("basis") else set())

    def _collect_garbage(self, old_refs: set[str], new: dict) -> None:
        keep = self._referenced(new)
        stale = old_refs - keep
        for path in self.directory.iterdir():
            name = path.name
            base = name[: -len(suffix)] if (suffix := next((s for s in _SUFFIXES if name.endswith(s)), "")) else None
            if base is not None and base not in keep and (base in stale or _VERSIONED.fullmatch(base)):
                path.unlink(missing_ok=True)
            elif name.startswith(".") and name.endswith(".tmp") and ("@" in name or name.startswith(".index.json.")):
                path.unlink(missing_ok=True)  # temporary file of a write that crashed before its rename

    def _write_user(self, txn: Transaction, edit: UserEdit, weight: float | None) -> None:
        check_user_id(edit.user_id)
        base = txn.new_base(edit.user_id)
        edit.save(self.directory / base)
        txn.index["entries"][edit.user_id] = describe(edit, base, weight) | {"in_basis": txn.index["entries"].get(edit.user_id, {}).get("in_basis", False)}

    def put(self, edit: UserEdit, *, replace_existing: bool = False, weight: float | None = None) -> None:
        """Store a ready edit (e.g. an imported GGUF vector). ``weight`` defaults to :func:`evidence_weight`."""
        self.put_many([edit], replace_existing=replace_existing, weights=None if weight is None else [weight])

    def put_many(self, edits: Sequence[UserEdit], *, replace_existing: bool = False, weights: Sequence[float | None] | None = None) -> None:
        """Store several edits in one atomic write (all or none)."""
        ids = [e.user_id for e in edits]
        if len(set(ids)) != len(ids):
            raise InputError(f"several edits for one user: {sorted({i for i in ids if ids.count(i) > 1})}")
        with self.transaction() as txn:
            clash = sorted(e.user_id for e in edits if e.user_id in txn.index["entries"])
            if clash and not replace_existing:
                raise InputError(f"users already in the store: {', '.join(clash)} (use update to fold in new pairs, or replace)")
            for i, edit in enumerate(edits):
                self._write_user(txn, edit, weights[i] if weights is not None else evidence_weight(edit))

    def add(self, model, tokenizer, pairs, *, method: str = "caa", layers: Sequence[int] | None = None, strength: float = 1.0,
            positions: str | int = "all", replace_existing: bool = False, batch_size: int = 8, progress: bool = True) -> dict[str, UserEdit]:
        """Fit one edit per user of ``pairs`` (:func:`repedit.steering.fit_user_edits`) and store them."""
        from ..steering.fit import fit_user_edits

        present = sorted({p.user_id for p in pairs} & set(self.list_users()))
        if present and not replace_existing:
            raise InputError(f"users already in the store: {', '.join(present)} (use update to fold in new pairs, or replace)")
        edits = fit_user_edits(model, tokenizer, pairs, method=method, layers=layers, strength=strength, positions=positions,
                               batch_size=batch_size, progress=progress)
        self.put_many(list(edits.values()), replace_existing=replace_existing)
        return edits

    def update(self, model, tokenizer, pairs, *, decay: float = 1.0, batch_size: int = 8, progress: bool = True) -> dict[str, UserEdit]:
        """Fold new pairs into each user's running mean (rule in the module docstring); returns the new edits.

        Every user of ``pairs`` must be in the store with a ``caa``/``stylevector`` edit fitted on this
        model; ``decay`` ``γ`` in (0, 1] discounts the old evidence first. A compressed user is
        updated from its reconstruction and stored in full again.
        """
        from ..model.loading import model_fingerprint
        from ..steering.fit import fit_user_edits

        if not 0 < decay <= 1:
            raise InputError(f"decay must be in (0, 1], got {decay}")
        users = list(dict.fromkeys(p.user_id for p in pairs))
        if not users:
            raise InputError("no pairs given")
        fingerprint = model_fingerprint(model)
        with self.transaction() as txn:
            missing = [u for u in users if u not in txn.index["entries"]]
            if missing:
                raise InputError(f"users not in the store: {', '.join(missing)} (use add first)")
            current = {u: self._load(txn.index, u) for u in users}
            for user, edit in current.items():
                weight = txn.index["entries"][user]["weight"]
                if weight is None or edit.method not in RUNNING_MEAN_METHODS:
                    raise InputError(f"user {user!r} has a {edit.method or 'ready-made'!r} edit without running statistics: only caa/stylevector "
                                     "edits fitted from pairs can be updated (use add --replace to refit)")
                if edit.model_fingerprint != fingerprint:
                    raise InputError(f"user {user!r}'s edit was fitted on model {edit.model_fingerprint}, not on this one ({fingerprint})")
                if any(not e.site.startswith("resid_post.") for e in edit.edits):
                    raise InputError(f"user {user!r} has edits outside resid_post sites; update refits resid_post layers only")
            groups: dict[tuple, list[str]] = {}
            for user, edit in current.items():
                groups.setdefault((edit.method, tuple(site_layer(e.site) for e in edit.edits)), []).append(user)
            updated: dict[str, UserEdit] = {}
            for (method, layers), members in groups.items():
                fresh = fit_user_edits(model, tokenizer, [p for p in pairs if p.user_id in members], method=method, layers=list(layers),
                                       min_pairs=1, batch_size=batch_size, progress=progress)
                empty = [u for u in members if u not in fresh]
                if empty:
                    raise InputError(f"no usable pairs for {', '.join(empty)} (method {method!r} uses "
                                     f"{'real-history' if method == 'stylevector' else 'self-generated'} pairs)")
                for user in members:
                    old, new = current[user], fresh[user]
                    weight = decay * txn.index["entries"][user]["weight"]
                    n_new = float(new.provenance["n_pairs"])
                    edits = [
                        replace(o, vector=((weight * o.vector.double() + n_new * f.vector.double()) / (weight + n_new)).float())
                        for o, f in zip(old.edits, new.edits)
                    ]
                    provenance = {**old.provenance, "n_pairs": int(old.provenance.get("n_pairs", 0)) + int(n_new),
                                  "updates": int(old.provenance.get("updates", 0)) + 1,
                                  "data_hashes": list(old.provenance.get("data_hashes", [old.provenance.get("data_hash")])) + [new.provenance.get("data_hash")]}
                    updated[user] = replace(old, edits=edits, provenance=provenance)
                    self._write_user(txn, updated[user], weight + n_new)
        return updated

    def decay(self, factor: float, users: Sequence[str] | None = None) -> None:
        """Multiply the evidence weight of ``users`` (default: every updatable user) by ``factor`` in (0, 1]:
        old evidence then counts less against the next :meth:`update`. Vectors are unchanged."""
        if not 0 < factor <= 1:
            raise InputError(f"decay factor must be in (0, 1], got {factor}")
        with self.transaction() as txn:
            entries = txn.index["entries"]
            for user in users if users is not None else list(entries):
                if user not in entries:
                    raise UnknownUserError(f"no steering edit for user {user!r} in {self.directory}")
                if entries[user]["weight"] is not None:
                    entries[user]["weight"] *= factor
                elif users is not None:
                    raise InputError(f"user {user!r} has no running statistics to decay (not a caa/stylevector edit fitted from pairs)")

    def forget(self, user_id: str) -> None:
        """Delete the user completely: every file of theirs and their index entry. If their vector
        contributed to the store's shared basis, the basis is refitted on the remaining compressed
        users, so that it no longer has that vector as one of its directions (see :mod:`repedit.store.compress`)."""
        check_user_id(user_id)
        with self.transaction() as txn:
            entry = txn.index["entries"].pop(user_id, None)
            if entry is None:
                raise UnknownUserError(f"no steering edit for user {user_id!r} in {self.directory}")
            if entry.get("in_basis"):
                self._refit_basis(txn)

    def compress(self, k: int, *, model=None, tokenizer=None, prompts: Sequence[str] | None = None) -> CompressionReport:
        """Share a PCA basis of ``k`` components per site across the users with additive edits and
        keep only their coefficients (:mod:`repedit.store.compress`). With ``model``, ``tokenizer``
        and ``prompts`` the steering effect lost is measured too. Returns a :class:`CompressionReport`."""
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if (model is None) != (prompts is None) or (model is not None and tokenizer is None):
            raise InputError("measuring the steering effect lost needs the model, its tokenizer and prompts together")
        with self.transaction() as txn:
            entries = txn.index["entries"]
            current = {user: self._load(txn.index, user) for user in sorted(entries)}
            skipped = {user: reason for user, edit in current.items() if (reason := not_compressible(edit))}
            edits = {user: edit for user, edit in current.items() if user not in skipped}
            if len(edits) < 2:
                raise InputError(f"compress needs at least 2 users with additive edits; {len(edits)} found (skipped: {skipped or 'none'})")
            fingerprints = sorted({e.model_fingerprint for e in edits.values()})
            if len(fingerprints) > 1:
                raise InputError(f"the users' edits come from several models ({', '.join(fingerprints)}): one basis cannot serve them")

            def files() -> list[str]:
                return [entries[u]["file"] for u in edits] + ([txn.index["basis"]] if txn.index.get("basis") else [])

            before = self._bytes(files())
            sites = self._compress_into(txn, edits, k)
            after = self._bytes(files())
        restored = {user: self.get(user) for user in edits}  # the path serving uses
        effect = steering_effect(model, tokenizer, edits, restored, prompts) if model is not None else None
        return CompressionReport(k, sorted(edits), skipped, sites, reconstruction_errors(edits, restored),
                                 before[0], after[0], before[1], after[1], effect)

    def _compress_into(self, txn: Transaction, edits: dict[str, UserEdit], k: int) -> dict[str, dict]:
        """Fit the bases on ``edits``; write the basis and every user's new files into ``txn``."""
        bases = fit_bases(edits, k)
        entries = txn.index["entries"]
        for entry in entries.values():
            entry["in_basis"] = False  # the old basis is replaced: only users of the new one contribute to it
        basis_name = None
        if bases.tensors:
            basis_name = txn.new_base("_basis")
            write_basis(self.directory, basis_name, bases, k, next(iter(edits.values())).model_fingerprint)
        txn.index["basis"] = basis_name
        for user, edit in edits.items():
            weight = entries[user]["weight"]
            base = txn.new_base(user)
            if bases.coefs[user]:
                write_compressed(self.directory, base, edit, bases.coefs[user], basis_name)
                entries[user] = describe(edit, base, weight, compressed=True)
            else:
                edit.save(self.directory / base)
                entries[user] = describe(edit, base, weight)
        return bases.sites

    def _refit_basis(self, txn: Transaction) -> None:
        """Refit the shared basis on the compressed users still in ``txn`` (after a forget; see
        :mod:`repedit.store.compress`). A lone remaining user gets its reconstructed vector in full."""
        entries = txn.index["entries"]
        if txn.index.get("basis"):
            k = int(read_json(self.directory / f"{txn.index['basis']}.json")["k"])
            remaining = {user: self._load(txn.index, user) for user, entry in entries.items() if entry.get("compressed")}
            if len(remaining) >= 2:
                self._compress_into(txn, remaining, k)
                return
            for user, edit in remaining.items():
                base = txn.new_base(user)
                edit.save(self.directory / base)
                entries[user] = describe(edit, base, entries[user]["weight"])
        for entry in entries.values():
            entry["in_basis"] = False
        txn.index["basis"] = None

    def _bytes(self, bases: Sequence[str]) -> tuple[int, int]:
        """``(tensor bytes, total bytes)`` of file bases."""
        sizes = [file_bytes(self.directory, b) for b in bases]
        return sum(s[0] for s in sizes), sum(s[0] + s[1] for s in sizes)


def check_index(index: dict, path: Path) -> dict:
    """Check the types of every field of a store's ``index.json`` (an :class:`InputError` names the
    field and what was expected); returns ``index``."""

    def field(name: str, value, types):
        return expect(value, types, f"{path}: field {name!r}", path=path, field=name)

    field("format", index.get("format", INDEX_FORMAT), str)
    generation = field("generation", index.get("generation", 0), int)
    if generation < 0:
        raise InputError(f"{path}: field 'generation': expected an integer ≥ 0, got {generation}", path=path, field="generation")
    users = field("users", index.get("users", []), list)
    for i, user in enumerate(users):
        field(f"users[{i}]", user, str)
        try:
            check_user_id(user)
        except InputError as err:
            raise InputError(f"{path}: field 'users[{i}]': {err}", path=path, field=f"users[{i}]") from None
    if len(set(users)) != len(users):
        raise InputError(f"{path}: field 'users': user {next(u for u in users if users.count(u) > 1)!r} is listed twice", path=path, field="users")
    basis = field("basis", index.get("basis"), (str, type(None)))
    if basis is not None and not _VERSIONED.fullmatch(basis):
        raise InputError(f"{path}: field 'basis': expected a file base '_basis@<generation>', got {basis!r}", path=path, field="basis")
    for user, entry in field("entries", index.get("entries", {}), dict).items():
        where = f"entries[{user!r}]"
        field(where, entry, dict)
        name = field(f"{where}.file", entry.get("file"), str)
        if not (_VERSIONED.fullmatch(name) or USER_ID_PATTERN.fullmatch(name)) or name.split("@")[0] != user:
            raise InputError(f"{path}: field '{where}.file': expected '{user}@<generation>', got {name!r}", path=path, field=f"{where}.file")
        for key in ("method", "model_fingerprint"):
            field(f"{where}.{key}", entry.get(key), str)
        for i, site in enumerate(field(f"{where}.sites", entry.get("sites"), list)):
            field(f"{where}.sites[{i}]", site, str)
        weight = field(f"{where}.weight", entry.get("weight"), (float, type(None)))
        if weight is not None and not 0 <= weight < float("inf"):
            raise InputError(f"{path}: field '{where}.weight': expected a finite number ≥ 0 or null, got {weight}", path=path, field=f"{where}.weight")
        for key in ("compressed", "in_basis"):
            field(f"{where}.{key}", entry.get(key, False), bool)
    return index


def save_edits(edits: dict[str, UserEdit], directory: str | Path) -> Path:
    """Write ``edits`` (``{user_id: edit}``) into the vector store at ``directory`` (made if absent) in
    one atomic write, replacing these users' earlier edits; returns the directory.

    User ids must be plain names (letters, digits, ``_ . -``; no path separators)."""
    wrong = [key for key, edit in edits.items() if key != edit.user_id]
    if wrong:
        raise InputError(f"edits keyed by another id than their user_id: {', '.join(map(repr, wrong))}")
    for user_id in edits:
        check_user_id(user_id)
    VectorStore(directory, create=True).put_many(list(edits.values()), replace_existing=True)
    return Path(directory)


def file_bytes(directory: Path, base: str) -> tuple[int, int]:
    """``(safetensors bytes, json bytes)`` of one file base in ``directory``."""
    sizes = [os.path.getsize(directory / (base + s)) if (directory / (base + s)).exists() else 0 for s in (".safetensors", ".json")]
    return sizes[0], sizes[1]


__all__ = ["INDEX_FORMAT", "RUNNING_MEAN_METHODS", "Transaction", "UnknownUserError", "VectorStore", "check_index", "describe", "evidence_weight", "file_bytes", "save_edits"]
