"""Corpus files: which files, in which formats, cut into pieces a worker can read on its own, and the one-line errors
that name a file (and line) of bad input.

It owns reading: the formats, the byte ranges of a large JSON Lines or text file (a line belongs to the range that
holds its first byte), Parquet row groups, and each document's position in its file. It must not tokenize, write
caches or import torch: tokenizing workers import it, and they start in a fraction of a second without torch.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pretrain.base.errors import DataError

SUPPORTED_FORMATS = ".jsonl, .json, .txt (each optionally .gz), .parquet and .arrow (a saved datasets folder's)"
PARQUET_BATCH = 2048
MIN_PIECE_BYTES = 16 * 2**10  # a piece is about 1/256 of the input, within these bounds
MAX_PIECE_BYTES = 64 * 2**20


def resolve_files(patterns: Iterable[str], flag: str = "--train_files") -> list[Path]:
    """Expand paths and glob patterns, in the given order; each pattern must match at least one file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            hint = f"pass a glob such as '{pattern.rstrip('/')}/*.jsonl'" if os.path.isdir(pattern) else \
                "check the path or quote the glob pattern"
            raise DataError(f"{flag}: '{pattern}' matches no file; {hint}")
        for match in matches:
            file_format(Path(match))  # fail early on an unknown extension
            files.append(Path(match).resolve())
    return files


