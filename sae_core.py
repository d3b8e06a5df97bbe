"""Code the three HUSAI stages share.

Part 1, plumbing: one-line errors for the command lines, device choice, seeding, safetensors files
that carry a format name, a version and JSON metadata, and RunOutput: one run's files, written beside
their folder under an exclusive lock and moved into place together, or not at all.
Part 2, measurement: the orthonormal Fourier basis on Z_p, Fourier purity, and FVU. Each metric is
one function here, used by every stage.
Part 3, the sparse autoencoders: architectures, training tricks and the batched-seed trainer.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import Field, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable, NamedTuple
from urllib.parse import quote

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

import kernels

# --------------------------------------------------------------------------------------------------
# Part 1: plumbing


class HusaiError(Exception):
    """A problem with the user's input or files. Command lines print it as one line and exit 2."""
    exit_status = 2


class WriteError(HusaiError):
    """An OS error (disk full, no permission) while writing a run's files: one line, exit status 1."""
    exit_status = 1


def run_cli(main: Callable[[], None], unit_outputs: bool = False) -> None:
    """Run a stage's main() so that every failure a user can cause ends in one line on stderr, never a
    traceback: HusaiError -> its message and its exit_status (2, or 1 for WriteError); any other OSError
    -> the file and the system's reason, exit 1; Ctrl-C -> what became of the outputs, exit 130.

    unit_outputs: the stage writes every file through RunOutput, so an interruption before its commit
    changes nothing on disk (stages that do not yet do so get a more guarded message)."""
    try:
        main()
    except HusaiError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(e.exit_status)
    except OSError as e:
        print(f"error: {one_line(describe_os_error(e))}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: {interruption_report(unit_outputs)}", file=sys.stderr)
        sys.exit(130)


def one_line(text: str) -> str:
    return " ".join(text.split("\n"))


def describe_os_error(e: OSError) -> str:
    """'<file>: <the system's reason>', e.g. 'runs/m.safetensors: No space left on device'."""
    reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename else reason


def interruption_report(unit_outputs: bool) -> str:
    """One true sentence about what a Ctrl-C left on disk, from the state of this process's runs."""
    if ENTERED_RUNS:
        return ENTERED_RUNS[-1].describe_state()
    if unit_outputs:
        return "stopped before any output was written"
    return ("each file already written is whole, but this stage does not yet write its outputs as one unit: "
            "its output folder may hold files of this run beside files of an earlier one")


class CliParser(argparse.ArgumentParser):
    """argparse with defaults shown in --help and its own errors reduced to one line."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def pick_device(name: str) -> torch.device:
    """'auto' picks the GPU when there is one; 'cuda' without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HusaiError("--device cuda: no CUDA GPU is visible to torch; use --device cpu (or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def memory_limit_bytes() -> int:
    """The memory this process may use: the machine's RAM, or a smaller cgroup limit (a container's)."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for cgroup_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(cgroup_file).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            limit = min(limit, int(value))
    return limit


def check_memory(need: int, device: torch.device, sizes: str, advice: str) -> None:
    """Refuse, before anything is allocated, a run whose memory estimate `need` (bytes) exceeds this
    machine's memory (or the GPU's): one line naming the sizes, the estimate and what to shrink."""
    limits = {"memory": memory_limit_bytes()}
    if device.type == "cuda":
        limits["GPU memory"] = torch.cuda.get_device_properties(device).total_memory
    for what, have in limits.items():
        if need > have:
            raise HusaiError(f"{sizes} needs about {need / 2**30:.3g} GiB of {what}; this machine has "
                             f"{have / 2**30:.3g} GiB: {advice}")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside `path`, then rename it over `path` in one step, so a
    reader never sees a half-written file. On an OS error the temporary file is removed and the error
    names `path` (not the temporary file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)     # mkstemp makes files private (0600); outputs are ordinary files
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_durably(path: str | Path, value) -> None:
    """Replace `path` atomically with `value` as JSON, flushed to the disk before the rename, so that a
    crash leaves the old file or the complete new one (commit journals and manifests rely on this)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)
    folder = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], fmt: str, version: int,
                 metadata: dict) -> None:
    """Write a safetensors file atomically. Metadata values are stored as JSON strings, next to
    `format` and `version`, so that readers can check what they are given. The bytes are built in
    memory and written by Python, so a full disk is an OSError naming `path`."""
    header = {"format": fmt, "version": str(version)}
    header.update({key: json.dumps(value, sort_keys=True) for key, value in metadata.items()})
    tensors = {name: t.detach().contiguous().cpu().clone() for name, t in tensors.items()}
    data = with_sorted_metadata(safetensors_bytes(tensors, metadata=header))
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def with_sorted_metadata(data: bytes) -> bytes:
    """The same safetensors bytes with the header's metadata keys in sorted order. The library keeps the
    metadata in a hash map whose order changes from process to process, so without this the same tensors
    and metadata give different files. Layout: 8 bytes little-endian header length n, n bytes of JSON
    padded with spaces to a multiple of 8, then the tensor data (offsets relative to its start)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}) | header
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def load_tensors(path: str | Path, fmt: str, version: int, required: tuple[str, ...] = (),
                 hint: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by save_tensors and check its format, version and required tensors.
    Every problem is a HusaiError that names the file. Returns (tensors, metadata decoded from JSON)."""
    path = Path(path)
    if not path.is_file():
        raise HusaiError(f"{path}: no such file" + (f"; create it with `{hint}`" if hint else ""))
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            raw = json.loads(f.read(header_len)).get("__metadata__", {})
    except (SafetensorError, OSError, ValueError) as e:
        raise HusaiError(f"{path}: not a readable safetensors file (truncated or corrupt: {e})")
    if raw.get("format") != fmt:
        raise HusaiError(f"{path}: format is {raw.get('format')!r}, expected {fmt!r}")
    if raw.get("version") != str(version):
        raise HusaiError(f"{path}: {fmt} version {raw.get('version')!r}, this code reads version {version}")
    missing = [name for name in required if name not in tensors]
    if missing:
        raise HusaiError(f"{path}: missing tensor(s) {', '.join(missing)}")
    metadata = {}
    for key, value in raw.items():
        if key in ("format", "version"):
            continue
        try:
            metadata[key] = json.loads(value)
        except ValueError as e:
            raise HusaiError(f"{path}: metadata {key!r} is not valid JSON ({e})")
    return tensors, metadata


