"""ImageNet-layout image folders `root/<split>/<wnid>/*.JPEG`: the listing (FolderIndex), class maps, and the
map-style data set over them."""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from shared.data.decoding import Item, decode_image
from shared.data.transforms import IMAGE_EXTENSIONS, preprocess
from shared.errors import DataError

log = logging.getLogger("epsvae.data")


class _StringTable:
    """Many strings in two numpy arrays (UTF-8 bytes and offsets) instead of a Python list.

    DataLoader workers are forked: reading a Python list touches the reference counts of its items and copies
    their memory pages into every worker (GBs for ImageNet's 1.28M paths); a numpy buffer stays shared.
    """

    def __init__(self, strings: list[str]):
        encoded = [s.encode() for s in strings]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self._buffer[self._offsets[index] : self._offsets[index + 1]].tobytes().decode()


def read_class_map(path: str | Path) -> tuple[dict[str, int], dict[str, str]]:
    """({wnid: class index}, {wnid: human-readable name}) from a class-map file.

    JSON: {wnid: index}. TSV/CSV: a header naming a `wnid` column and an index column (the first whose name
    contains "index", "idx" or "label"), optionally a `name` column, e.g. `wnid  imagenet1k_index  name`;
    without such a header the first two columns are wnid and index.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.class_map: no file {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            return {str(wnid): int(index) for wnid, index in json.loads(text).items()}, {}
        delimiter = "\t" if "\t" in text.splitlines()[0] else ","
        rows = [[cell.strip() for cell in line.split(delimiter)] for line in text.splitlines() if line.strip()]
        header = [cell.lower() for cell in rows[0]]
        if "wnid" in header:
            wnid_col = header.index("wnid")
            index_col = next(i for i, cell in enumerate(header) if any(k in cell for k in ("index", "idx", "label")))
            name_col = header.index("name") if "name" in header else None
            rows = rows[1:]
        else:
            wnid_col, index_col, name_col = 0, 1, None
        indices = {row[wnid_col]: int(row[index_col]) for row in rows}
        names = {row[wnid_col]: row[name_col] for row in rows} if name_col is not None else {}
    except (ValueError, IndexError, StopIteration, AttributeError) as error:
        raise DataError(f"data.class_map {path} is not a JSON {{wnid: index}} nor a TSV/CSV with wnid and index "
                        f"columns ({type(error).__name__}: {error})") from None
    return indices, names


def _entries(directory: Path, keep) -> tuple[list[str], list[str]]:
    """(sorted names of the entries of `directory` that `keep(entry)` accepts, unreadable entries as messages).

    Any OS error (permissions, a symlink loop, a file removed while listing, a stale network mount) makes the entry
    unreadable rather than ending the listing; a directory that cannot be listed at all is one unreadable entry.
    """
    names, unreadable = [], []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if keep(entry):
                        names.append(entry.name)
                except OSError as error:
                    unreadable.append(f"{directory / entry.name}: {error.strerror or error}")
    except OSError as error:
        unreadable.append(f"{directory}: {error.strerror or error}")
    return sorted(names), unreadable


def _class_folders(split_dir: Path) -> tuple[list[str], list[str]]:
    return _entries(split_dir, lambda entry: entry.is_dir())


def _image_files(class_dir: Path) -> tuple[list[str], list[str]]:
    def is_image(entry: os.DirEntry) -> bool:
        if entry.name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
            return False
        if not entry.is_file():
            entry.stat()  # a symlink loop or a dangling link raises here, and is reported as unreadable
            return False
        return True

    return _entries(class_dir, is_image)


class FolderIndex:
    """The sorted file list and labels of one ImageNet-layout split folder `root/<split>/<wnid>/*.JPEG`.

    Class index of a wnid: its position in the sorted list of class folders, or its entry in `class_map`.
    num_classes: the given one, or (number of folders | largest mapped index + 1).
    class_names[i]: the class map's name, else the wnid, for each index i (None where no folder maps to i).
    """

    def __init__(self, root: str | Path, split: str, class_map: str | Path | None = None,
                 num_classes: int | None = None):
        root = Path(root)
        self.split_dir = root / split
        if not root.is_dir():
            raise DataError(f"data.root {root} does not exist or is not a folder")
        if not self.split_dir.is_dir():
            raise DataError(f"no split folder {self.split_dir} (expected ImageNet layout {root}/{split}/<wnid>/*.JPEG)")
        self.wnids, unreadable = _class_folders(self.split_dir)
        files, empty = [], []
        for wnid in self.wnids:
            names, problems = _image_files(self.split_dir / wnid)
            files += [f"{wnid}/{name}" for name in names]
            unreadable += problems
            empty += [] if names else [wnid]
        self.unreadable_entries = len(unreadable)  # skipped while listing, beside images that fail to decode
        if unreadable:
            log.warning("%s: %d unreadable entries skipped, e.g. %s", self.split_dir, len(unreadable), unreadable[0])
        if empty and len(empty) < len(self.wnids):
            # An empty class folder keeps its index: labels are positions in the folder list, which must agree
            # with the other splits. The class simply has no images here.
            log.warning("%s: class folders without images (their class indices stay reserved): %s",
                        self.split_dir, ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {self.split_dir}")

        if class_map is None:
            self.class_to_index, names = {wnid: i for i, wnid in enumerate(self.wnids)}, {}
        else:
            mapped, names = read_class_map(class_map)
            unmapped = [wnid for wnid in self.wnids if wnid not in mapped]
            if unmapped:
                raise DataError(f"class folders {unmapped[:5]} of {self.split_dir} are not in "
                                f"data.class_map {class_map}")
            self.class_to_index = {wnid: mapped[wnid] for wnid in self.wnids}
        largest = max(self.class_to_index.values())
        self.num_classes = largest + 1 if num_classes is None else int(num_classes)
        if self.num_classes <= largest:
            raise DataError(f"data.num_classes={self.num_classes} but {self.split_dir} has class index {largest}")
        self.class_names: list[str | None] = [None] * self.num_classes
        for wnid, index in self.class_to_index.items():
            self.class_names[index] = names.get(wnid, wnid)

        self._files = _StringTable(files)
        self.labels = np.array([self.class_to_index[f.split("/", 1)[0]] for f in files], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._files)

    def relative_path(self, index: int) -> str:
        """"<wnid>/<file name>" of item `index`."""
        return self._files[index]

    def path(self, index: int) -> Path:
        return self.split_dir / self._files[index]


@functools.lru_cache(maxsize=16)
def scan_image_folder(root: str, split: str, class_map: str | None = None,
                      num_classes: int | None = None) -> FolderIndex:
    """FolderIndex, listed once per process: rebuilding loaders (eval every N steps) does not rescan ImageNet."""
    return FolderIndex(root, split, class_map, num_classes)


class ImageFolder(Dataset):
    """Map-style data set over a FolderIndex: `dataset[(index, flip)]` → {"image", "label"} or None if unreadable."""

    def __init__(self, index: FolderIndex, resolution: int):
        self.index, self.resolution = index, resolution
        self.num_classes, self.class_names = index.num_classes, index.class_names

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int | tuple[int, bool]) -> Item | None:
        index, flip = item if isinstance(item, tuple) else (item, False)
        path = self.index.path(index)
        image = decode_image(path, str(path))
        if image is None:
            return None
        return {"image": preprocess(image, self.resolution, flip), "label": int(self.index.labels[index])}


def check_same_classes_as_train(train_dir: Path, index: FolderIndex, class_map: str | None) -> None:
    """Without a class map, labels are positions in the sorted folder list: a split missing a class folder would
    silently get other labels than the training split."""
    if class_map is None and train_dir.is_dir() and train_dir != index.split_dir:
        if _class_folders(train_dir)[0] != index.wnids:
            raise DataError(f"the class folders of {index.split_dir} differ from those of {train_dir}, so class "
                            f"indices would not agree; set data.class_map to a file mapping wnid to index")
