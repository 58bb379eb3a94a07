"""Reading the files rlbooth is handed, and writing its own so a kill or a full disk leaves no half file.

Readers raise a user-facing error (an `RlboothError`: the CLI prints it, exits 2, no traceback) that names
the file, what is wrong with it (missing, empty, not UTF-8, truncated, not parseable) and what to do; a
caller passes its own error class so its existing `except` clauses still catch it. `check_*` look at a
file's structure without loading it (a safetensors header, a torch zip's central directory), so a damaged
file is found before any model is loaded.

Writers go through `replacing`: the content is written under a temporary hidden name and renamed over
the target, so a reader or a rerun sees the old file or the new one, never half of one. A temporary left
by a kill is hidden, never read, and removed by the next write of the same target. A full disk becomes
`DiskFullError` naming the folder, with the temporary removed so the space comes back.

`RLBOOTH_TEST_KILL_AT=<site>:<n>` (tests only) SIGKILLs the process the n-th time it passes `kill_point(site)`;
the sites are `image-write` (between an image's temporary and its rename), `checkpoint-write` (inside a
checkpoint, before its rename), `publish` (after a stage's model/, before its rlbooth.json) and `rollout`
(after each stage-two sampling batch).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlbooth.errors import RlboothError

if TYPE_CHECKING:
    import torch


class FileError(RlboothError, ValueError):
    """A file rlbooth needs is missing, empty, damaged or not UTF-8; the message names it and the fix."""


class DiskFullError(RlboothError, OSError):
    """A write ran out of disk space; the message names the folder. Nothing half-written is left."""


ErrorClass = type[RlboothError]
KILL_AT = "RLBOOTH_TEST_KILL_AT"
_kill_hits: Counter[str] = Counter()
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_WORDS = ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed")


def _fail(error: ErrorClass, what: str, path: Path, problem: str, hint: str) -> RlboothError:
    return error(f"{what} {path} {problem}" + (f"; {hint}" if hint else ""))


def require_file(path: Path, what: str, hint: str = "", error: ErrorClass = FileError, allow_empty: bool = False
                 ) -> None:
    """Missing, a folder or 0 bytes are errors (checked with stat: weights can be gigabytes)."""
    if not path.exists():
        raise _fail(error, what, path, "not found", hint)
    if path.is_dir():
        raise _fail(error, what, path, "is a folder, not a file", hint)
    if path.stat().st_size == 0 and not allow_empty:
        raise _fail(error, what, path, "is empty (0 bytes)", hint)


def read_bytes(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError,
               allow_empty: bool = False) -> bytes:
    """The file's bytes; missing, a folder, unreadable or (unless `allow_empty`) blank are errors."""
    path = Path(path)
    require_file(path, what, hint, error, allow_empty)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _fail(error, what, path, f"cannot be read ({err.strerror or err})", hint) from None
    if not data.strip() and not allow_empty:
        raise _fail(error, what, path, "is empty", hint)
    return data


def read_text(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError,
              allow_empty: bool = False) -> str:
    """UTF-8 text (a UTF-8 byte-order mark, as Windows editors write, is accepted); other encodings are errors."""
    path = Path(path)
    data = read_bytes(path, what, hint, error, allow_empty)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            detail = "it is UTF-16 (it starts with a UTF-16 byte-order mark)"
        else:
            line = data.count(b"\n", 0, err.start) + 1
            detail = (f"byte 0x{data[err.start]:02x} on line {line} is not UTF-8 (Latin-1 or Windows-1252?); "
                      f"convert it, e.g. `iconv -f latin1 -t utf-8 {path} > fixed` and use that file")
        raise _fail(error, what, path, f"is not UTF-8 text: {detail}; save it as UTF-8", hint) from None


def read_json(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError) -> Any:
    path = Path(path)
    text = read_text(path, what, hint, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(error, what, path, f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}: "
                    "damaged or cut short)", hint) from None


def read_yaml(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError,
              allow_empty: bool = False) -> Any:
    """The parsed YAML; a file holding only comments counts as empty (None with `allow_empty`)."""
    import yaml

    path = Path(path)
    text = read_text(path, what, hint, error, allow_empty)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise _fail(error, what, path, f"is not valid YAML: {err}", hint) from None
    if data is None and not allow_empty:
        raise _fail(error, what, path, "is empty (only comments or blank lines)", hint)
    return data


def check_safetensors(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError) -> list[str]:
    """The tensor names, from the header alone: a truncated or corrupt file fails here without loading it."""
    from safetensors import safe_open

    path = Path(path)
    require_file(path, what, hint, error)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:  # SafetensorError, OSError: both mean the file is not whole
        raise _fail(error, what, path, f"is damaged or cut short ({err})", hint) from None


def load_safetensors(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError
                     ) -> "dict[str, torch.Tensor]":
    from safetensors.torch import load_file

    check_safetensors(path, what, hint, error)
    try:
        return load_file(str(path))
    except Exception as err:
        raise _fail(error, what, path, f"is damaged ({err})", hint) from None


def check_torch_file(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError) -> None:
    """A `torch.save` file is a zip: its central directory, at the end, is missing when the file was cut short."""
    path = Path(path)
    require_file(path, what, hint, error)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise _fail(error, what, path, f"is damaged or cut short ({err})", hint) from None


def load_torch(path: str | Path, what: str, hint: str = "", error: ErrorClass = FileError) -> Any:
    import torch

    check_torch_file(path, what, hint, error)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # RuntimeError, UnpicklingError, EOFError from a damaged archive
        raise _fail(error, what, path, f"is damaged ({type(err).__name__}: {str(err)[:200]})", hint) from None


# --------------------------------------------------------------------------- writing


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or the words torch and safetensors wrap them in."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        if any(word in str(seen) for word in _DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def remove(path: Path) -> None:
    """A file or a folder, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(path: Path, tmp_name: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling to write (a file, or a folder the caller creates); then rename it to `path`.

    On any error the temporary is removed; a full disk is raised as `DiskFullError` naming the folder.
    """
    tmp = path.with_name(tmp_name or f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as err:
        remove(tmp)
        if isinstance(err, Exception) and not isinstance(err, RlboothError) and is_disk_full(err):
            raise disk_full(path.parent, path.name) from None
        raise


def disk_full(folder: Path, name: str) -> DiskFullError:
    free = shutil.disk_usage(folder).free / 2**20 if folder.exists() else 0.0
    return DiskFullError(f"disk full: writing {name} in {folder} failed ({free:.0f} MiB free there); nothing "
                         "half-written was kept. Free some space, then rerun the same command "
                         "(`rlbooth personalize`/`align` with --resume once it has checkpoints)")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader (or a rerun) never sees half a file."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def kill_point(site: str) -> None:
    """For crash tests: SIGKILL this process at the n-th pass of `site` when RLBOOTH_TEST_KILL_AT=<site>:<n>."""
    spec = os.environ.get(KILL_AT)
    if not spec or spec.rpartition(":")[0] != site:
        return
    _kill_hits[site] += 1
    if _kill_hits[site] == int(spec.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)