def read_acts_file(path: str | Path) -> torch.Tensor:
    """An [N, d] float tensor from a safetensors file holding one tensor (or one named `acts`): the
    activations of any model, for train_sae.py --acts and for analyze.py."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise HusaiError(f"--acts {path}: no such file")
    except (SafetensorError, OSError, ValueError) as e:
        raise HusaiError(f"--acts {path}: not a readable safetensors file ({e})")
    if len(tensors) != 1 and "acts" not in tensors:
        raise HusaiError(f"--acts {path}: holds {len(tensors)} tensors ({', '.join(tensors)}); name one `acts`")
    acts = tensors["acts"] if "acts" in tensors else next(iter(tensors.values()))
    if acts.ndim != 2 or not acts.is_floating_point():
        raise HusaiError(f"--acts {path}: need a 2-D float tensor [N, d], got {acts.dtype} {list(acts.shape)}")
    if acts.shape[0] < 2 or acts.shape[1] < 1:
        raise HusaiError(f"--acts {path}: the tensor is empty ({list(acts.shape)}); need at least 2 rows")
    if not torch.isfinite(acts).all():
        raise HusaiError(f"--acts {path}: contains NaN or Inf values")
    return acts.float()


MAX_ROW_NORM = 1e18   # a row's norm above this, or a spread below its inverse, is outside float32's safe range


def check_activations(acts: torch.Tensor, what: str) -> None:
    """Refuse activations [N, d] an SAE cannot be trained on in float32, saying why (before any training,
    so that the failure is not later blamed on the learning rate): no variance at all (every row the
    same: nothing to learn, FVU undefined); a row whose norm exceeds MAX_ROW_NORM (squared norms, summed
    in the loss and in the normalisation scale, overflow float32's 3.4e38 from a norm of 1.8e19); a
    spread (the root mean square of the centred values) below 1 / MAX_ROW_NORM (squares below float32's
    smallest normal number, 1.2e-38, are flushed to zero). Computed in float64; `what` names the
    activations in the message."""
    x = acts.detach().double()
    largest = float(x.norm(dim=1).max())
    spread = float((x - x.mean(dim=0)).pow(2).mean().sqrt())
    if not math.isfinite(largest):
        raise HusaiError(f"{what}: contain NaN or Inf values")
    if spread == 0:
        raise HusaiError(f"{what}: all {len(x)} rows are the same (zero variance): there is nothing for an SAE "
                         f"to learn")
    if largest > MAX_ROW_NORM:
        raise HusaiError(f"{what}: a row has norm {largest:.3g}, beyond float32's safe range for training (at most "
                         f"{MAX_ROW_NORM:g}, so that squared norms do not overflow); rescale them")
    if spread < 1 / MAX_ROW_NORM:
        raise HusaiError(f"{what}: they vary by only {spread:.3g} (root mean square about their mean), below "
                         f"float32's safe range for training ({1 / MAX_ROW_NORM:g}); rescale them")


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


# --------------------------------------------------------------------------------------------------
# Part 1 (continued): a run is one unit
#
# A run's outputs are a declared set of entries (plain names: files, or folders moved as a whole) in
# one destination folder D. Everything RunOutput needs besides them lives in D/.husai:
#     lock                      flock'ed by the run using D; holds its pid, command and start time
#     runs/<run>.json           manifest: the entries run <run> committed, and its command
#     staging-<run>-<pid>/      where the running run writes its entries (same filesystem as D)
#     journal-<run>.json        commit marker: the renames and removals of a commit in progress
#     trash-<run>-<pid>/        old entries moved aside during a commit, deleted at its end
# Stage 1 is one run per model file (model.safetensors, model.log.jsonl, model.checkpoints/, ...),
# stage 2 one run per invocation's seed set, stage 3 one run whose single entry is the report folder
# (its destination is the report folder's parent).

RUN_DIR = ".husai"
ENTERED_RUNS: list["RunOutput"] = []   # the RunOutputs this process entered, for interruption_report


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


class RunOutput:
    """One run's files in `folder`, written beside it and moved into place together, or not at all.

        with RunOutput(folder, "model", ["model.safetensors", "model.log.jsonl"], force=args.force) as run:
            ...                                              # checks and the lock are done: now the work
            save_tensors(run.path("model.safetensors"), ...)  # written into the staging folder
            run.commit()                                     # every written entry moves into place

    Entering (before any work): creates `folder`, takes its lock (a second run on the same folder is
    refused at once, naming the first: pid, command, start), finishes a commit that a killed run left
    half done, clears stale staging and temporary files, then checks the entries. An entry listed in
    another run's manifest is refused even with `force` (a run never replaces another run's files);
    without `force`, an entry that exists, or an earlier run of the same name, is refused. `advice(manifest)`
    says what to do instead when an entry is another run's (default: choose another `flag`).

    commit(): writes the journal atomically, then renames every written entry into `folder` (a folder
    entry replaces its old version whole), moves aside this run's entries that this commit did not
    write (those its manifest lists and declared entries found in `folder`), writes the manifest and
    deletes the journal and what was moved aside. Afterwards the run's files in `folder` are exactly
    the ones it wrote. Killed before the journal exists: `folder` is unchanged and the next run there
    deletes the staging. Killed after: the next run on `folder` completes the renames first.
    Leaving the block without commit() (an error, Ctrl-C) deletes the staging folder; `folder` is
    unchanged. An OSError raised in the block becomes a WriteError naming the final file."""

    def __init__(self, folder: str | Path, run: str, entries: Iterable[str], force: bool, flag: str = "--out",
                 advice: Callable[[dict], str] | None = None):
        self.folder, self.run, self.force, self.flag = Path(folder), run, force, flag
        self.advice = advice or (lambda other: f"choose another {flag}")
        self.entries = list(entries)
        for entry in self.entries:
            if not entry or "/" in entry or "\0" in entry or entry in (".", "..", RUN_DIR):
                raise HusaiError(f"{flag}: {entry!r} cannot name an output in {self.folder}")
        if not run or len(set(self.entries)) != len(self.entries):
            raise ValueError(f"run {run!r}: needs a name and distinct entries, got {self.entries}")
        token = quote(run, safe="")
        self.meta = self.folder / RUN_DIR
        self.journal_path = self.meta / f"journal-{token}.json"
        self.staging = self.meta / f"staging-{token}-{os.getpid()}"
        self.trash_name = f"trash-{token}-{os.getpid()}"
        self.state = "new"          # new -> open -> committing -> committed, or open -> discarded
        self.lock_fd: int | None = None
        self.last_entry: str | None = None

    # ---- entering: lock, recovery, checks ------------------------------------------------------
    def __enter__(self) -> "RunOutput":
        self.create_folders()
        self.take_lock()
        try:
            self.recover()
            self.check_entries()
            self.staging.mkdir()
        except BaseException as e:
            self.release_lock()
            if isinstance(e, OSError):
                raise WriteError(f"cannot prepare {self.folder} ({describe_os_error(e)}); "
                                 f"choose another {self.flag}") from e
            raise
        self.state = "open"
        ENTERED_RUNS.append(self)
        return self

    def create_folders(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise HusaiError(f"{self.flag}: {self.folder} is a file, not a folder; choose another {self.flag}")
        try:
            (self.meta / "runs").mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.folder, prefix=".husai-probe-")   # renames need D writable
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise HusaiError(f"{self.flag}: cannot write to {self.folder} ({e.strerror or e}); "
                             f"choose another {self.flag}")

    def take_lock(self) -> None:
        """flock the lock file without waiting; record who holds it, for the message of the next."""
        fd = os.open(self.meta / "lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 65536, 0).decode(errors="replace")
            os.close(fd)
            raise HusaiError(f"{self.folder} is in use by another run ({describe_lock_holder(holder)}); "
                             f"wait for it to finish, or choose another {self.flag}")
        self.lock_fd = fd
        holder = {"pid": os.getpid(), "command": command_line(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError as e:
            self.release_lock()
            raise WriteError(f"cannot write {self.meta / 'lock'}: {e.strerror}")

    def release_lock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)          # closing the descriptor releases the flock
            self.lock_fd = None

    def recover(self) -> None:
        """With the lock held, nothing else uses the folder: finish every commit a killed run left
        (its journal exists), then delete staging folders, set-aside entries and temporary files."""
        for journal in sorted(self.meta.glob("journal-*.json")):
            plan = read_json(journal, "commit journal")
            finish_commit(self.folder, plan)
            journal.unlink()
            print(f"note: completed the interrupted commit of run {plan['run']!r} in {self.folder}")
        stale = [*self.meta.glob("staging-*"), *self.meta.glob("trash-*"), *self.meta.glob(".*.tmp"),
                 *(self.meta / "runs").glob(".*.tmp"), *self.folder.glob(".husai-probe-*")]
        for path in stale:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if any(path.name.startswith("staging-") for path in stale):
            print(f"note: deleted the uncommitted files of an interrupted run in {self.folder}")

    def manifests(self) -> dict[str, dict]:
        return {m["run"]: m for m in (read_json(path, "run manifest") for path in (self.meta / "runs").glob("*.json"))}

    def check_entries(self) -> None:
        manifests = self.manifests()
        own = manifests.pop(self.run, None)
        owner = {entry: m for m in manifests.values() for entry in m["entries"]}
        for entry in self.entries:
            if entry in owner:
                raise HusaiError(f"{self.folder / entry} belongs to another run, {owner[entry]['run']!r} "
                                 f"(`{owner[entry]['command']}`); --force replaces only this run's own files: "
                                 f"{self.advice(owner[entry])}")
        if self.force:
            return
        existing = [entry for entry in self.entries if os.path.lexists(self.folder / entry)]
        if existing:
            more = f" (and {len(existing) - 1} more of this run's files)" if len(existing) > 1 else ""
            raise HusaiError(f"{self.folder / existing[0]} already exists{more}; pass --force to replace "
                             f"this run's files, or choose another {self.flag}")
        if own is not None:
            raise HusaiError(f"run {self.run!r} already exists in {self.folder} ({', '.join(own['entries'])}); "
                             f"pass --force to replace it, or choose another {self.flag}")

    # ---- writing ---------------------------------------------------------------------------------
    def path(self, entry: str) -> Path:
        """Where to write `entry` (one of the declared entries) until the commit: in the staging folder.
        A folder entry is created by the caller (path(entry).mkdir())."""
        if self.state != "open":
            raise RuntimeError(f"run {self.run!r} is {self.state}; entries are written between enter and commit")
        if entry not in self.entries:
            raise ValueError(f"{entry!r} is not one of run {self.run!r}'s entries {self.entries}")
        self.last_entry = entry
        return self.staging / entry

    def final_path(self, entry: str) -> Path:
        return self.folder / entry

    def written(self) -> list[str]:
        return [entry for entry in self.entries if os.path.lexists(self.staging / entry)]

    # ---- committing ------------------------------------------------------------------------------
    def commit(self) -> list[Path]:
        """Move every written entry into place as this run (see the class docstring). Returns their
        final paths."""
        if self.state != "open":
            raise RuntimeError(f"run {self.run!r} is {self.state}; it can be committed once, inside its block")
        written = self.written()
        own = self.manifests().get(self.run)
        earlier = set(own["entries"] if own else ()) | {e for e in self.entries if os.path.lexists(self.folder / e)}
        plan = {"run": self.run, "staging": self.staging.name, "trash": self.trash_name, "place": written,
                "remove": sorted(earlier - set(written)),
                "manifest": {"run": self.run, "entries": written, "command": command_line()}}
        try:
            write_json_durably(self.journal_path, plan)
        except OSError as e:
            raise WriteError(f"cannot write {e.filename}: {e.strerror}; run {self.run!r} was not committed "
                             f"and {self.folder} is unchanged") from e
        self.state = "committing"
        try:
            try:
                finish_commit(self.folder, plan)
            except KeyboardInterrupt:       # the renames take milliseconds: finish them, then stop
                finish_commit(self.folder, plan)
                raise
            self.journal_path.unlink()
        except OSError as e:
            raise WriteError(f"moving run {self.run!r} into place in {self.folder} failed "
                             f"({describe_os_error(e)}); the next run on {self.folder} completes it") from e
        self.state = "committed"
        return [self.folder / entry for entry in written]

    # ---- leaving ---------------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            if self.state == "open":
                shutil.rmtree(self.staging, ignore_errors=True)
                self.state = "discarded"
        finally:
            self.release_lock()
        if isinstance(exc, OSError) and self.state == "discarded":
            raise WriteError(f"cannot write {self.name_in_error(exc)}: {exc.strerror or exc}; run {self.run!r} "
                             f"was not committed and {self.folder} is unchanged") from exc
        return False

    def name_in_error(self, exc: OSError) -> Path | str:
        """The final path of the file an OSError was about (the staging folder is an implementation detail)."""
        if exc.filename:
            name = Path(str(exc.filename))
            return self.folder / name.relative_to(self.staging) if name.is_relative_to(self.staging) else name
        return self.folder / self.last_entry if self.last_entry else self.folder

    def describe_state(self) -> str:
        if self.state == "committing":
            return (f"run {self.run!r} was being moved into place in {self.folder}; the next run there "
                    f"completes the move")
        if self.state == "committed":
            return f"run {self.run!r} had already been committed whole to {self.folder}"
        return f"run {self.run!r} was not committed; nothing in {self.folder} was changed"


def finish_commit(folder: Path, plan: dict) -> None:
    """Carry out a commit journal. Idempotent: every step checks whether it was already done, so a run
    holding the lock can repeat a journal that a killed run had partly carried out.

    place: staging/e -> folder/e (os.replace; an old folder, or anything in the way of a folder, is
    first moved to the trash). remove: folder/e -> trash. Then the manifest is written (or deleted if
    the run has no entries left) and the staging and trash folders are deleted."""
    meta = folder / RUN_DIR
    staging, trash = meta / plan["staging"], meta / plan["trash"]
    for entry in plan["place"] + plan["remove"]:
        if not entry or "/" in entry or entry in (".", "..", RUN_DIR):
            raise HusaiError(f"{meta}: a commit journal names {entry!r}, which is not an entry name")

    def move_aside(entry: str) -> None:
        trash.mkdir(exist_ok=True)
        os.rename(folder / entry, trash / entry)

    for entry in plan["place"]:
        source, target = staging / entry, folder / entry
        if not os.path.lexists(source):
            continue                                     # placed before an interruption
        if os.path.lexists(target) and (source.is_dir() or (target.is_dir() and not target.is_symlink())):
            move_aside(entry)
        os.replace(source, target)
    for entry in plan["remove"]:
        if os.path.lexists(folder / entry):
            move_aside(entry)
    manifest = manifest_path(folder, plan["run"])
    if plan["manifest"]["entries"]:
        write_json_durably(manifest, plan["manifest"])
    elif manifest.exists():
        manifest.unlink()
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def manifest_path(folder: Path, run: str) -> Path:
    return folder / RUN_DIR / "runs" / f"{quote(run, safe='')}.json"


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HusaiError(f"{path}: unreadable {what} ({e})")


def describe_lock_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']}, started {holder['started']}: `{holder['command']}`"
    except (ValueError, KeyError, TypeError):
        return "it has not recorded its pid yet"


# --------------------------------------------------------------------------------------------------
# Part 1 (continued): activations streamed from disk
#
# The activation-shard format (any model can write it; write_activation_shards does):
#     DIR/acts-00000.safetensors, DIR/acts-00001.safetensors, ...
#         each holds one 2-D float tensor named `acts` [N_i, d] (float32, float16, bfloat16 or float64); d is the
#         same in every shard, N_i >= 1 may differ
#     DIR/index.json (optional)
#         {"format": "husai.acts_shards", "version": 1, "d": d, "rows": N,
#          "shards": [{"file": "acts-00000.safetensors", "rows": N_0}, ...], "source": {anything}}
# Without an index the shards are DIR's *.safetensors files in name order; with one, the files it lists,
# in its order. One safetensors file (one tensor, or one named `acts`) is a set of one shard. Rows are
# numbered across the shards in that order. Every read is memory-mapped and bounded: it opens a shard,
# copies rows [a, b) out of the mapping and closes it, so no mapped page stays resident and the memory a
# run needs does not grow with the number of rows.

ACTS_SHARDS_FORMAT, ACTS_SHARDS_VERSION = "husai.acts_shards", 1
ACTS_INDEX = "index.json"
SMALL_ACTS_ROWS = 100_000      # a set this small is trained on and evaluated whole, as one tensor in memory
BLOCKS_PER_BUFFER = 4          # a shuffle buffer mixes rows of at least this many blocks
EVAL_CHUNK_ROWS = 16_384       # a larger set is evaluated this many rows at a time
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")   # safetensors' names of the float types a shard may hold


class Shard(NamedTuple):
    path: Path
    tensor: str    # the tensor's name in the file
    start: int     # its first row in the numbering across shards
    rows: int


class ActivationShards:
    """An [N, d] activation set on disk (a folder of shards or one file, the format above), read by row
    range. Opening reads only the headers; every problem is a HusaiError naming the file."""

    def __init__(self, source: str | Path, flag: str = "--acts"):
        self.source, self.flag = Path(source), flag
        self.index = self.read_index()
        self.shards: list[Shard] = []
        start = 0
        for path in self.shard_files():
            name, (rows, d) = self.describe(path)
            if self.shards and d != self.d:
                raise HusaiError(f"{flag} {path}: d = {d}, but {self.shards[0].path} has d = {self.d}; "
                                 f"every shard needs the same d")
            if rows < 1 and self.is_folder:
                raise HusaiError(f"{flag} {path}: the tensor is empty ([{rows}, {d}]); every shard needs a row")
            self.shards.append(Shard(path, name, start, rows))
            self.d, start = d, start + rows
        self.rows = start
        if self.rows < 2:
            raise HusaiError(f"{flag} {self.source}: the tensor is empty ([{self.rows}, {self.d}]); "
                             f"need at least 2 rows")
        if self.index is not None:
            listed = [entry["rows"] for entry in self.index["shards"]]
            if listed != [shard.rows for shard in self.shards]:
                raise HusaiError(f"{flag} {self.source / ACTS_INDEX}: lists {listed} rows per shard, the files hold "
                                 f"{[shard.rows for shard in self.shards]}")

    def read_index(self) -> dict | None:
        path = self.source / ACTS_INDEX
        if not self.source.is_dir() or not path.is_file():
            return None
        index = read_json(path, "activation shard index")
        kind = (index.get("format"), index.get("version")) if isinstance(index, dict) else None
        if kind != (ACTS_SHARDS_FORMAT, ACTS_SHARDS_VERSION):
            raise HusaiError(f"{self.flag} {path}: not a {ACTS_SHARDS_FORMAT!r} version {ACTS_SHARDS_VERSION} index "
                             f"(remove it to read the folder's *.safetensors files in name order)")
        try:
            for entry in index["shards"]:
                if "/" in entry["file"] or entry["file"] in (".", "..") or not isinstance(entry["rows"], int):
                    raise ValueError(f"bad entry {entry}")
        except (KeyError, TypeError, ValueError) as e:
            raise HusaiError(f"{self.flag} {path}: its shard list is malformed ({e})")
        return index

    def shard_files(self) -> list[Path]:
        if self.source.is_file():
            return [self.source]
        if not self.source.is_dir():
            raise HusaiError(f"{self.flag} {self.source}: no such file or folder")
        if self.index is not None:
            files = [self.source / entry["file"] for entry in self.index["shards"]]
            missing = [str(path) for path in files if not path.is_file()]
            if missing:
                raise HusaiError(f"{self.flag} {self.source / ACTS_INDEX} lists {missing[0]}, which does not exist")
        else:
            files = sorted(self.source.glob("*.safetensors"))
        if not files:
            raise HusaiError(f"{self.flag} {self.source}: a folder without .safetensors shards")
        return files

    def describe(self, path: Path) -> tuple[str, list[int]]:
        """(tensor name, [rows, d]) of a shard, from its header alone."""
        try:
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())
                if len(names) != 1 and "acts" not in names:
                    raise HusaiError(f"{self.flag} {path}: holds {len(names)} tensors ({', '.join(names)}); "
                                     f"name one `acts`")
                name = "acts" if "acts" in names else names[0]
                tensor = f.get_slice(name)
                shape, dtype = list(tensor.get_shape()), tensor.get_dtype()
        except (SafetensorError, OSError, ValueError) as e:
            raise HusaiError(f"{self.flag} {path}: not a readable safetensors file ({e})")
        if dtype not in FLOAT_DTYPES or len(shape) != 2:
            raise HusaiError(f"{self.flag} {path}: need a 2-D float tensor [N, d], got {dtype} {shape}")
        if shape[1] < 1:
            raise HusaiError(f"{self.flag} {path}: the tensor is empty ({shape}); need at least one column")
        return name, shape

    @property
    def is_folder(self) -> bool:
        return self.source.is_dir()

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as float32 [stop - start, d], copied out of each shard's memory map."""
        pieces = []
        for shard in self.shards:
            a, b = max(start, shard.start), min(stop, shard.start + shard.rows)
            if a < b:
                pieces.append(self.read_shard(shard, a - shard.start, b - shard.start))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def read_shard(self, shard: Shard, a: int, b: int) -> torch.Tensor:
        try:
            with safe_open(str(shard.path), framework="pt") as f:
                rows = f.get_slice(shard.tensor)[a:b].float()
        except (SafetensorError, OSError, ValueError) as e:
            raise HusaiError(f"{self.flag} {shard.path}: not a readable safetensors file ({e})")
        if not torch.isfinite(rows).all():
            where = f" (rows {a} to {b - 1})" if (a, b) != (0, shard.rows) else ""
            raise HusaiError(f"{self.flag} {shard.path}: contains NaN or Inf values{where}")
        return rows

    def provenance(self) -> dict:
        """What identifies the set: for one file its sha256 (as before shards existed); for a folder the
        sha256 of every shard, and acts_sha256 = sha256 of that list as JSON."""
        if not self.is_folder:
            return {"acts_sha256": file_sha256(self.source)}
        listing = [{"file": shard.path.name, "rows": shard.rows, "sha256": file_sha256(shard.path)}
                   for shard in self.shards]
        digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        return {"acts_sha256": digest, "acts_shards": listing}