def file_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for fmt in ("jsonl", "json", "txt", "parquet", "arrow"):
        if name.endswith("." + fmt):
            return fmt
    raise DataError(f"{path}: unknown format; supported formats are {SUPPORTED_FORMATS}")


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def text_of(record: Any, text_column: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a '{text_column}' field, found {type(record).__name__}")
    if text_column not in record:
        raise DataError(f"{where}: no '{text_column}' field (found: {', '.join(map(str, record)) or 'none'}); "
                        f"pass --text_column with one of them")
    return record[text_column]


def malformed(path: Path, line_number: int, error: json.JSONDecodeError) -> DataError:
    return DataError(f"{path}:{line_number}: malformed JSON ({json_reason(error)}); fix or remove that line")


def json_reason(error: json.JSONDecodeError) -> str:
    """The decoder's reason with its column ("Invalid control character at" alone says nothing of where)."""
    line_start = error.doc.rfind("\n", 0, error.pos) + 1
    line_end = len(error.doc[line_start:].split("\n", 1)[0].rstrip("\r"))
    where = "the end of the line" if error.pos - line_start >= line_end else f"column {error.pos - line_start + 1}"
    return f"{error.msg.removesuffix(' at')} at {where}"


def _iter_jsonl(path: Path, text_column: str) -> Iterator[Any]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise malformed(path, line_number, error) from None
            yield text_of(record, text_column, f"{path}:{line_number}")


def _iter_json(path: Path, text_column: str) -> Iterator[Any]:
    with _open_text(path) as handle:
        content = handle.read()
    try:
        data = json.loads(content)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values: JSON Lines stored under a .json name
            yield from _iter_jsonl(path, text_column)
            return
        raise DataError(f"{path}:{error.lineno}: malformed JSON ({json_reason(error)}); fix the file") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if text_column in data or len(lists) != 1:
            data = [data]
        else:
            data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects or JSON Lines; convert the file")
    for index, record in enumerate(data):
        yield text_of(record, text_column, f"{path}: record {index}")


def _iter_txt(path: Path, text_column: str) -> Iterator[Any]:
    with _open_text(path) as handle:
        for line in handle:
            yield line.rstrip("\r\n")


def _parquet_file(path: Path, text_column: str):
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    columns = parquet_file.schema_arrow.names
    if text_column not in columns:
        raise DataError(f"{path}: no '{text_column}' column (found: {', '.join(columns)}); "
                        f"pass --text_column with one of them")
    return parquet_file


def _iter_parquet(path: Path, text_column: str) -> Iterator[Any]:
    for batch in _parquet_file(path, text_column).iter_batches(columns=[text_column], batch_size=PARQUET_BATCH):
        yield from batch.column(0).to_pylist()


def _iter_arrow(path: Path, text_column: str) -> Iterator[Any]:
    """An Arrow stream file, as `datasets` writes them (save_to_disk, its cache), memory-mapped batch by batch."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_stream(source)
        if text_column not in reader.schema.names:
            raise DataError(f"{path}: no '{text_column}' column (found: {', '.join(reader.schema.names)}); "
                            f"pass --text_column with one of them")
        for batch in reader:
            yield from batch.column(text_column).to_pylist()


_READERS = {"jsonl": _iter_jsonl, "json": _iter_json, "txt": _iter_txt, "parquet": _iter_parquet,
            "arrow": _iter_arrow}


def reading_errors(path: Path):
    """A context that turns a file that cannot be read into a one-line DataError naming it."""
    return _ReadingErrors(path)


class _ReadingErrors:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or isinstance(error, DataError):
            return False
        if isinstance(error, (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile)):
            raise DataError(f"{self.path}: cannot be read ({type(error).__name__}: {error}); check the file") \
                from None
        if type(error).__module__.startswith("pyarrow"):  # pyarrow raises its own types for corrupt files
            raise DataError(f"{self.path}: cannot be read as {file_format(self.path).capitalize()} ({error}); check "
                            f"the file") from None
        return False


def iter_documents(path: Path, text_column: str = "text") -> Iterator[Any]:
    """Yield the raw text value of every record of one file, in file order (None or non-strings included)."""
    with reading_errors(path):
        yield from _READERS[file_format(path)](path, text_column)


# ----------------------------------------------------------------------------------------------------------------------
# Pieces: the units of work of a build
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class Piece:
    """Part of one input file. `kind` "range": the lines whose first byte is in [start, end) of a plain JSON Lines
    or text file; "row_group": Parquet row group `start`, whose first row is record `first_record`; "file": all."""
    part: str  # "train" or "validation"
    file_index: int  # in its part's file list: with the position, the document's identity for the split
    path: str
    fmt: str
    kind: str
    start: int
    end: int
    first_record: int
    input_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def piece_bytes(total_bytes: int) -> int:
    """The byte-range size: about 1/256 of the input, so that many workers and ranks share even one large file.
    It depends on the input only, never on the number of workers."""
    return int(min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, total_bytes // 256)))


def plan_pieces(parts: dict[str, list[Path]]) -> list[Piece]:
    """Cut every file of every part ("train", then "validation") into pieces, in corpus order."""
    sizes = {path: path.stat().st_size for files in parts.values() for path in files}
    step = piece_bytes(sum(sizes.values()))
    pieces = []
    for part, files in parts.items():
        for file_index, path in enumerate(files):
            fmt, size = file_format(path), sizes[path]
            gzipped = path.name.lower().endswith(".gz")
            if fmt in ("jsonl", "txt") and not gzipped:
                for start in range(0, max(size, 1), step):
                    end = min(size, start + step)
                    pieces.append(Piece(part, file_index, str(path), fmt, "range", start, end, 0, end - start))
            elif fmt == "parquet":
                with reading_errors(path):
                    metadata = _parquet_metadata(path)
                first = 0
                for group in range(metadata.num_row_groups):
                    rows = metadata.row_group(group).num_rows
                    share = size * rows // max(1, metadata.num_rows)
                    pieces.append(Piece(part, file_index, str(path), fmt, "row_group", group, group + 1, first, share))
                    first += rows
                if metadata.num_row_groups == 0:
                    pieces.append(Piece(part, file_index, str(path), fmt, "file", 0, 0, 0, size))
            else:
                pieces.append(Piece(part, file_index, str(path), fmt, "file", 0, size, 0, size))
    return pieces


def _parquet_metadata(path: Path):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata


def line_number_at(path: str, offset: int) -> int:
    """The 1-based line number of the line that starts at byte `offset` (counted only when an error is reported)."""
    newlines = 0
    with open(path, "rb") as handle:
        remaining = offset
        while remaining > 0:
            chunk = handle.read(min(remaining, 2**24))
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            remaining -= len(chunk)
    return newlines + 1


def iter_piece(piece: Piece, text_column: str) -> Iterator[tuple[int, Any]]:
    """(position in the file, raw text value) of each record of a piece, in file order. The position is the byte
    offset of the line for byte ranges, the record index otherwise: it does not depend on how the file was cut."""
    path = Path(piece.path)
    with reading_errors(path):
        if piece.kind == "range":
            yield from _iter_range(piece, text_column)
        elif piece.kind == "row_group":
            parquet_file = _parquet_file(path, text_column)
            table = parquet_file.read_row_group(piece.start, columns=[text_column])
            for index, text in enumerate(table.column(0).to_pylist()):
                yield piece.first_record + index, text
        else:
            yield from enumerate(iter_documents(path, text_column))


def _iter_range(piece: Piece, text_column: str) -> Iterator[tuple[int, Any]]:
    with open(piece.path, "rb") as handle:
        if piece.start > 0:  # the line holding byte start-1 belongs to the previous range
            handle.seek(piece.start - 1)
            handle.readline()
        position = handle.tell()
        while position < piece.end:
            line = handle.readline()
            if not line:
                break
            if piece.fmt == "txt":
                yield position, line.decode("utf-8").rstrip("\r\n")
            elif line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise malformed(Path(piece.path), line_number_at(piece.path, position), error) from None
                if not isinstance(record, dict) or text_column not in record:
                    text_of(record, text_column, f"{piece.path}:{line_number_at(piece.path, position)}")
                yield position, record[text_column]
            position += len(line)
