"""The persistent Optuna study behind ``fers tune``: storage, the search-space guard, resume bookkeeping.

Ray-free. The study is the source of truth: a new ``fers tune`` with the same storage and study name
(after a crash, or as a new job submission) keeps every finished trial, marks trials left RUNNING by a
dead run as FAILED (``stop_reason=interrupted``) and only runs the trials still missing. One study is
driven by one ``fers tune`` at a time (Ray Tune does the parallelism inside it).

Storage (``tune.storage`` / ``--storage``): ``sqlite:///path/study.db``, a JournalStorage file
``path/study.log`` (safe on NFS), or any RDB URL (``postgresql://…``) reachable from the driver.
``optuna-dashboard <storage>`` and ``optuna.load_study(study_name=…, storage=…)`` read the same study.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from fers_dist.config import Config
from fers_dist.errors import FersError
from fers_dist.tune.search_space import space_signature

ATTR_SPACE, ATTR_PROTOCOL, ATTR_OBJECTIVE = "fers_space", "fers_protocol", "fers_objective"


def default_storage(out: str) -> str:
    if "://" in out:
        raise FersError(f"tune.storage: --out {out!r} is not a local folder, so name a storage "
                        f"(an RDB URL, or a sqlite/journal file on a shared disk) with --storage")
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def open_storage(url: str):
    """An Optuna storage OBJECT (OptunaSearch needs one, not a URL); FersError if it cannot be opened."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        if url.endswith(".log") and "://" not in url:
            path = Path(url).expanduser()
            if not path.parent.is_dir():
                raise OSError(f"folder {path.parent} does not exist")
            storage = JournalStorage(JournalFileBackend(str(path)))
        elif "://" in url:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = RDBStorage(url)
        else:
            raise FersError(f"tune.storage {url!r}: expected sqlite:///FILE.db, a FILE.log journal, or an "
                            f"RDB URL such as postgresql://user@host/db")
        storage.get_all_studies()  # a real round trip
    except FersError:
        raise
    except Exception as e:  # noqa: BLE001  (any failure here is reported as the one-line error below)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FersError(f"tune.storage {url!r}: cannot be opened ({type(e).__name__}: {first})") from None
    return storage


def protocol(cfg: Config, epochs: int) -> str:
    """What makes two trials comparable: data, fold, inner folds, epochs, and the config outside the space."""
    base = cfg.result_fields(mode="json")
    for key in cfg.tune.space:
        section, leaf = key.split(".")
        base[section].pop(leaf, None)
    t = cfg.tune
    return json.dumps({"dataset": t.dataset, "variant": t.variant, "outer_fold": t.outer_fold,
                       "inner_folds": t.inner_folds, "epochs": epochs,
                       "base": hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:12]},
                      sort_keys=True)


def _diff(old: str | None, new: str) -> str:
    if old is None:
        return "none recorded"
    try:
        a, b = json.loads(old), json.loads(new)
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return ", ".join(keys) or "formatting"
    except ValueError:
        return "unreadable"


def open_study(storage, name: str, cfg: Config, epochs: int, directions: list[str], force: bool = False,
               log=print):
    """Create the study or load it, refusing a study whose space/protocol differ unless ``force``.

    Nothing is written to an existing study before the checks pass, so a refused run never changes it.
    """
    import optuna

    new = {ATTR_SPACE: space_signature(cfg.tune.space), ATTR_PROTOCOL: protocol(cfg, epochs),
           ATTR_OBJECTIVE: cfg.tune.objective}
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        attrs = existing.user_attrs
        old_dirs = [d.name.lower() for d in existing.directions]
        if old_dirs != directions or attrs.get(ATTR_OBJECTIVE, cfg.tune.objective) != cfg.tune.objective:
            raise FersError(f"tune.objective: study {name!r} was created for objective "
                            f"{attrs.get(ATTR_OBJECTIVE, '?')!r} ({', '.join(old_dirs)}); it cannot change to "
                            f"{cfg.tune.objective!r}: use another --study")
        changed = {k: _diff(attrs.get(k), v) for k, v in new.items() if attrs.get(k) != v and k != ATTR_OBJECTIVE}
        if changed and not force:
            what = "; ".join(f"{'search space' if k == ATTR_SPACE else 'protocol'} differs ({d})"
                             for k, d in changed.items())
            raise FersError(f"tune.study {name!r}: the stored study has a different setup: {what}. Use another "
                            f"--study, or --force to continue this study with the new setup")
        if changed:
            history = list(attrs.get("fers_setup_history", []))
            history.append({"at": _now(), **{k: attrs.get(k) for k in changed}})
            existing.set_user_attr("fers_setup_history", history)
            log(f"tune: --force: study {name!r} continues with a changed {', '.join(changed)}")
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    for k, v in new.items():
        if study.user_attrs.get(k) != v:
            study.set_user_attr(k, v)
    study.set_user_attr("fers_notes", "stop_reason user attr: completed | asha (told PRUNED) | interrupted | "
                                      "error | invalid_config (FAILED, no Ray trial run)")
    return study


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fail_interrupted(study) -> int:
    """Trials a dead run left RUNNING become FAILED with ``stop_reason=interrupted``; returns how many."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_user_attr(t._trial_id, "stop_reason", "interrupted")
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def counted(study) -> int:
    """Trials that count toward ``--trials``: completed, or stopped by ASHA (PRUNED)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def enqueue_baseline(study, point: dict) -> bool:
    """Enqueue the config's own values (the paper's, by default) unless the study already has them."""
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING, TrialState.RUNNING)
    if any(t.user_attrs.get("baseline") or t.params == point for t in study.get_trials(states=live)):
        return False
    study.enqueue_trial(point, user_attrs={"baseline": True})
    return True


def record_run(study, entry: dict) -> int:
    """Append one ``fers tune`` invocation to the study's run log; returns its 1-based index."""
    runs = list(study.user_attrs.get("fers_runs", []))
    runs.append({"at": _now(), **entry})
    study.set_user_attr("fers_runs", runs)
    return len(runs)