def held_out_rows(rows: int, eval_rows: int | None) -> int:
    """How many of `rows` rows are the evaluation slice: all of them when eval_rows is at least `rows`,
    or when it is None and the set is small (<= SMALL_ACTS_ROWS; then training sees every row too);
    otherwise the last eval_rows rows (None: 10% of the set, at most SMALL_ACTS_ROWS), never trained on."""
    if eval_rows is None:
        return rows if rows <= SMALL_ACTS_ROWS else min(rows // 10, SMALL_ACTS_ROWS)
    if eval_rows < 1:
        raise HusaiError(f"--eval-rows {eval_rows}: must be at least 1")
    return min(eval_rows, rows)


def row_blocks(shards: ActivationShards, stop: int, block_rows: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) that cover rows [0, stop) in order, none crossing a shard boundary and none
    longer than block_rows: the units whose order a shuffle buffer permutes."""
    blocks = []
    for shard in shards.shards:
        end = min(stop, shard.start + shard.rows)
        blocks += [(a, min(a + block_rows, end)) for a in range(shard.start, end, block_rows)]
    return blocks


def shuffled_batches(shards: ActivationShards, rows: int, batch_size: int, buffer_rows: int,
                     generator: torch.Generator):
    """An endless stream of batches [batch_size, d] of rows [0, rows), through a shuffle buffer.

    Each epoch permutes the blocks (row_blocks, each at most buffer_rows / BLOCKS_PER_BUFFER rows, so
    shards and the parts of a large file come in a new order), then fills the buffer with blocks in that
    order until it holds buffer_rows rows, permutes its rows and hands them out a batch at a time; the
    few rows that do not fill a last batch stay for the next buffer. Every row of [0, rows) is in exactly
    one batch per epoch, but for fewer than batch_size rows at its end, dropped as batch_order drops
    them. Memory: one buffer (<= buffer_rows + batch_size rows) and one block being read. The order
    depends only on the generator's seed."""
    if not 1 <= batch_size <= rows:
        raise ValueError(f"batch size {batch_size}: needs 1 to {rows} rows")
    blocks = row_blocks(shards, rows, max(1, -(-buffer_rows // BLOCKS_PER_BUFFER)))
    while True:
        order = iter(torch.randperm(len(blocks), generator=generator).tolist())
        left, next_block = torch.empty(0, shards.d), next(order, None)
        while next_block is not None:
            taken, filled = [], len(left)
            while next_block is not None and filled < buffer_rows:
                a, b = blocks[next_block]
                taken.append((a, b))
                filled += b - a
                next_block = next(order, None)
            buffer = torch.empty(filled, shards.d)
            buffer[:len(left)] = left
            at = len(left)
            for a, b in taken:
                buffer[at:at + b - a] = shards.read(a, b)
                at += b - a
            mixed = torch.randperm(filled, generator=generator)
            whole = filled - filled % batch_size
            for start in range(0, whole, batch_size):
                yield buffer[mixed[start:start + batch_size]]
            left = buffer[mixed[whole:]]


def write_activation_shards(folder: str | Path, batches: Iterable[torch.Tensor], rows_per_shard: int,
                            source: dict, force: bool, flag: str = "--shards") -> tuple[int, int]:
    """Write activations [n_i, d] coming in any number of batches as a shard folder in the format above:
    acts-00000.safetensors, ... of rows_per_shard rows each (the last may hold fewer) and index.json, with
    `source` (what model, hook and inputs the rows come from) in the index. The folder is one run's entry
    (RunOutput): it appears whole, or not at all. Holds at most one shard and one batch in memory.
    Returns (rows, d)."""
    if rows_per_shard < 1:
        raise HusaiError(f"--rows-per-shard {rows_per_shard}: must be at least 1")
    folder = Path(folder)
    with RunOutput(folder.parent, f"shards-{folder.name}", [folder.name], force, flag=flag) as run:
        target = run.path(folder.name)
        target.mkdir()
        listing, pending, rows, d = [], [], 0, None

        def write_shard(rows_now: torch.Tensor) -> None:
            name = f"acts-{len(listing):05d}.safetensors"
            save_tensors(target / name, {"acts": rows_now}, ACTS_SHARDS_FORMAT, ACTS_SHARDS_VERSION, {})
            listing.append({"file": name, "rows": len(rows_now)})

        for batch in batches:
            batch = batch.detach().float().cpu()
            if batch.ndim != 2 or (d is not None and batch.shape[1] != d):
                raise HusaiError(f"{flag}: every batch must be [n, {d or 'd'}], got {list(batch.shape)}")
            d, rows = batch.shape[1], rows + len(batch)
            pending.append(batch)
            while sum(len(p) for p in pending) >= rows_per_shard:
                joined = torch.cat(pending)
                write_shard(joined[:rows_per_shard])
                pending = [joined[rows_per_shard:].clone()]   # a copy: the written rows' memory is freed
        if pending and sum(len(p) for p in pending):
            write_shard(torch.cat(pending))
        if not listing:
            raise HusaiError(f"{flag} {folder}: no activations to write")
        write_json_durably(target / ACTS_INDEX, {"format": ACTS_SHARDS_FORMAT, "version": ACTS_SHARDS_VERSION,
                                                 "d": d, "rows": rows, "shards": listing, "source": source})
        run.commit()
    return rows, d


def evaluation_metrics(tensors: dict[str, torch.Tensor], config: dict, acts: torch.Tensor,
                       chunk_rows: int | None) -> dict:
    """reconstruction_metrics over acts [N, d], the held-out slice. chunk_rows None: in one piece (a
    small set, exactly as before shards existed); otherwise chunk_rows rows at a time, so the dense
    latents never exceed [chunk_rows, m]. Chunked, FVU is the same pooled ratio with sums in float64:
    sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean||^2 with the mean over all N rows."""
    if chunk_rows is None or len(acts) <= chunk_rows:
        return reconstruction_metrics(tensors, config, acts)
    mean = acts.mean(dim=0)
    residual = variance = 0.0
    active = 0
    fired = torch.zeros(tensors["W_dec"].shape[0], dtype=torch.bool)
    with torch.no_grad():
        for chunk in acts.split(chunk_rows):
            f = sae_latents(tensors, config, chunk)
            x_hat = f @ tensors["W_dec"] + tensors["b_dec"]
            residual += float((chunk - x_hat).double().pow(2).sum())
            variance += float((chunk - mean).double().pow(2).sum())
            fires = f > 0
            active += int(fires.sum())
            fired |= fires.any(dim=0)
    return {"fvu": residual / variance, "l0": active / len(acts), "dead_frac": float((~fired).float().mean())}


# --------------------------------------------------------------------------------------------------
# Part 1 (continued): several processes (torch.distributed, started by torchrun)
#
# `torchrun --nproc_per_node=N train_sae.py --seeds ...` starts N processes (ranks). Each trains its
# share of the seeds (seeds[rank::N]); the results are gathered on rank 0, which writes every file
# exactly as one process would. With --data-parallel every rank trains every seed on its part of each
# batch instead (DataParallel); with --latent-parallel every seed on the whole batch, holding 1/N of
# each SAE's latents (LatentShards, ShardedTopKSAE). gloo on the CPU, nccl on GPUs; a run outside torchrun (WORLD_SIZE unset
# or 1) never starts a process group.


class RankFailure(HusaiError):
    """Another rank died or hung, or this one could not join: one line, exit status 1, no files."""
    exit_status = 1


class Ranks(NamedTuple):
    rank: int
    world: int


def start_ranks(device: torch.device, timeout_s: float) -> tuple[Ranks, torch.device]:
    """Join the process group when started by torchrun with WORLD_SIZE > 1 (a rank on a GPU machine
    takes the GPU numbered LOCAL_RANK). Every collective waits at most timeout_s for the other ranks.
    Returns (this rank, the world size) and the device this rank trains on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(0, 1), device
    if "RANK" not in os.environ:
        raise HusaiError(f"WORLD_SIZE is {world} but RANK is not set: start several processes with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RankFailure(f"process {rank + 1} of {world} needs GPU {local_rank}, but this machine shows "
                              f"{torch.cuda.device_count()}; start at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as e:   # the backends raise RuntimeError, DistError or ValueError, by cause
        raise RankFailure(f"process {rank + 1} of {world}: could not join the others ({one_line(str(e))[:300]})")
    ranks = Ranks(rank, world)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_on_sigterm(ranks))
    return ranks, device


def stop_on_sigterm(ranks: Ranks) -> None:
    """torchrun ends the other processes with SIGTERM when one fails. Raise instead of vanishing, so that
    the process prints one line and a run it was writing is left uncommitted (RunOutput), not half-made."""
    state = f"; {ENTERED_RUNS[-1].describe_state()}" if ENTERED_RUNS else ""
    raise RankFailure(f"process {ranks.rank + 1} of {ranks.world} stopped: torchrun ended it because another "
                      f"process failed{state}")


def gather_on_rank0(value, ranks: Ranks) -> list | None:
    """Every rank's `value` (any picklable object) in rank order, on rank 0; None on the other ranks.
    A rank that died or did not arrive within the timeout ends every waiting rank with RankFailure."""
    if ranks.world == 1:
        return [value]
    gathered = [None] * ranks.world if ranks.rank == 0 else None
    try:
        dist.gather_object(value, gathered, dst=0)
    except Exception as e:   # DistBackendError, RuntimeError: a peer closed its connection or timed out
        if dist.get_backend() == "gloo":   # (an NCCL group with a failed collective may hang here: exit instead)
            dist.destroy_process_group()
        raise RankFailure(f"process {ranks.rank + 1} of {ranks.world}: another process stopped, or did not arrive "
                          f"within --dist-timeout, before the results were gathered ({one_line(str(e))[:200]}); "
                          f"no files were written")
    return gathered


def stop_ranks(ranks: Ranks) -> None:
    """Leave the process group together: every process waits here until the first has written its files,
    then all of them close their connections. (A process that closed its gloo group and exited while
    another was still writing was seen to abort in C++ at exit, 1 run in many, failing the whole job.)"""
    if ranks.world == 1:
        return
    try:
        dist.barrier()
    except Exception as e:   # a peer closed its connection or timed out
        raise RankFailure(f"process {ranks.rank + 1} of {ranks.world}: another process stopped before the "
                          f"end ({one_line(str(e))[:200]})")
    dist.destroy_process_group()


class DataParallel:
    """Data-parallel training of one ensemble: every process holds every seed's whole SAE and trains on
    its 1/N of each batch (rows [r B/N, (r+1) B/N) of process r). When backward has produced the last
    gradient, all of them are summed across the processes in one all-reduce (parameter order) and divided
    by N, so every process takes the same Adam step: the one for the mean loss over the whole batch. After
    the step the dead-latent counters and BatchTopK's running threshold are made the whole batch's (a
    latent fired if it fired in any part; the threshold is the smallest of the parts'), and the batch
    metrics are averaged over the parts, and a steered penalty coefficient is the geometric mean of the parts'.

    Deterministic for a fixed N: an all-reduce adds in an order fixed by N, so runs with the same N are
    bit-identical, and runs with different N (or one process) agree only up to rounding. Two things are
    per part rather than per batch: BatchTopK keeps the k B/N largest activations of each part, and AuxK
    normalises by its part's residual variance.

    The step check (SAETrainer.check_step) sees the whole batch's loss and FVU, the means of the parts'
    (whole_batch): a part whose loss is not finite, or whose FVU explodes, stops every process at the same
    step with the same last good weights, never one process alone (which would leave the others waiting
    at the next all-reduce)."""

    def __init__(self, trainer, ranks: Ranks):
        self.trainer, self.ranks = trainer, ranks
        self.parameters = list(trainer.sae.parameters())
        self.waiting = 0                       # gradients accumulated in this backward, not yet reduced
        for parameter in self.parameters:
            parameter.register_post_accumulate_grad_hook(self.gradient_ready)
        trainer.whole_batch = self.whole_batch

    def whole_batch(self, loss: torch.Tensor, fvu: torch.Tensor,
                    params_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A step's loss [S] and batch FVU [S] averaged over the processes' parts (the mean of a part's NaN
        or infinity is one too, on every process); the parameters, the same in every process, as they are."""
        both = torch.stack([loss, fvu])
        dist.all_reduce(both)
        both /= self.ranks.world
        return both[0], both[1], params_sum

    def part(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a batch [..., B, d]."""
        rows = batch.shape[-2] // self.ranks.world
        return batch[..., self.ranks.rank * rows:(self.ranks.rank + 1) * rows, :]

    def gradient_ready(self, parameter: torch.Tensor) -> None:
        self.waiting += 1
        if self.waiting < len(self.parameters):
            return
        self.waiting = 0
        grads = torch.cat([p.grad.flatten() for p in self.parameters])
        dist.all_reduce(grads)
        grads /= self.ranks.world
        for p, grad in zip(self.parameters, grads.split([p.numel() for p in self.parameters])):
            p.grad.copy_(grad.view_as(p))

    def step(self, batch: torch.Tensor) -> dict:
        """SAETrainer.step on this process's part of the whole batch [B, d] or [S, B, d]."""
        trainer = self.trainer
        before = trainer.inputs_since_fired.clone()
        metrics = trainer.step(self.part(batch))
        if self.waiting:
            raise RuntimeError(f"{self.waiting} of {len(self.parameters)} parameters got a gradient this step: "
                               f"the processes' gradients were not averaged")
        counts = trainer.inputs_since_fired.clone()
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)           # 0 where a latent fired in any part
        trainer.inputs_since_fired = torch.where(counts == 0, 0, before + batch.shape[-2])
        threshold = getattr(trainer.sae, "batch_threshold", None)
        if threshold is not None:
            dist.all_reduce(threshold, op=dist.ReduceOp.MIN)    # the EMA is monotone in the part's minimum
        if trainer.penalty_coeff is not None:                  # steered from each part's L0: the geometric mean
            log_coeff = trainer.penalty_coeff.log()
            dist.all_reduce(log_coeff)
            trainer.penalty_coeff.copy_((log_coeff / self.ranks.world).exp())
        values = torch.stack(list(metrics.values()))
        dist.all_reduce(values)
        return dict(zip(metrics, values / self.ranks.world))

    def check_replicas(self) -> None:
        """Raise unless every process holds the same parameters, buffers and dead-latent counters (the
        first process's copy is the one written)."""
        tensors = [*self.parameters, *self.trainer.sae.buffers(), self.trainer.inputs_since_fired]
        state = torch.cat([t.detach().float().flatten() for t in tensors]).nan_to_num(nan=0.0)
        highest, lowest = state.clone(), state.clone()
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        if not torch.equal(highest, lowest):
            raise RuntimeError("data parallel: the processes' copies of the SAEs differ after training")


class SummedAcrossRanks(torch.autograd.Function):
    """Forward: the sum over the processes of each one's part [..] (all_reduce; the same bits in every
    process, added in an order fixed by N). Backward: the gradient unchanged, since d(sum)/d(part) = 1 and
    the loss, computed from the sum, is the same in every process."""

    @staticmethod
    def forward(ctx, part):
        total = part.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad


class GradientSummedAcrossRanks(torch.autograd.Function):
    """Forward: the input unchanged (an input every process holds the same copy of). Backward: the sum
    over the processes of the gradients their own latents send back to it, which is the gradient the
    whole SAE would send."""

    @staticmethod
    def forward(ctx, shared):
        return shared.view_as(shared)

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def merged_topk(values: torch.Tensor, latents: torch.Tensor, k: int, ranks: Ranks) -> tuple[torch.Tensor, ...]:
    """The global top k of each row from every process's candidates: values [..., c] (this process's,
    as pre-activations) at global latent indices latents [..., c] in increasing order, c the same in
    every process. All candidates are all-gathered ([..., N c], in increasing latent index, since process
    r holds the r-th block of latents) and sorted by value, stably, so a tie goes to the lower latent.
    Returns the k kept values [..., k] and their latents [..., k] (the same in every process), and which of
    this process's candidates are kept [..., c] (bool)."""
    gathered_values = [torch.empty_like(values) for _ in range(ranks.world)]
    gathered_latents = [torch.empty_like(latents) for _ in range(ranks.world)]
    dist.all_gather(gathered_values, values.detach().contiguous())
    dist.all_gather(gathered_latents, latents.contiguous())
    all_values, all_latents = torch.cat(gathered_values, dim=-1), torch.cat(gathered_latents, dim=-1)
    order = all_values.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    selected = torch.zeros_like(all_values, dtype=torch.bool).scatter_(-1, order, True)
    c = values.shape[-1]
    return (all_values.gather(-1, order), all_latents.gather(-1, order),
            selected[..., ranks.rank * c:(ranks.rank + 1) * c])


def by_latent(values: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (values, local latent indices) [..., c] reordered by increasing latent."""
    local, order = local.sort(dim=-1)
    return values.gather(-1, order), local


class LatentShards:
    """Latent-sharded training of one TopK ensemble (ShardedTopKSAE holds the shards and computes the
    forward): the trainer's per-step decisions made for the whole SAE. Every process trains every seed on
    the whole batch. The step check sees every shard's parameters (a non-finite one anywhere stops every
    process at the same step); gradient clipping uses each seed's norm over every shard; the batch's dead
    fraction is the whole SAE's. Loss, FVU, L0 and the gradient norm are the same in every process."""

    def __init__(self, trainer, ranks: Ranks):
        self.trainer, self.ranks = trainer, ranks
        self.parameters = list(trainer.sae.parameters())
        self.replicated = [i for i, p in enumerate(self.parameters) if p is trainer.sae.b_dec]
        trainer.whole_batch = self.whole_batch
        trainer.summed_squares = self.summed_squares

    def whole_batch(self, loss: torch.Tensor, fvu: torch.Tensor,
                    params_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss and FVU as they are (the same everywhere); the parameter sum over every shard."""
        total = params_sum.clone()
        dist.all_reduce(total)
        return loss, fvu, total

    def summed_squares(self, squares: torch.Tensor) -> torch.Tensor:
        """Squared gradient norms [S, P] of this process's parameters -> the whole SAE's: the sharded
        parameters' summed over the processes, b_dec's (the same everywhere) counted once."""
        if squares.shape[1] != len(self.parameters):
            raise RuntimeError("latent sharding: a parameter got no gradient this step")
        total = squares.clone()
        dist.all_reduce(total)
        total[:, self.replicated] = squares[:, self.replicated]
        return total

    def step(self, batch: torch.Tensor) -> dict:
        """SAETrainer.step on the whole batch, with the dead fraction [S] made the whole SAE's (each process
        holds the same number of latents)."""
        metrics = self.trainer.step(batch)
        dead = metrics["dead"].clone()
        dist.all_reduce(dead)
        metrics["dead"] = dead / self.ranks.world
        return metrics

    def check_replicas(self) -> None:
        """Raise unless b_dec, the one parameter every process holds, is the same in all of them."""
        b_dec = self.trainer.sae.b_dec.detach().nan_to_num(nan=0.0)
        highest, lowest = b_dec.clone(), b_dec.clone()
        dist.all_reduce(highest, op=dist.ReduceOp.MAX)
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        if not torch.equal(highest, lowest):
            raise RuntimeError("latent sharding: the processes' copies of b_dec differ after training")


# --------------------------------------------------------------------------------------------------
# Part 2: measurement

KEY_FREQUENCY_MIN_SHARE = 0.05   # rule for key frequencies: >= 5% of the embedding's non-constant Fourier energy
PURE_NEURON_THRESHOLD = 0.85     # a neuron is "explained by frequency k" at this purity or above


def fourier_basis(p: int) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The orthonormal Fourier basis of functions on Z_p, as a [p, p] matrix F with F F^T = I.

    Row 0 is the constant 1/sqrt(p); then for k = 1..(p-1)//2 the rows cos(2 pi k x / p) and
    sin(2 pi k x / p), each scaled by sqrt(2/p); for even p a last row cos(pi x)/sqrt(p). Rows are
    labelled (kind, frequency), e.g. ("cos", 3), so no caller indexes components by position."""
    x = torch.arange(p, dtype=torch.float64)
    rows, labels = [torch.full((p,), 1.0 / p**0.5, dtype=torch.float64)], [("const", 0)]
    for k in range(1, (p - 1) // 2 + 1):
        angle = 2 * torch.pi * k * x / p
        rows += [torch.cos(angle) * (2 / p) ** 0.5, torch.sin(angle) * (2 / p) ** 0.5]
        labels += [("cos", k), ("sin", k)]
    if p % 2 == 0:
        rows.append(torch.cos(torch.pi * x) / p**0.5)
        labels.append(("cos", p // 2))
    return torch.stack(rows).float(), labels


def frequency_of_rows(labels: list[tuple[str, int]]) -> torch.Tensor:
    return torch.tensor([k for _, k in labels])


def embedding_frequency_shares(W: torch.Tensor) -> torch.Tensor:
    """Share of a [p, d] embedding's non-constant energy at each frequency k = 1..n_freq.

    Project the token rows onto the Fourier basis (F W) and sum the squared norm of the cos and sin
    rows of each frequency. A planted cos(2 pi k x / p) embedding has share 1 at k."""
    p = W.shape[0]
    F, labels = fourier_basis(p)
    energy = ((F.to(W) @ W) ** 2).sum(dim=1)
    freq = frequency_of_rows(labels)
    per_freq = torch.zeros(int(freq.max()) + 1, dtype=energy.dtype).index_add_(0, freq, energy.cpu())[1:]
    return per_freq / per_freq.sum().clamp_min(1e-30)


def key_frequencies(shares: torch.Tensor, min_share: float) -> list[int]:
    """The rule for key frequencies: every frequency holding at least `min_share` of the embedding's
    non-constant Fourier energy, largest first."""
    order = torch.argsort(shares, descending=True, stable=True)
    return [int(i) + 1 for i in order if shares[i] >= min_share]


def embedding_spectrum(token_embedding: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A [p, d] token embedding's share of Fourier energy per frequency, and its key frequencies by the
    rule (share >= KEY_FREQUENCY_MIN_SHARE). Stage 1 reports them; analyze.py recomputes them from the
    very model (or checkpoint) an SAE was trained on."""
    shares = embedding_frequency_shares(token_embedding.detach().float().cpu())
    return shares, key_frequencies(shares, KEY_FREQUENCY_MIN_SHARE)


def sum_frequency_directions(p: int, op: str, freqs: list[int]) -> torch.Tensor | None:
    """Orthonormal columns [p^2, 2 len(freqs)]: cos and sin of w_k (a + b) (a - b for sub) over the
    input grid, in the order a * p + b. None for mul, whose Fourier structure lives in discrete logarithms."""
    if op == "mul" or not freqs:
        return None
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    combined = (a + b if op == "add" else a - b).double()
    columns = []
    for k in freqs:
        angle = 2 * math.pi * k * combined / p
        columns += [torch.cos(angle), torch.sin(angle)]
    directions = torch.stack(columns, dim=1)
    return (directions / directions.norm(dim=0)).float()


def fourier_purity(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier purity of units (neurons or SAE latents) from their activations on every input (a, b).

    acts [p, p, n]: unit n's activation on input (a, b). Centre each unit, take the 2-D Fourier
    transform A_hat = F A F^T, and measure the fraction of the energy in the 3x3 block
    {const, cos_k, sin_k} x {const, cos_k, sin_k} of the best frequency k. Returns (purity [n], best
    frequency [n]); a unit that never varies has purity 0 and best frequency 0."""
    p = acts.shape[0]
    F, labels = fourier_basis(p)
    F = F.to(acts.device, torch.float64)
    centred = acts.double() - acts.double().mean(dim=(0, 1), keepdim=True)
    energy = torch.einsum("ia,abn,jb->ijn", F, centred, F) ** 2
    freq = frequency_of_rows(labels).to(acts.device)
    onehot = torch.nn.functional.one_hot(freq).double()                     # [p, n_freq + 1]
    by_freq = torch.einsum("ik,ijn,jl->kln", onehot, energy, onehot)         # energy per (freq_a, freq_b)
    diag = torch.diagonal(by_freq, dim1=0, dim2=1).T                         # [n_freq + 1, n]
    block = diag[1:] + by_freq[1:, 0] + by_freq[0, 1:]                       # {0,k}^2 minus (0,0)
    total = energy.sum(dim=(0, 1))
    best_energy, best = block.max(dim=0)
    alive = total > 1e-12 * total.max().clamp_min(1e-30)
    purity = torch.where(alive, best_energy / total.clamp_min(1e-30), torch.zeros_like(total))
    return purity.float(), torch.where(alive, best + 1, torch.zeros_like(best))


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, pooled over the whole set with a centred denominator:
    sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2. Works on [N, d] or batched [..., N, d]."""
    residual = (x - x_hat).double().pow(2).sum(dim=(-2, -1))
    variance = (x - x.mean(dim=-2, keepdim=True)).double().pow(2).sum(dim=(-2, -1))
    return (residual / variance).float()

# --------------------------------------------------------------------------------------------------
# Part 3: sparse autoencoders
#
# Notation: x [d] an activation, m latents. Pre-activation z = (x - b_dec) W_enc + b_enc, latents
# f = sigma(z), reconstruction x_hat = f W_dec + b_dec; W_enc [d, m], W_dec [m, d] (SAELens's names and
# orientations). Training keeps S seeds as one ensemble: every parameter has a leading seed dimension
# (W_enc [S, d, m]), each seed draws its initialisation from its own generator and has its own loss, and
# Adam is elementwise, so a seed trains identically alone or among others.
#
# An architecture is one subclass of SAEEnsemble, registered by name in ARCHITECTURES. It declares its
# settings (which become SAEConfig fields and train_sae.py flags), the setting that sets its sparsity,
# its extra saved tensors and whether it uses AuxK, and defines its training forward, its penalty and
# its inference; where it differs from the rest it also overrides the reconstruction term of its loss
# (Matryoshka), how its decoder rows are built and constrained (archetypal) or its initialisation from
# the data. Nothing else names an architecture.

SAE_FORMAT, SAE_VERSION = "husai.sae", 1
SNAPSHOT_FORMAT = "husai.sae_snapshots"

# A seed's files, in its configuration's folder, are one folder that SAELens loads as it is
# (SAE.load_from_disk("runs/sae/<configuration>/seed<N>")):
#     seed<N>/sae_weights.safetensors   exactly SAELens's tensors for its architecture (SAELENS_TENSORS)
#     seed<N>/cfg.json                  the keys SAELens reads (saelens_config), and HUSAI's config, metrics and
#                                       provenance under "husai"
#     seed<N>/husai_tensors.safetensors only if the architecture exports tensors SAELens has no place for
#     seed<N>/snapshots.safetensors     SNAPSHOT_FORMAT: its weights at log-spaced steps, with their FVU
#     seed<N>/log.jsonl                 the training log
# Runs written before this layout hold seed<N>.safetensors (the tensors, with config, metrics and provenance
# in its header), seed<N>.snapshots.safetensors and seed<N>.log.jsonl; seed_files finds either.

SAELENS_WEIGHTS, SAELENS_CONFIG = "sae_weights.safetensors", "cfg.json"
EXTRA_TENSORS_FILE, SNAPSHOTS_FILE, LOG_FILE = "husai_tensors.safetensors", "snapshots.safetensors", "log.jsonl"
SAELENS_TENSORS = {"standard": ("W_enc", "W_dec", "b_enc", "b_dec"), "topk": ("W_enc", "W_dec", "b_enc", "b_dec"),
                   "jumprelu": ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
SAELENS_CFG_VERSION = "6.0.0"   # cfg.json follows SAELens 6's layout (an older one is converted as pre-6 by its loader)


def seed_folder_name(seed: int) -> str:
    """One seed's SAE folder, in its configuration's folder."""
    return f"seed{seed}"


def sae_file_name(seed: int) -> str:
    """One seed's SAE in the single-file layout of earlier runs (read, no longer written)."""
    return f"seed{seed}.safetensors"


def snapshot_file_name(seed: int) -> str:
    """The snapshots beside sae_file_name(seed) in the single-file layout of earlier runs."""
    return f"seed{seed}.snapshots.safetensors"


class Rule(NamedTuple):
    """A condition a setting's value must meet, and how an error states it."""
    holds: Callable[[object], bool]
    says: str


MAX_SETTING = 2**31 - 1     # no integer setting may be larger (beyond 2^63 torch cannot compare one with a tensor)
POSITIVE = Rule(lambda v: v > 0, "must be positive")
NON_NEGATIVE = Rule(lambda v: v >= 0, "must not be negative")
AT_LEAST_ONE = Rule(lambda v: v >= 1, "must be at least 1")
BELOW_ONE = Rule(lambda v: 0 <= v < 1, "must lie in [0, 1)")


def setting(default, help: str, rule: Rule | None = None, choices: tuple | None = None, flag: str | None = None):
    """A field of SAEConfig: its default, its --help text, the rule its value must meet, its allowed
    values, and (rarely) a flag name other than the field's. train_sae.py makes one flag of each."""
    return field(default=default, metadata={"help": help, "rule": rule, "choices": choices, "flag": flag})


def width_scaled_lr(width: int) -> float:
    """The TopK anchors' learning rate: 2e-4 * (m / 2^14)^-0.5 (Gao et al. 2024)."""
    return 2e-4 * (width / 2**14) ** -0.5


def default_lr(cfg: SAEConfig) -> float:
    """The learning rate train_sae.py uses unless told: the architecture's lr_scale times width_scaled_lr."""
    return ARCHITECTURES[cfg.arch].lr_scale * width_scaled_lr(cfg.width)


class SeedwiseLinear(torch.autograd.Function):
    """out[s] = a[s] @ W[s] + bias[s] for every seed s: a [S, n, k], W [S, k, p], bias [S, p] -> [S, n, p].

    One matmul per seed, each written in place into the output. A batched matmul shares its threads out
    differently for different S, and so rounds a seed's weight gradient (a sum over the batch)
    differently; one matmul per seed makes each seed's numbers, bit for bit, independent of the seeds
    trained beside it. The backward is the usual one, computed per seed the same way."""

    @staticmethod
    def forward(ctx, a, W, bias):
        out = a.new_empty(a.shape[0], a.shape[1], W.shape[2])
        for s in range(a.shape[0]):
            torch.addmm(bias[s], a[s], W[s], out=out[s])
        ctx.save_for_backward(a, W)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, W = ctx.saved_tensors
        needs_a, needs_W, needs_bias = ctx.needs_input_grad
        grad_a = torch.empty_like(a) if needs_a else None
        grad_W = torch.empty_like(W) if needs_W else None
        for s in range(a.shape[0]):
            if needs_a:
                torch.mm(grad[s], W[s].T, out=grad_a[s])
            if needs_W:
                torch.mm(a[s].T, grad[s], out=grad_W[s])
        grad_bias = torch.stack([g.sum(dim=0) for g in grad]) if needs_bias else None
        return grad_a, grad_W, grad_bias


def pre_activation(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """z = (x - b_dec) W_enc + b_enc. x [B, d] or [S, B, d]; W_enc [S, d, m] -> z [S, B, m]."""
    return SeedwiseLinear.apply(x - b_dec[:, None], W_enc, b_enc)


def relu_latents(z: torch.Tensor) -> torch.Tensor:
    """ReLU SAE: f = ReLU(z)."""
    return torch.relu(z)


def topk_kept(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK (Gao et al. 2024): the k largest entries of each row of z, ReLU'd (so fewer than k may be
    non-zero), as (values, latent indices), each [..., k], in no particular order."""
    values, indices = z.topk(k, dim=-1, sorted=False)
    return torch.relu(values), indices


def scatter_latents(values: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Dense latents shaped like `like`: the kept values at their indices, zero elsewhere."""
    return torch.zeros_like(like).scatter_(-1, indices, values)


def topk_latents(z: torch.Tensor, k: int) -> torch.Tensor:
    """TopK latents f, dense."""
    return scatter_latents(*topk_kept(z, k), z)


def batchtopk_latents(z: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK (Bussmann et al. 2024): keep the B*k largest entries of each seed's whole batch
    z [S, B, m], then ReLU; the number kept per row varies, the average is k."""
    flat = z.flatten(1)
    values, indices = flat.topk(k * z.shape[1], dim=-1)
    return scatter_latents(torch.relu(values), indices, flat).view_as(z)


def threshold_latents(z: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU at inference (and BatchTopK at inference, with one global threshold): f = z * H(z - theta)."""
    return z * (z > threshold)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """f = z * H(z - theta) with the straight-through estimator of Rajamanoharan et al. 2024:
    df/dz = H(z - theta); df/dtheta = -(theta / eps) K((z - theta) / eps), K the rectangle kernel.
    z [S, B, m], theta [S, 1, m]."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return grad * (z > theta), grad_theta.sum(dim=1, keepdim=True), None


class StraightThroughStep(torch.autograd.Function):
    """H(z - theta), whose gradient would be zero almost everywhere: the STE gives theta the
    pseudo-derivative -(1 / eps) K((z - theta) / eps), and z none. This is what lets an L0 penalty train."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = -(1 / ctx.eps) * rectangle((z - theta) / ctx.eps) * grad
        return None, grad_theta.sum(dim=1, keepdim=True), None


def geometric_median(x: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to the rows of x."""
    median = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1 / (x - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * x).sum(dim=0) / weights.sum()
    return median


def kmeans_plus_plus(points: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii 2007): the first centre a uniformly drawn point, each
    next one a point drawn with probability proportional to its squared distance to the nearest centre
    so far. points [N, d] -> centres [n_clusters, d]."""
    squared = points.pow(2).sum(dim=1)

    def distance_to(i: int) -> torch.Tensor:       # ||x - x_i||^2 for every point, as one matrix-vector product
        return (squared - 2 * points @ points[i] + squared[i]).clamp_min(0)

    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    nearest = distance_to(chosen[0])
    for _ in range(n_clusters - 1):
        weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)   # all points already centres
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, distance_to(chosen[-1]))
    return points[chosen].clone()


def kmeans(points: torch.Tensor, n_clusters: int, seed: int, iterations: int = 100) -> torch.Tensor:
    """Lloyd's k-means from a k-means++ start drawn with torch.Generator().manual_seed(seed): assign each
    point to its nearest centre (ties to the lower index), move each centre to the mean of its points (a
    centre left with none stays where it is), until no assignment changes or after `iterations` rounds.
    Runs on the CPU, so the same points and seed give the same centres bit for bit.
    points [N, d] -> centroids [n_clusters, d] (float32)."""
    x = points.detach().float().cpu()
    centres = kmeans_plus_plus(x, n_clusters, torch.Generator().manual_seed(seed))
    assignment = None
    for _ in range(iterations):
        distances = x.pow(2).sum(dim=1, keepdim=True) - 2 * x @ centres.T + centres.pow(2).sum(dim=1)
        new_assignment = distances.argmin(dim=1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        counts = torch.bincount(assignment, minlength=n_clusters)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return centres


class Codes(NamedTuple):
    """What a training forward passes to the losses: dense latents f and pre-activations z [S, B, m], or,
    for TopK, only the kept values and their latent indices [S, B, k]."""
    latents: torch.Tensor | None = None
    pre: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None


class SAEEnsemble(torch.nn.Module):
    """S sparse autoencoders of one configuration, one per seed, trained as one batched model.

    This class holds what every architecture shares: W_enc, W_dec, b_enc, b_dec and their initialisation,
    activation normalisation, the unit-norm decoder constraint, AuxK, and the export in raw activation
    units. Each architecture is a subclass that sets the class attributes below and defines `activate`
    (or its own `forward`), and where it has them `penalty`, `observe` and `extra_exports`; `infer` is
    what a saved SAE computes. The rest are defaults an architecture may override: `reconstruction_loss`,
    `decoder` with `constrain_gradients` and `constrain_parameters`, and `init_from_data`."""

    name: ClassVar[str]
    settings: ClassVar[dict] = {}            # its own SAEConfig fields, each made with setting()
    sparsity: ClassVar[str]                  # the setting that sets its sparsity: names folders, groups analyses
    sparsity_format: ClassVar[str] = "{name}_{value:g}"   # how that setting reads in a folder name
    extra_tensors: ClassVar[tuple[str, ...]] = ()         # saved beside W_enc, W_dec, b_enc, b_dec
    saelens: ClassVar[str]                   # the SAELens architecture that computes its inference (cfg.json)
    uses_auxk: ClassVar[bool] = False
    variant_settings: ClassVar[tuple[str, ...]] = ()      # settings that make another kind of SAE: in folder names
    penalty_coefficient: ClassVar[str | None] = None      # the setting its penalty multiplies; target_l0 steers it
    # The default learning rate as a multiple of width_scaled_lr. 8: with gradient clipping and Adam beta2 0.99
    # (CoreSettings), TopK on the grokked model reaches FVU 0.0007 in 1000 steps, where 1x left it at 0.0017.
    lr_scale: ClassVar[float] = 8.0
    # AuxK's weight unless told (auxk_coeff 0): Gao et al.'s 1/32; BatchTopKSAE says why some architectures take 1/8.
    default_auxk_coeff: ClassVar[float] = 1 / 32
    lr_multipliers: ClassVar[dict[str, float]] = {}   # parameter name -> its learning rate as a multiple of the SAE's
    own_latents: slice = slice(None)         # the latents this process holds: all, unless they are sharded

    def __init__(self, cfg: SAEConfig, seeds: list[int]):
        super().__init__()
        self.cfg, self.seeds = cfg, list(seeds)
        W_dec, W_enc = [], []
        for seed in self.seeds:
            generator = torch.Generator().manual_seed(seed)
            rows = torch.randn(cfg.width, cfg.d_in, generator=generator)
            rows = rows / rows.norm(dim=1, keepdim=True)
            W_dec.append(rows)
            W_enc.append(rows.T.clone() if cfg.tied_init else
                         torch.randn(cfg.d_in, cfg.width, generator=generator) / cfg.d_in**0.5)
        S = len(self.seeds)
        self.W_enc = torch.nn.Parameter(torch.stack(W_enc))
        self.W_dec = torch.nn.Parameter(torch.stack(W_dec))
        self.b_enc = torch.nn.Parameter(torch.zeros(S, cfg.width))
        self.b_dec = torch.nn.Parameter(torch.zeros(S, cfg.d_in))
        # inputs are multiplied by input_scale before encoding (activation normalisation)
        self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def fill_defaults(cls, cfg: SAEConfig) -> None:
        """Settings whose default depends on the architecture, given as 0, replaced by the architecture's."""
        if cfg.auxk_coeff == 0:
            cfg.auxk_coeff = cls.default_auxk_coeff

    @classmethod
    def check(cls, cfg: SAEConfig) -> None:
        """Raise HusaiError for settings this architecture cannot train with (beyond each field's own rule)."""

    @classmethod
    def check_data(cls, cfg: SAEConfig, n_rows: int) -> None:
        """Raise HusaiError when this architecture cannot be initialised from n_rows activations (checked
        before a run starts, so that a refusal writes nothing)."""

    @classmethod
    def sparsity_setting(cls, config: dict) -> str:
        """The setting that chose a saved SAE's sparsity (config as saved): `sparsity`, or target_l0 when
        a penalty architecture was steered to it. Analyses group and map SAEs by its value."""
        return cls.sparsity

    @classmethod
    def sparsity_label(cls, cfg: SAEConfig) -> str:
        """The sparsity part of an output folder name: k32, l1_0.7, l0_0.05."""
        return cls.sparsity_format.format(name=cls.sparsity, value=getattr(cfg, cls.sparsity))

    @classmethod
    def folder_label(cls, cfg: SAEConfig) -> str:
        """The output folder name after architecture and width: the sparsity label, then the value of each
        variant setting (k32, l1_0.7, k32-per-seed), so that two kinds of SAE never share a folder."""
        return "-".join([cls.sparsity_label(cfg)] + [str(getattr(cfg, name)) for name in cls.variant_settings])

    @torch.no_grad()
    def init_from_data(self, acts: torch.Tensor) -> None:
        """Activation normalisation (E||c x|| = sqrt(d)) and b_dec from a sample of the data."""
        if self.cfg.normalize:
            self.input_scale.fill_(self.cfg.d_in**0.5 / acts.norm(dim=1).mean())
        sample = acts[:4096] * self.input_scale
        centre = {"median": geometric_median, "mean": lambda s: s.mean(dim=0),
                  "zero": lambda s: torch.zeros(s.shape[1], device=s.device)}[self.cfg.b_dec_init](sample)
        self.b_dec.copy_(centre.expand_as(self.b_dec))

    def forward(self, acts: torch.Tensor, triton: bool = False) -> tuple[torch.Tensor, torch.Tensor, Codes]:
        """Training forward on a batch acts [B, d] or [S, B, d] in raw units. Returns the normalised
        input, the reconstruction x_hat [S, B, d], and the codes the losses need. `triton` is the
        trainer's choice of kernels; only an architecture with kernels (TopK) reads it."""
        x = acts * self.input_scale
        z = pre_activation(x, self.W_enc, self.b_enc, self.b_dec)
        f = self.activate(z)
        return x, SeedwiseLinear.apply(f, self.decoder(), self.b_dec), Codes(latents=f, pre=z)

    def decoder(self) -> torch.Tensor:
        """The decoder rows [S, m, d] that the forward, AuxK and the export use: the parameter W_dec
        itself, unless an architecture builds its rows from other parameters."""
        return self.W_dec

    def aux_k(self, l0: torch.Tensor) -> list[int]:
        """AuxK's number of dead latents per input, per seed: the k_aux setting, or when it is 0 the SAE's
        own L0 (k for the TopK family; see PenaltySAE). l0 [S] is each seed's batch L0."""
        return [self.cfg.k_aux or self.cfg.k] * len(self.seeds)

    def reconstruction_loss(self, x: torch.Tensor, codes: Codes, error: torch.Tensor) -> torch.Tensor:
        """The reconstruction term of each seed's loss [S]. `error` [S] is the full reconstruction's
        ||x - x_hat||^2 averaged over the batch (x [S, B, d] normalised); by default that is the term."""
        return error

    def constrain_gradients(self, triton: bool) -> None:
        """Before each optimiser step. With unit-norm decoder rows, remove from each row's gradient its
        part along the row: g_i <- g_i - (g_i . w_i) w_i."""
        if self.cfg.unit_norm_decoder:
            kernels.remove_parallel_grad_(self.W_dec.detach(), self.W_dec.grad, triton=triton)

    @torch.no_grad()
    def constrain_parameters(self, triton: bool) -> None:
        """After each optimiser step. With unit-norm decoder rows, w_i <- w_i / ||w_i||."""
        if self.cfg.unit_norm_decoder:
            kernels.normalize_rows_(self.W_dec.data, triton=triton)

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """Training latents f [S, B, m] from pre-activations z [S, B, m]."""
        raise NotImplementedError

    def penalty(self, codes: Codes, step: int, coefficient: torch.Tensor | None,
                dead: torch.Tensor) -> torch.Tensor | None:
        """The sparsity penalty per seed [S] at this step, added to the reconstruction loss (None: none);
        `coefficient` [S] is the trainer's value of the penalty_coefficient setting, per seed, and `dead`
        [S, m] marks the latents that have not fired on the last dead_window training inputs."""
        return None

    def observe(self, codes: Codes) -> None:
        """Update running statistics from a training batch's codes (after the losses are computed)."""

    def extra_exports(self, s: int) -> dict[str, torch.Tensor]:
        """Seed s's `extra_tensors`, in raw activation units."""
        return {}

    @staticmethod
    def infer(z: torch.Tensor, tensors: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
        """What a saved SAE computes at inference: latents f [N, m] from pre-activations z [N, m]."""
        raise NotImplementedError

    def auxk_loss(self, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, k_aux: list[int]) -> torch.Tensor:
        """AuxK (Gao et al.): for each seed s, the k_aux[s] largest pre-activations of its dead latents
        reconstruct the residual e = x - x_hat (without b_dec); loss = ||e - e_hat||^2 / ||e - mean(e)||^2
        per seed [S]. Its gradient reaches the dead latents' encoder columns and decoder rows, which is what revives them. x [S, B, d]
        is already normalised; each seed computes the pre-activations of its own dead latents only (n << m).

        The kept pre-activations are used signed, with no ReLU: a latent dies when its pre-activation is
        below zero on every input, and a ReLU here would give it no gradient either (on the grokked model,
        TopK with clipping left 23% of its latents dead that way, their largest pre-activation a median
        -0.01). k_aux is the SAE's own L0 by default: with more than that (64 with 3 true atoms per input),
        AuxK fits the dead latents densely and they do not become features (planted TopK 83-89%, against
        94-95% with k_aux = k, on the trainer before the registry)."""
        residual = (x - x_hat).detach()
        # unbound once: indexing a parameter per seed would make autograd allocate a full-size gradient per seed
        W_enc, W_dec, b_enc, b_dec = self.W_enc.unbind(), self.decoder().unbind(), self.b_enc.unbind(), self.b_dec.unbind()
        losses = []
        for s in range(len(self.seeds)):
            latent = dead[s].nonzero().squeeze(1)
            if len(latent) == 0:
                losses.append(x.new_zeros(()))
                continue
            z = (x[s] - b_dec[s]) @ W_enc[s][:, latent] + b_enc[s][latent]     # [B, n]
            values, indices = z.topk(min(k_aux[s], len(latent)), dim=-1, sorted=False)
            e, e_hat = residual[s], scatter_latents(values, indices, z) @ W_dec[s][latent]
            losses.append((e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(dim=0)).pow(2).sum(-1).mean().clamp_min(1e-12))
        return torch.stack(losses)

    @torch.no_grad()
    def export(self, s: int) -> dict[str, torch.Tensor]:
        """Seed s's weights in raw activation units, with SAELens names. Dividing the decoder bias,
        encoder bias and threshold by the input scale c gives latents f/c and x_hat/c: the same SAE
        on raw inputs, with W_dec's rows unchanged (unit norm where the architecture keeps them so)."""
        c = self.input_scale
        tensors = {"W_enc": self.W_enc[s], "W_dec": self.decoder()[s], "b_enc": self.b_enc[s] / c, "b_dec": self.b_dec[s] / c}
        tensors.update(self.extra_exports(s))
        return {name: t.detach().float().cpu().clone() for name, t in tensors.items()}


K = setting(32, "topk: latents kept per input; batchtopk: kept per input on average over the batch")
AUXK = {
    "auxk": setting(True, "AuxK loss that revives dead latents (Gao et al.)"),
    "auxk_coeff": setting(0.0, "AuxK: weight of its loss (0: the architecture's own: 1/8 for batchtopk, "
                               "matryoshka, archetypal and jumprelu, 1/32 for topk and relu; --no-auxk turns AuxK "
                               "off)", NON_NEGATIVE),
    "k_aux": setting(0, "AuxK: dead latents used to reconstruct the residual (0: the SAE's own L0: k, or the "
                        "target L0, or the batch's L0)", NON_NEGATIVE),
}
PENALTY_TARGET = {
    "target_l0": setting(0.0, "relu, jumprelu: steer the penalty coefficient during training (from its setting) so "
                              "that L0 ends at this (0: the coefficient stays fixed)", NON_NEGATIVE),
    "target_gain": setting(0.0, "target_l0: the controller's per-step gain on log(coefficient) (0: the "
                                "architecture's own: 0.03 for jumprelu, 0.01 for relu)", NON_NEGATIVE),
    "target_horizon": setting(0.0, "target_l0: when above 0, the controller acts on the L0 it predicts this many "
                                   "steps ahead from L0's recent trend and follows the learning-rate schedule "
                                   "(0: on the current L0, at every step alike)", NON_NEGATIVE),
}


def check_k(cfg: SAEConfig) -> None:
    if not 1 <= cfg.k <= cfg.width:
        raise HusaiError(f"k {cfg.k}: must lie between 1 and the width ({cfg.width})")


class PenaltySAE(SAEEnsemble):
    """What the architectures whose sparsity follows a penalty coefficient share: target_l0, under which
    the trainer steers the coefficient (SAETrainer.steer_penalty) and the folder is named by the target."""
    uses_auxk = True
    default_target_gain: ClassVar[float] = 0.01      # the controller's gain unless told (target_gain 0)

    @classmethod
    def fill_defaults(cls, cfg):
        super().fill_defaults(cfg)
        if cfg.target_gain == 0:
            cfg.target_gain = cls.default_target_gain

    @classmethod
    def check(cls, cfg):
        if cfg.target_l0 > cfg.width:
            raise HusaiError(f"target_l0 {cfg.target_l0:g}: must be at most the width ({cfg.width})")

    @classmethod
    def sparsity_label(cls, cfg):
        return f"target_l0_{cfg.target_l0:g}" if cfg.target_l0 else super().sparsity_label(cfg)

    @classmethod
    def sparsity_setting(cls, config):
        return "target_l0" if config.get("target_l0") else cls.sparsity

    def aux_k(self, l0):
        """k_aux, else the target L0, else each seed's own batch L0 (rounded, at least 1)."""
        if self.cfg.k_aux or self.cfg.target_l0:
            return [self.cfg.k_aux or max(1, round(self.cfg.target_l0))] * len(self.seeds)
        return [max(1, round(value)) for value in l0.tolist()]


class ReLUSAE(PenaltySAE):
    """ReLU SAE: f = ReLU(z); penalty lambda * sum_i f_i ||W_dec[i]||, lambda ramped up from 0 (or steered)."""
    name = "relu"
    saelens = "standard"
    settings = {
        "l1": setting(0.1, "L1 coefficient, decoder-norm weighted, in normalised units (0.1: L0 ~37 on the "
                           "grokked model's residual stream, next to TopK's k = 32; under target_l0, where the "
                           "controller starts)", NON_NEGATIVE),
        "l1_warmup_steps": setting(500, "the L1 coefficient ramps up linearly from 0 over these steps (not under "
                                        "target_l0, whose controller starts low and rises)", NON_NEGATIVE),
        **AUXK, **PENALTY_TARGET,
    }
    sparsity = "l1"
    penalty_coefficient = "l1"
    # L1 0.1, not 0.2: with --target-l0 the controller starts from it, and from 0.2 the early penalty leaves duplicated
    # latents and latents between two atoms (planted recovery at matched width 93.3-97.5%; from 0.1, 95.8-98.3%:
    # python -m tests.planted relu --set l1=0.2). On the grokked model 0.1 gives FVU 0.0012-0.0013, L0 35.5-39.1 and
    # 2.1-5.7% dead, against 0.0022-0.0023, 28.3-30.1 and 12.5-15.6% at 0.2.

    def activate(self, z):
        return torch.relu(z)

    def penalty(self, codes, step, coefficient, dead):
        ramp = 1.0 if self.cfg.target_l0 else min(1.0, (step + 1) / max(1, self.cfg.l1_warmup_steps))
        return coefficient * ramp * (codes.latents * self.W_dec.norm(dim=-1)[:, None]).sum(-1).mean(-1)

    @staticmethod
    def infer(z, tensors, config):
        return torch.relu(z)


class TopKSAE(SAEEnsemble):
    """TopK (Gao et al. 2024): the k largest pre-activations of each input, ReLU'd; AuxK revives dead
    latents. On a GPU (or under the Triton interpreter) training runs the fused kernels."""
    name = "topk"
    saelens = "topk"
    settings = {"k": K, **AUXK}
    sparsity = "k"
    sparsity_format = "k{value}"
    uses_auxk = True

    @classmethod
    def check(cls, cfg):
        check_k(cfg)
        if cfg.k > kernels.MAX_K:
            raise HusaiError(f"k {cfg.k}: the fused TopK kernel keeps at most {kernels.MAX_K} latents per input; "
                             f"use a smaller --k, or --arch batchtopk")

    def forward(self, acts, triton=False):
        x = acts * self.input_scale
        if triton:   # the fused path: the dense [S, B, m] pre-activation is never materialised
            values, indices = kernels.topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, triton=True)
            x_hat = kernels.sparse_decode(values, indices, self.decoder(), self.b_dec, triton=True)
            return x, x_hat, Codes(values=values, indices=indices)
        z = pre_activation(x, self.W_enc, self.b_enc, self.b_dec)
        values, indices = topk_kept(z, self.cfg.k)
        x_hat = SeedwiseLinear.apply(scatter_latents(values, indices, z), self.decoder(), self.b_dec)
        return x, x_hat, Codes(values=values, indices=indices)

    @staticmethod
    def infer(z, tensors, config):
        return topk_latents(z, config["k"])


class BatchTopKSAE(SAEEnsemble):
    """BatchTopK (Bussmann et al. 2024): the B*k largest pre-activations of each seed's batch in training;
    at inference one global threshold, a running average of the smallest kept activation."""
    name = "batchtopk"
    saelens = "jumprelu"
    settings = {"k": K, **AUXK, "threshold_momentum": setting(
        0.99, "running average of the smallest kept activation, the inference threshold", BELOW_ONE)}
    sparsity = "k"
    sparsity_format = "k{value}"
    extra_tensors = ("threshold",)
    uses_auxk = True
    # At Gao et al.'s 1/32, planted BatchTopK at matched width ends with 3-4 of its 120 latents dead and recovers
    # 93.3-96.7% of the atoms; at 1/8, 95.8-98.3% (python -m tests.planted batchtopk --set auxk_coeff=0.125), for FVU
    # 0.00084-0.00088 on the grokked model against 0.00068-0.00071 (seeds 0-4). TopK keeps 1/32: at 1/8 its grokked
    # FVU is 0.0009 (seeds 0-1), above the 0.0008 it must reach, and its planted recovery is 95.0-96.7% either way.
    default_auxk_coeff = 1 / 8

    def __init__(self, cfg, seeds):
        super().__init__(cfg, seeds)
        self.register_buffer("batch_threshold", torch.full((len(self.seeds),), float("nan")))   # NaN until step 1
        self.register_buffer("initial_threshold", torch.full((len(self.seeds),), float("nan")))

    @classmethod
    def check(cls, cfg):
        check_k(cfg)

    @torch.no_grad()
    def init_from_data(self, acts):
        """As for every SAE, then the untrained SAE's inference threshold (exported until the first training
        batch sets the running one): the smallest kept activation of BatchTopK on the first 1024 rows."""
        super().init_from_data(acts)
        sample = acts[:1024] * self.input_scale
        for s in range(len(self.seeds)):      # one seed at a time: [rows, m] at most
            z = (sample - self.b_dec[s]) @ self.W_enc[s] + self.b_enc[s]
            self.initial_threshold[s] = smallest_kept(batchtopk_latents(z[None], self.cfg.k))[0]

    def activate(self, z):
        return batchtopk_latents(z, self.cfg.k)

    @torch.no_grad()
    def observe(self, codes):
        """theta <- running average of the smallest positive kept activation in each seed's batch (a batch
        where nothing fires leaves it as it was)."""
        smallest = smallest_kept(codes.latents)
        theta, momentum = self.batch_threshold, self.cfg.threshold_momentum
        updated = torch.where(theta.isnan(), smallest, momentum * theta + (1 - momentum) * smallest)
        theta.copy_(torch.where(smallest.isinf(), theta, updated))

    def extra_exports(self, s):
        theta = self.batch_threshold[s] if not self.batch_threshold[s].isnan() else self.initial_threshold[s]
        return {"threshold": torch.full((self.cfg.width,), float(theta)) / self.input_scale}

    @staticmethod
    def infer(z, tensors, config):
        return threshold_latents(z, tensors["threshold"])


def smallest_kept(latents: torch.Tensor) -> torch.Tensor:
    """Each seed's smallest positive latent in a batch, latents [S, B, m] -> [S] (inf where none fires)."""
    return torch.where(latents > 0, latents, float("inf")).flatten(1).min(dim=1).values


class JumpReLUSAE(PenaltySAE):
    """JumpReLU (Rajamanoharan et al. 2024): f = z * H(z - theta) with learned per-latent thresholds;
    penalty lambda * L0, trained through straight-through estimators, plus (without target_l0) nu * sum_{i dead}
    theta_i (dead_threshold_coeff nu), which lowers the threshold of a dead latent until its largest
    pre-activations cross it: a threshold left above every input of its latent gets no other gradient. When pre_act_coeff
    mu > 0, also Anthropic's pre-activation loss mu * sum_i ReLU(theta_i - z_i) ||W_dec[i]|| (Circuits Updates,
    2025; on every latent, where SAELens takes only the dead ones), which lifts latents below their thresholds."""
    name = "jumprelu"
    saelens = "jumprelu"
    settings = {
        "l0": setting(0.005, "coefficient of the L0 norm (the number of active latents; 0.005: L0 ~30 on the "
                             "grokked model's residual stream, next to TopK's k = 32; under target_l0, where the "
                             "controller starts)", NON_NEGATIVE),
        "threshold_init": setting(0.1, "initial per-latent threshold (normalised units)", POSITIVE),
        "bandwidth": setting(0.1, "width of the straight-through estimator's rectangle kernel (normalised units)",
                             POSITIVE),
        "dead_threshold_coeff": setting(0.3, "coefficient of the sum of the dead latents' thresholds, which "
                                             "lowers a dead latent's threshold until its largest pre-activations "
                                             "cross it (0: off; off under target_l0, whose L0 the revived latents "
                                             "would raise)", NON_NEGATIVE),
        "pre_act_coeff": setting(0.0, "coefficient of the pre-activation loss sum_i ReLU(theta_i - z_i) "
                                       "||W_dec[i]||, which lifts latents below their thresholds (0: off)",
                                 NON_NEGATIVE),
        **AUXK, **PENALTY_TARGET,
    }
    sparsity = "l0"
    penalty_coefficient = "l0"
    extra_tensors = ("threshold",)
    # Chosen on the grokked model and planted data together (README, "What the defaults were chosen from"). With
    # thresholds 0.5 and a kernel of width 1 (the earlier defaults) most latents' pre-activations fall below
    # theta - eps / 2 within the first 100 steps, where nothing but AuxK reaches them: L0 8.4-9.3, 88.5-90.2% dead.
    # A lower start keeps more latents (0.001: 24% dead on the grokked model) but then the thresholds climb too
    # slowly for a target L0 on planted data (54-63% of the atoms): of 0.001, 0.01, 0.05 and 0.1, 0.1 is the only
    # start that recovers >= 95%. The controller starts from the coefficient, 0.005, so it takes gain 0.03 (at 0.01:
    # 80.8-86.7% planted), and AuxK 1/8 as BatchTopK does: at 1/32, 3-5 planted latents end dead and recovery is
    # 95.0-96.7%; at 1/8, 95.8-97.5%. That left 74-76% of the latents dead on the grokked model: a threshold the
    # pre-activations fell below stays there. dead_threshold_coeff 0.3 lowers the dead latents' thresholds: 4.5-8.6%
    # dead (at 1: 1.2-5.1%; at 0.1, 10.7% on seed 0; at 0.01 nothing changes). Under target_l0 it is off: the latents
    # it revives add to L0, and the study's w256 cell steered to 4 ends at L0 5.3-7.2 with it (4.3-5.3 with it on only
    # while L0 is below the target), 3.7-3.9 without. Anthropic's pre-activation loss (pre_act_coeff 0.001) keeps
    # them too (0.2-0.4% dead), but it lifts every pre-activation and recovers 81.7-88.3% of the planted atoms.
    default_target_gain = 0.03
    default_auxk_coeff = 1 / 8

    def __init__(self, cfg, seeds):
        super().__init__(cfg, seeds)
        self.log_threshold = torch.nn.Parameter(torch.full((len(self.seeds), cfg.width), math.log(cfg.threshold_init)))

    def activate(self, z):
        return JumpReLU.apply(z, self.log_threshold.exp()[:, None], self.cfg.bandwidth)

    def penalty(self, codes, step, coefficient, dead):
        threshold = self.log_threshold.exp()[:, None]
        l0 = StraightThroughStep.apply(codes.pre, threshold, self.cfg.bandwidth)
        penalty = coefficient * l0.sum(-1).mean(-1)
        if self.cfg.dead_threshold_coeff and not self.cfg.target_l0:
            penalty = penalty + self.cfg.dead_threshold_coeff * torch.where(dead, threshold[:, 0], 0.0).sum(-1)
        if self.cfg.pre_act_coeff:
            below = torch.relu(threshold - codes.pre) * self.W_dec.norm(dim=-1)[:, None]
            penalty = penalty + self.cfg.pre_act_coeff * below.sum(-1).mean(-1)
        return penalty

    def extra_exports(self, s):
        return {"threshold": self.log_threshold[s].exp() / self.input_scale}

    @staticmethod
    def infer(z, tensors, config):
        return threshold_latents(z, tensors["threshold"])


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK (Bussmann et al. 2025): BatchTopK latents f, and nested prefixes of the latents,
    sizes m_1 < ... < m_n = m, each reconstructing x on its own: x_hat_j = f[:m_j] W_dec[:m_j] + b_dec.
    The reconstruction term is the mean over prefixes of ||x - x_hat_j||^2, so the first latents must
    carry what matters most on their own. Inference, as BatchTopK, with the learned global threshold."""
    name = "matryoshka"
    settings = {**BatchTopKSAE.settings, "prefixes": setting(
        (0.0625, 0.125, 0.25, 1.0), "matryoshka: nested prefix sizes as fractions of the width, increasing, "
        "the last 1 (1/16, 1/8, 1/4 and the whole: a prefix at 1/2 or 3/4 cuts through latents that then settle "
        "between two atoms of planted data)"),
        "prefix_weights": setting("size", "matryoshka: how the prefixes' losses are averaged: size (each weighted "
                                          "by the latents it adds, the expected loss at a cut drawn uniformly over the "
                                          "latents) or equal (the plain mean)", choices=("size", "equal"))}
    # Prefixes and AuxK's weight chosen together on planted data (python -m tests.planted matryoshka --set ...):
    # halvings to 1/16 with AuxK 1/32 (the earlier defaults) 88.3-96.7%; the same with 1/8, 90.0-95.8%; 1/16, 1/8,
    # 1/4, 1 with 1/32, 94.2-95.8%; with 1/8 (now the defaults, BatchTopK's weight), 95.8-98.3%. On the grokked model
    # FVU 0.00072-0.00077 with 1.0-3.7% dead, against 0.00059-0.00061 and 0.4-2.5% at the earlier defaults.

    @classmethod
    def check(cls, cfg):
        super().check(cfg)
        fractions = cfg.prefixes
        if not fractions or fractions[-1] != 1 or any(not 0 < f <= 1 for f in fractions):
            raise HusaiError(f"prefixes {' '.join(map(str, fractions))}: need fractions in (0, 1], the last 1")
        sizes = cls.prefix_sizes(cfg)
        if sizes[0] < 1 or any(a >= b for a, b in zip(sizes, sizes[1:])):
            raise HusaiError(f"prefixes {' '.join(map(str, fractions))}: of width {cfg.width} they give {sizes} "
                             f"latents; need at least 1 and strictly increasing")

    @staticmethod
    def prefix_sizes(cfg: SAEConfig) -> list[int]:
        """The number of latents in each prefix, round(fraction * width); the last is the width."""
        return [round(fraction * cfg.width) for fraction in cfg.prefixes]

    @staticmethod
    def prefix_weights(cfg: SAEConfig) -> list[float]:
        """The weight of each prefix's loss, summing to 1: equal, or (m_j - m_{j-1}) / m."""
        sizes = MatryoshkaSAE.prefix_sizes(cfg)
        if cfg.prefix_weights == "equal":
            return [1 / len(sizes)] * len(sizes)
        return [(b - a) / cfg.width for a, b in zip([0] + sizes[:-1], sizes)]

    def reconstruction_loss(self, x, codes, error):
        """Weighted mean over prefixes of ||x - x_hat_j||^2 [S] (prefix_weights); the whole width's error
        is given, the shorter prefixes' are computed here from their latents and decoder rows."""
        errors = []
        for size in self.prefix_sizes(self.cfg)[:-1]:
            x_hat = SeedwiseLinear.apply(codes.latents[..., :size], self.W_dec[:, :size], self.b_dec)
            errors.append((x_hat - x).pow(2).sum(-1).mean(-1))
        weights = self.prefix_weights(self.cfg)
        return sum(w * e for w, e in zip(weights, errors + [error]))


SHARED_CENTROIDS_SEED = 0        # the k-means seed of archetypal's --centroids shared


class ArchetypalSAE(TopKSAE):
    """Relaxed archetypal SAE with TopK latents (RA-SAE, Fel et al. 2025). The decoder rows are
    D = (W C + Lambda) exp(s) [m, d]: C [n_c, d] fixed k-means centroids of the data, W [m, n_c]
    row-stochastic (non-negative, rows summing to 1, so W C lies in the centroids' convex hull), Lambda
    [m, d] a relaxation with every row's norm at most delta, s a learned scalar. As in the authors' code,
    W starts as the identity on its first rows and Lambda at 0; after each step W is projected (ReLU, then
    each row divided by its sum) and Lambda's rows are clipped to norm delta. s starts at -log of the
    centroids' mean norm, so that the rows start at mean norm 1 like the other architectures' (the authors
    start at s = 0; on the normalised grokked activations, rows of norm ~10 left FVU at 0.016 after the
    default 1000 steps against 0.009 this way, with 24% dead latents against 34%). D is built afresh at
    each forward, so the unit-norm decoder constraint does not apply; the saved W_dec is D.

    The centroids are of the normalised data minus the initial b_dec: this SAE adds b_dec to its
    reconstruction (the authors' has no decoder bias), so its rows describe data relative to that centre.
    --centroids shared: one k-means for every seed (seed SHARED_CENTROIDS_SEED, the paper's setting);
    per-seed: a k-means seeded by each SAE's own seed. The encoder starts as the base class draws it from
    the seed (with tied_init: the transpose of random unit rows, which are not this decoder's). With
    shared centroids every seed's decoder starts the same, as in the authors' code, and the encoder's
    initialisation is all that tells the seeds apart; tying the encoder to D would make them identical."""
    name = "archetypal"
    settings = {**TopKSAE.settings,
                "centroids": setting("shared", "archetypal: one k-means of the data for every seed (shared) or "
                                               "one seeded by each seed (per-seed)", choices=("shared", "per-seed")),
                "n_centroids": setting(0, "archetypal: k-means centroids in C (0: as many as latents)", NON_NEGATIVE),
                "delta": setting(1.0, "archetypal: largest norm of a row of the relaxation Lambda (normalised units)",
                                 NON_NEGATIVE)}
    variant_settings = ("centroids",)
    # W at the unscaled learning rate (1 / lr_scale of the rest): at 8x its rows, which must stay non-negative and
    # sum to 1, churn; on the grokked model (seed 0, 1000 steps) FVU 0.0026 against 0.0080 with it at 8x, and
    # 0.0074 with every parameter at 1x. Planted recovery at matched width: 95.0-98.3% (python -m tests.planted archetypal
    # --set auxk_coeff=0.03125).
    lr_multipliers = {"mixing": 1 / 8}
    # With per-seed centroids, planted recovery 94.2-98.3% at AuxK 1/32 and 96.7-99.2% at 1/8; on the grokked model
    # (seeds 0-4, shared) 1/8 gives FVU 0.0031-0.0036 with 47.9-52.3% dead, against 0.0026-0.0033 and 47.1-53.5%.
    default_auxk_coeff = 1 / 8

    def __init__(self, cfg, seeds):
        super().__init__(cfg, seeds)
        del self.W_dec                                 # built by decoder() from the four below
        S, m, n_c = len(self.seeds), cfg.width, self.centroid_count(cfg)
        self.register_buffer("centroids", torch.zeros(S, n_c, cfg.d_in))   # filled by init_from_data
        self.mixing = torch.nn.Parameter(torch.eye(m, n_c).expand(S, m, n_c).clone())
        self.relaxation = torch.nn.Parameter(torch.zeros(S, m, cfg.d_in))
        self.log_scale = torch.nn.Parameter(torch.zeros(S))

    @classmethod
    def check_data(cls, cfg, n_rows):
        if cls.centroid_count(cfg) > n_rows:
            raise HusaiError(f"archetypal: {cls.centroid_count(cfg)} centroids from only {n_rows} activations; "
                             f"use a smaller --n-centroids")

    @staticmethod
    def centroid_count(cfg: SAEConfig) -> int:
        return cfg.n_centroids or cfg.width

    @torch.no_grad()
    def init_from_data(self, acts):
        """The base initialisation, then the centroids C from k-means of c x - b_dec (on every row of acts),
        and s from their norms."""
        super().init_from_data(acts)
        self.check_data(self.cfg, len(acts))
        n_c = self.centroid_count(self.cfg)
        points = acts * self.input_scale - self.b_dec[0]          # b_dec starts the same in every seed
        seeds = [SHARED_CENTROIDS_SEED if self.cfg.centroids == "shared" else seed for seed in self.seeds]
        found = {}
        for s, seed in enumerate(seeds):
            if seed not in found:
                found[seed] = kmeans(points, n_c, seed)
            self.centroids[s].copy_(found[seed])
        self.log_scale.copy_(-self.centroids.norm(dim=-1).mean(dim=-1).log())

    def decoder(self):
        """D = (W C + Lambda) exp(s) [S, m, d]; W C one matmul per seed, as SeedwiseLinear does."""
        mixed = torch.stack([W @ C for W, C in zip(self.mixing.unbind(), self.centroids.unbind())])
        return (mixed + self.relaxation) * self.log_scale.exp()[:, None, None]

    def constrain_gradients(self, triton):
        """None: W, Lambda and s take their plain gradients; their constraints are projections after the step."""

    @torch.no_grad()
    def constrain_parameters(self, triton):
        """W <- ReLU(W), each row divided by its sum (+1e-8); Lambda_i <- Lambda_i min(1, delta / ||Lambda_i||)."""
        W = self.mixing.relu_()
        W.div_(W.sum(dim=-1, keepdim=True) + 1e-8)
        norms = self.relaxation.norm(dim=-1, keepdim=True)
        self.relaxation.mul_((self.cfg.delta / norms.clamp_min(1e-12)).clamp(max=1))


ARCHITECTURES: dict[str, type[SAEEnsemble]] = {
    cls.name: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ArchetypalSAE)}


class ShardedTopKSAE(TopKSAE):
    """A TopK ensemble with its latents shared out over N processes (`--latent-parallel`, with
    LatentShards): process r holds latents [r m/N, (r+1) m/N), that is its columns of W_enc [S, d, m/N]
    and b_enc [S, m/N], its rows of W_dec [S, m/N, d] and, through the optimiser, their Adam moments;
    b_dec [S, d] is in every process. It starts as the whole SAE would (same seeds, same draws) and keeps
    its block.

    Forward, for each seed: z_r = (x - b_dec) W_enc_r + b_enc_r [B, m/N]; the top k of each row of z_r are
    this process's candidates; every process's candidates are all-gathered [B, N k] and merged into the
    row's top k (merged_topk; a tie goes to the lower latent, where one process's torch.topk picks in no
    stated order); each process keeps the selected latents it holds, decodes them, and the partial
    reconstructions are summed over the processes (SummedAcrossRanks), + b_dec. Backward: each process's
    latents get their own gradient; the encoder's part of b_dec's gradient is summed over the processes
    (GradientSummedAcrossRanks), so b_dec's gradient, and step, is the same everywhere. AuxK is merged the
    same way over the dead latents of every process. Up to rounding (the sums are grouped differently),
    this is what one process computes with the whole SAE. The plain-torch path only: the fused encoder
    would compute the candidates of a block, not yet wired in."""

    def __init__(self, cfg, seeds, ranks: Ranks):
        super().__init__(cfg, seeds)
        if cfg.width % ranks.world:
            raise HusaiError(f"width {cfg.width}: --latent-parallel needs a multiple of the {ranks.world} processes")
        self.ranks = ranks
        block = cfg.width // ranks.world
        self.own_latents = slice(ranks.rank * block, (ranks.rank + 1) * block)
        self.W_enc = torch.nn.Parameter(self.W_enc.data[:, :, self.own_latents].clone())
        self.W_dec = torch.nn.Parameter(self.W_dec.data[:, self.own_latents].clone())
        self.b_enc = torch.nn.Parameter(self.b_enc.data[:, self.own_latents].clone())

    def global_latents(self, local: torch.Tensor) -> torch.Tensor:
        return local + self.own_latents.start

    def decoded(self, f_local: torch.Tensor) -> torch.Tensor:
        """sum over the processes of f_r W_dec_r: f_local [S, B, m/N] -> [S, B, d], without b_dec."""
        return SummedAcrossRanks.apply(SeedwiseLinear.apply(f_local, self.W_dec, torch.zeros_like(self.b_dec)))

    def forward(self, acts, triton=False):
        x = acts * self.input_scale
        centred = GradientSummedAcrossRanks.apply(x - self.b_dec[:, None])
        z = SeedwiseLinear.apply(centred, self.W_enc, self.b_enc)                  # [S, B, m/N]
        candidates, local = by_latent(*z.topk(min(self.cfg.k, z.shape[-1]), dim=-1, sorted=False))
        values, latents, mine = merged_topk(candidates, self.global_latents(local), self.cfg.k, self.ranks)
        f_local = scatter_latents(torch.relu(candidates) * mine, local, z)
        x_hat = self.decoded(f_local) + self.b_dec[:, None]
        return x, x_hat, Codes(values=torch.relu(values), indices=latents)

    def auxk_loss(self, x, x_hat, dead, k_aux):
        """SAEEnsemble.auxk_loss over every process's dead latents: each seed's k_aux largest dead
        pre-activations over the whole SAE (candidates padded with -inf to the same count everywhere),
        each process decoding the ones it holds, the residual's reconstruction summed over the processes."""
        residual = (x - x_hat).detach()
        n_dead = dead.sum(-1)
        dist.all_reduce(n_dead)                                        # every process's dead latents, per seed
        if not n_dead.any():
            return x.new_zeros(len(self.seeds))
        centred = GradientSummedAcrossRanks.apply(x - self.b_dec[:, None])
        W_enc, W_dec, b_enc = self.W_enc.unbind(), self.W_dec.unbind(), self.b_enc.unbind()
        losses = []
        for s in range(len(self.seeds)):
            if n_dead[s] == 0:
                losses.append(x.new_zeros(()))
                continue
            latent = dead[s].nonzero().squeeze(1)                      # this process's dead latents, increasing
            k = min(k_aux[s], int(n_dead[s]))
            z = centred[s] @ W_enc[s][:, latent] + b_enc[s][latent]     # [B, n]
            own = min(k, len(latent))
            candidates, local = by_latent(*z.topk(own, dim=-1, sorted=False))
            padded = torch.cat([candidates.detach(), z.new_full((len(z), k - own), -float("inf"))], dim=-1)
            latents = torch.cat([self.global_latents(latent[local]),
                                 local.new_full((len(z), k - own), self.cfg.width)], dim=-1)
            mine = merged_topk(padded, latents, k, self.ranks)[2][:, :own]
            e_hat = SummedAcrossRanks.apply(scatter_latents(candidates * mine, local, z) @ W_dec[s][latent])
            e = residual[s]
            losses.append((e_hat - e).pow(2).sum(-1).mean()
                          / (e - e.mean(dim=0)).pow(2).sum(-1).mean().clamp_min(1e-12))
        return torch.stack(losses)

    def gathered(self, shard: torch.Tensor, dim: int) -> torch.Tensor | None:
        """The whole tensor from every process's block along dim, on the first process (None elsewhere)."""
        blocks = [torch.empty_like(shard) for _ in range(self.ranks.world)] if self.ranks.rank == 0 else None
        dist.gather(shard.contiguous(), blocks, dst=0)
        return torch.cat(blocks, dim=dim) if blocks is not None else None

    @torch.no_grad()
    def export(self, s):
        """SAEEnsemble.export of the whole SAE, gathered on the first process; None on the others (every
        process must call it)."""
        W_enc, W_dec = self.gathered(self.W_enc[s], 1), self.gathered(self.W_dec[s], 0)
        b_enc = self.gathered(self.b_enc[s], 0)
        if self.ranks.rank != 0:
            return None
        c = self.input_scale
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc / c, "b_dec": self.b_dec[s] / c}
        return {name: t.detach().float().cpu().clone() for name, t in tensors.items()}


@dataclass
class CoreSettings:
    """The settings every architecture has. SAEConfig is these plus every architecture's own settings."""
    arch: str = setting("topk", "architecture", choices=tuple(ARCHITECTURES))
    d_in: int = setting(128, "activation dimension d (read from the data)", AT_LEAST_ONE, flag="")
    width: int = setting(512, "latents m", AT_LEAST_ONE, flag="")
    dead_window: int = setting(50_000, "a latent that has not fired on this many training inputs is dead (and AuxK "
                                       "trains it)", AT_LEAST_ONE)
    unit_norm_decoder: bool = setting(True, "unit-norm decoder rows: project W_dec's gradient tangent to the rows "
                                            "and renormalise after each step (an architecture that builds its rows "
                                            "has its own constraint instead)", flag="unit-norm")
    tied_init: bool = setting(True, "initialise W_enc as W_dec^T")
    b_dec_init: str = setting("median", "b_dec's start, from a sample of the data (median: geometric, by Weiszfeld)",
                              choices=("median", "mean", "zero"))
    normalize: bool = setting(True, "train on x * c with E||c x|| = sqrt(d); c is folded back into the saved weights")
    grad_clip: float = setting(1.0, "clip each seed's gradient norm (normalised units) to this before the step; "
                                    "0: no clipping", NON_NEGATIVE)
    adam_beta2: float = setting(0.99, "Adam's second-moment decay (0.999 remembers step 0's gradient, norm ~90 on "
                                      "the grokked model, through the whole run)",
                                Rule(lambda v: 0 < v < 1, "must lie in (0, 1)"))

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise HusaiError(f"unknown architecture {self.arch!r}; valid: {', '.join(ARCHITECTURES)}")
        for f in fields(self):
            if isinstance(getattr(self, f.name), list):      # a list setting, as a flag or from JSON
                setattr(self, f.name, tuple(getattr(self, f.name)))
            value, rule, choices = getattr(self, f.name), f.metadata["rule"], f.metadata["choices"]
            if isinstance(value, float) and not math.isfinite(value):
                raise HusaiError(f"{f.name} {value}: must be a finite number")
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SETTING:
                raise HusaiError(f"{f.name} {value}: must be at most {MAX_SETTING} in size")
            if rule is not None and not rule.holds(value):
                raise HusaiError(f"{f.name} {value}: {rule.says}")
            if choices is not None and value not in choices:
                raise HusaiError(f"{f.name} {value!r}: valid are {', '.join(choices)}")
        ARCHITECTURES[self.arch].fill_defaults(self)
        ARCHITECTURES[self.arch].check(self)

    @property
    def sparsity_name(self) -> str:
        """The sparsity part of an output folder name: k32, l1_0.7, l0_0.05."""
        return ARCHITECTURES[self.arch].sparsity_label(self)

    @property
    def folder_label(self) -> str:
        """The output folder name after architecture and width: k32, l1_0.7, k32-per-seed."""
        return ARCHITECTURES[self.arch].folder_label(self)


def architecture_settings() -> list[tuple[str, type, Field]]:
    """Every architecture's own settings, once each, in the order of ARCHITECTURES (a setting shared by
    several architectures, like k, is one field)."""
    merged: dict[str, Field] = {}
    for cls in ARCHITECTURES.values():
        for name, spec in cls.settings.items():
            if merged.setdefault(name, spec) is not spec:
                raise TypeError(f"{cls.__name__} declares its own {name!r}; share the one setting instead")
    return [(name, type(spec.default), spec) for name, spec in merged.items()]


SAEConfig = make_dataclass("SAEConfig", architecture_settings(), bases=(CoreSettings,))
SAEConfig.__module__ = __name__
SAEConfig.__doc__ = ("One SAE configuration: CoreSettings plus each architecture's settings (see ARCHITECTURES). "
                     "Every field carries its --help text in field.metadata['help'].")


def build_sae(cfg: SAEConfig, seeds: list[int]) -> SAEEnsemble:
    """The ensemble of cfg's architecture for these seeds."""
    return ARCHITECTURES[cfg.arch](cfg, seeds)


def sae_latents(tensors: dict[str, torch.Tensor], config: dict, x: torch.Tensor) -> torch.Tensor:
    """What a saved SAE computes at inference: latents f [N, m] for raw activations x [N, d].
    BatchTopK infers with its learned global threshold, never with batch-level top-k."""
    z = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    return ARCHITECTURES[config["arch"]].infer(z, tensors, config)


def sae_reconstruct(tensors: dict[str, torch.Tensor], config: dict, x: torch.Tensor) -> torch.Tensor:
    return sae_latents(tensors, config, x) @ tensors["W_dec"] + tensors["b_dec"]


def saelens_config(tensors: dict[str, torch.Tensor], husai: dict) -> dict:
    """cfg.json for an SAE's exported tensors (W_enc [d, m], ...) and HUSAI's record of it (`config`, with
    `arch`, and metrics, provenance, ...). The keys are the fields SAELens's inference configs read
    (sae_lens/saes/sae.py SAEConfig; topk_sae.py TopKSAEConfig adds k): the tensors are in raw activation
    units (no normalisation to apply), b_dec is subtracted before encoding, and TopK selects on the
    pre-activations themselves. SAELens ignores the other keys; HUSAI's own are under "husai"."""
    config = husai["config"]
    architecture = ARCHITECTURES[config["arch"]].saelens
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": SAELENS_CFG_VERSION},
           "husai": {"format": SAE_FORMAT, "version": SAE_VERSION, **husai}}
    if architecture == "topk":
        cfg.update(k=int(config["k"]), rescale_acts_by_decoder_norm=False)
    return cfg


def write_sae_folder(folder: Path, tensors: dict[str, torch.Tensor], husai: dict) -> None:
    """An SAE as a folder SAELens loads: sae_weights.safetensors with exactly SAELens's tensors for its
    architecture, cfg.json (saelens_config), and any other exported tensor in husai_tensors.safetensors.
    `folder` exists (a run's staging folder entry), so the files need no atomic rename of their own."""
    cfg = saelens_config(tensors, husai)
    names = SAELENS_TENSORS[cfg["architecture"]]
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{husai['config']['arch']} exports no {', '.join(missing)}, which SAELens's "
                         f"{cfg['architecture']} needs")
    save_tensors(folder / SAELENS_WEIGHTS, {name: tensors[name] for name in names}, SAE_FORMAT, SAE_VERSION, {})
    extra = {name: t for name, t in tensors.items() if name not in names}
    if extra:
        save_tensors(folder / EXTRA_TENSORS_FILE, extra, SAE_FORMAT, SAE_VERSION, {})
    (folder / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")


class SeedFiles(NamedTuple):
    """Where one seed's files are, in either layout (see seed_folder_name)."""
    weights: Path          # sae_weights.safetensors, or seed<N>.safetensors
    config: Path | None    # cfg.json; None in the single-file layout, whose weights file holds the record
    extra: Path | None     # husai_tensors.safetensors (present or not); None in the single-file layout
    snapshots: Path
    log: Path


def seed_files(path: str | Path) -> SeedFiles:
    """A seed's files from its folder (or a file in it) or from a single file seed<N>.safetensors."""
    path = Path(path)
    if path.is_dir() or path.name in (SAELENS_WEIGHTS, SAELENS_CONFIG):
        folder = path if path.is_dir() else path.parent
        return SeedFiles(folder / SAELENS_WEIGHTS, folder / SAELENS_CONFIG, folder / EXTRA_TENSORS_FILE,
                         folder / SNAPSHOTS_FILE, folder / LOG_FILE)
    stem = path.name.removesuffix(".safetensors")
    return SeedFiles(path, None, None, path.with_name(f"{stem}.snapshots.safetensors"), path.with_name(f"{stem}.log.jsonl"))


def load_sae(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors in SAELens's names, HUSAI's record: config, metrics, provenance, ...) of a seed folder or
    of a single-file SAE of an earlier run. Every problem is a HusaiError naming the file."""
    files = seed_files(path)
    hint = "python train_sae.py --arch topk --seed 42"
    tensors, meta = load_tensors(files.weights, SAE_FORMAT, SAE_VERSION, required=("W_enc", "W_dec", "b_enc", "b_dec"),
                                 hint=hint)
    if files.config is not None:
        if not files.config.is_file():
            raise HusaiError(f"{files.config}: no such file; create it with `{hint}`")
        record = read_json(files.config, "SAE config")
        meta = record.get("husai") if isinstance(record, dict) else None
        if not isinstance(meta, dict) or (meta.get("format"), meta.get("version")) != (SAE_FORMAT, SAE_VERSION):
            raise HusaiError(f"{files.config}: no \"husai\" record of format {SAE_FORMAT!r} version {SAE_VERSION} "
                             f"(not an SAE written by train_sae.py)")
        meta = {key: value for key, value in meta.items() if key not in ("format", "version")}
        if files.extra.is_file():
            tensors.update(load_tensors(files.extra, SAE_FORMAT, SAE_VERSION)[0])
    arch = meta.get("config", {}).get("arch")
    if arch not in ARCHITECTURES:
        raise HusaiError(f"{path}: architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}")
    missing = [name for name in ARCHITECTURES[arch].extra_tensors if name not in tensors]
    if missing:
        raise HusaiError(f"{path}: missing tensor {', '.join(missing)}")
    return tensors, meta


FVU_EXPLOSION = 1e3   # a batch FVU this many times max(1, the first batch's FVU) counts as divergence
L0_SMOOTHING = 0.1    # the target-L0 controller's running average of log L0: the weight of each new batch


def copy_state(source: list[torch.Tensor], into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Copy tensors into `into` in place (a fresh copy when it is None); returns the copies."""
    if into is None:
        return [t.detach().clone() for t in source]
    torch._foreach_copy_(into, source)
    return into


def reconstruction_metrics(tensors: dict[str, torch.Tensor], config: dict, acts: torch.Tensor,
                           latents: torch.Tensor | None = None) -> dict:
    """FVU, L0 and dead fraction of one saved SAE over a whole dataset acts [N, d]; `latents` [N, m], when
    given, are its sae_latents on acts (not computed again)."""
    with torch.no_grad():
        f = sae_latents(tensors, config, acts) if latents is None else latents
        x_hat = f @ tensors["W_dec"] + tensors["b_dec"]
        fires = (f > 0)
        return {"fvu": float(fvu(acts, x_hat)), "l0": float(fires.sum(dim=1).float().mean()),
                "dead_frac": float((~fires.any(dim=0)).float().mean())}


def clip_grad_norm_per_seed_(params: list[torch.Tensor], max_norm: float,
                             summed_squares: Callable | None = None) -> torch.Tensor:
    """Gradient-norm clipping, one seed at a time: norm[s] = sqrt(sum over parameters of ||p.grad[s]||^2)
    and, when max_norm > 0, every gradient of seed s is multiplied by min(1, max_norm / (norm[s] + 1e-6)).
    Each norm is summed from that seed's own slices, one reduction per slice, so a seed's step never
    depends on the seeds beside it (torch.nn.utils.clip_grad_norm_ would couple them). Every parameter
    has a leading seed dimension. With latents sharded, `summed_squares` turns this process's squared norms
    [S, P] (seed, parameter) into the whole SAE's (LatentShards.summed_squares). Returns the norms before
    clipping [S]."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.stack([torch.stack([g[s].pow(2).sum() for g in grads]) for s in range(grads[0].shape[0])])
    if summed_squares is not None:
        squares = summed_squares(squares)
    norms = squares.sum(-1).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.ndim - 1)))
    return norms


class SAETrainer:
    """One optimiser step at a time for an SAEEnsemble: losses, the decoder constraint, per-seed
    gradient-norm clipping, Adam with warm-up and linear decay, dead-latent tracking, and the penalty
    coefficient (fixed, or steered towards target_l0). Whether the Triton kernels run is decided once,
    here, from the device and `use_kernels` (`--no-kernels`)."""

    def __init__(self, sae: SAEEnsemble, lr: float, steps: int, warmup_steps: int, decay_steps: int,
                 use_kernels: bool = True):
        self.sae, self.steps = sae, steps
        self.triton = kernels.use_triton(sae.b_dec.device, use_kernels)
        groups = [{"params": [p], "lr": lr * sae.lr_multipliers.get(name, 1.0)} for name, p in sae.named_parameters()]
        self.optimizer = torch.optim.Adam(groups, lr=lr, betas=(0.9, sae.cfg.adam_beta2))
        self.lr_factor = lambda t: min((t + 1) / max(1, warmup_steps), 1.0, (steps - t) / max(1, decay_steps))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.inputs_since_fired = torch.zeros(len(sae.seeds), sae.b_enc.shape[-1], device=sae.b_dec.device)
        self.step_count = 0
        self.state = list(sae.state_dict().values())   # the ensemble's parameters and buffers, in place
        self.before: list[torch.Tensor] | None = None   # a copy of the state this step starts from
        self.last_good: list[torch.Tensor] | None = None   # a copy of the last state that passed the check
        self.good_steps = 0                 # optimiser steps that produced the last good state
        self.fvu_reference: torch.Tensor | None = None   # [S] max(1, the first batch's FVU)
        self.whole_batch: Callable | None = None   # several processes: (loss, FVU, parameter sum) -> all of them
        self.summed_squares: Callable | None = None   # latents sharded: gradient squares [S, P] -> over every shard
        # the penalty coefficient per seed [S]: the architecture's setting, steered when target_l0 is set
        name = sae.penalty_coefficient
        self.penalty_coeff = (torch.full((len(sae.seeds),), float(getattr(sae.cfg, name)), device=sae.b_dec.device)
                              if name else None)
        self.smoothed_log_l0: torch.Tensor | None = None   # [S] the controller's running average of log(batch L0)

    def losses(self, acts: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-seed total loss [S] and the batch metrics [S] for the progress bar and log."""
        sae, cfg = self.sae, self.sae.cfg
        x, x_hat, codes = sae(acts, self.triton)
        x = x.expand_as(x_hat)
        error = (x_hat - x).pow(2).sum(-1).mean(-1)
        if codes.latents is not None:
            active = codes.latents > 0
            l0, fired = active.sum(-1).float().mean(-1), active.any(dim=1)
        else:   # TopK: read firing from the kept indices, not from a dense [S, B, m] tensor
            kept = codes.values > 0
            hits = self.inputs_since_fired.new_zeros(len(sae.seeds), cfg.width).scatter_add_(
                1, codes.indices.flatten(1), kept.flatten(1).float())
            l0, fired = kept.sum(-1).float().mean(-1), (hits > 0)[:, sae.own_latents]   # integer counts: exact
        loss = sae.reconstruction_loss(x, codes, error)
        dead = self.inputs_since_fired >= cfg.dead_window
        penalty = sae.penalty(codes, self.step_count, self.penalty_coeff, dead)
        if penalty is not None:
            loss = loss + penalty
        if sae.uses_auxk and cfg.auxk:
            loss = loss + cfg.auxk_coeff * sae.auxk_loss(x, x_hat, dead, sae.aux_k(l0))
        variance = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(-1).mean(-1)
        fvu = torch.where(variance > 0, error / variance, float("nan"))   # a constant batch has no FVU
        metrics = {"loss": loss.detach(), "fvu": fvu.detach(),
                   "l0": l0.detach(), "dead": dead.float().mean(-1)}
        if self.penalty_coeff is not None:
            metrics["penalty_coeff"] = self.penalty_coeff.clone()
        self.inputs_since_fired = torch.where(fired, 0, self.inputs_since_fired + x.shape[1])
        sae.observe(codes)
        return loss, metrics

    def step(self, acts: torch.Tensor) -> dict:
        """One optimiser step on a batch of activations, then one check (one device sync): every seed's
        loss is finite, no seed's batch FVU has exploded (above FVU_EXPLOSION times max(1, its first
        batch's FVU)), and the updated parameters are finite. If the check fails, the ensemble is put back
        to its last good state, a real copy: the latest weights whose own loss and FVU passed the check
        and which are finite (the weights this step started from when only its update broke them), made
        by `good_steps` steps; then FloatingPointError names the step and the reason. The optimiser's
        moments are not restored: training cannot go on after it."""
        self.before = copy_state(self.state, into=self.before)
        loss, metrics = self.losses(acts)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()          # a sum: each seed's gradient is that of its own loss
        self.sae.constrain_gradients(self.triton)
        metrics["grad_norm"] = clip_grad_norm_per_seed_(list(self.sae.parameters()), self.sae.cfg.grad_clip,
                                                        self.summed_squares)
        self.optimizer.step()
        self.schedule.step()
        self.sae.constrain_parameters(self.triton)
        self.check_step(loss.detach(), metrics["fvu"])
        if self.sae.cfg.target_l0:
            self.steer_penalty(metrics["l0"])
        self.step_count += 1
        return metrics

    @torch.no_grad()
    def steer_penalty(self, l0: torch.Tensor) -> None:
        """The target-L0 controller, multiplicative and integrating, from each seed's own batch L0 [S]:
        log c <- log c + gain * clamp(e, -1, 1). Too many active latents raise the coefficient, too few lower
        it, by at most a factor e^gain per step (gain 0.01: e per 100 steps); it runs to the last step.
        By default e = log(L0 / target). With target_horizon H > 0, e is the error predicted H steps ahead
        from L0's trend, log(L0 / target) + H * (u_t - u_{t-1}) (u: a running average of log L0 with weight
        L0_SMOOTHING per step), and the gain is scaled by the learning-rate schedule's factor: the
        coefficient eases off while L0 falls towards the target fast enough to reach it, and moves little
        during warm-up and nothing at the end, where L0 cannot follow (README, "When --target-l0 misses")."""
        cfg = self.sae.cfg
        if not cfg.target_horizon:
            error, gain = (l0.clamp_min(1e-3) / cfg.target_l0).log(), cfg.target_gain
        else:
            log_l0 = l0.clamp_min(1e-3).log()
            previous = log_l0 if self.smoothed_log_l0 is None else self.smoothed_log_l0
            self.smoothed_log_l0 = previous + L0_SMOOTHING * (log_l0 - previous)
            trend = self.smoothed_log_l0 - previous
            error = log_l0 - math.log(cfg.target_l0) + cfg.target_horizon * trend
            gain = cfg.target_gain * self.lr_factor(self.step_count)
        self.penalty_coeff.mul_(torch.exp(gain * error.clamp(-1.0, 1.0)))

    def check_step(self, loss: torch.Tensor, fvu: torch.Tensor) -> None:
        """The check after a step (see step): loss [S] and batch FVU [S] of the weights the step started
        from, and the parameters after its update. In data parallel the loss and FVU checked are the
        whole batch's (whole_batch), and with latents sharded the parameters checked are every shard's, so that
        every process takes the same decision at the same step."""
        params_sum = torch.stack([p.detach().sum() for p in self.sae.parameters()]).sum()
        if self.whole_batch is not None:
            loss, fvu, params_sum = self.whole_batch(loss, fvu, params_sum)
        if self.fvu_reference is None:
            self.fvu_reference = torch.nan_to_num(fvu, nan=1.0).clamp_min(1.0)
        loss_ok, fvu_ok = loss.isfinite(), ~(fvu > FVU_EXPLOSION * self.fvu_reference)   # NaN FVU: a constant batch
        checks = torch.cat([loss_ok, fvu_ok, params_sum.isfinite()[None]]).tolist()
        S = len(self.sae.seeds)
        loss_ok, fvu_ok, params_ok = checks[:S], checks[S:2 * S], checks[-1]
        if all(loss_ok) and all(fvu_ok) and params_ok:
            self.last_good, self.before = self.before, self.last_good    # the step's start passed: keep it
            self.good_steps = self.step_count
            return
        if not all(loss_ok):
            reason = f"loss is not finite at step {self.step_count} (seeds {self.failing(loss_ok)})"
        elif not all(fvu_ok):
            worst = float((fvu / self.fvu_reference).nan_to_num(nan=0).max())
            reason = (f"batch FVU exploded at step {self.step_count} (seeds {self.failing(fvu_ok)}: {worst:.3g} "
                      f"times max(1, the first batch's FVU), limit {FVU_EXPLOSION:g})")
        else:
            reason = f"the update of step {self.step_count} made the weights non-finite"
            self.last_good, self.good_steps = self.before, self.step_count
        if self.last_good is None:       # the first step failed: only the initial weights are left
            self.last_good = self.before
        copy_state(self.last_good, into=self.state)
        raise FloatingPointError(reason)

    def failing(self, ok: list[bool]) -> list[int]:
        return [seed for seed, good in zip(self.sae.seeds, ok) if not good]
