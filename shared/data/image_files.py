"""Image sets on disk: folders of PNG/JPEG and ADM-layout .npz files (`arr_0`: uint8 N x H x W x 3), read as the
metrics read them and written as stage=sample writes them, plus PNG grids.

Reading yields uint8 batches (B, 3, H, W) with names for pairing: a folder's names are file paths relative to it
without suffix ("n01440764/ILSVRC2012_val_00000293"); an .npz's are zero-padded indices ("000017"). Writing takes
float images in [-1, 1], quantised as a PNG is (`quantize_to_uint8`). The .npz reader and writer stream, so 50k
samples at 256 px (10 GB) never need to fit in memory, and a batch holds at most PIXELS_PER_BATCH pixels, so a set
of huge images is read a few (or one) at a time. Every image is read or the set is refused (one DataError naming
the file): a metric describes exactly the images it was given.
"""
from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from shared.data.transforms import IMAGE_EXTENSIONS, quantize_to_uint8, to_rgb
from shared.errors import DataError
from shared.files import atomic_file

NPZ_IMAGES = "arr_0.npy"
NPZ_LABELS = "arr_1.npy"
# The most pixels one batch holds (192 MB as uint8): 64 images of 1024², one of 8000².
PIXELS_PER_BATCH = 2**26


class ImageSet:
    """A sized, ordered set of equally sized RGB images. Subclasses implement `read(start, stop)`."""

    names: list[str]
    image_size: tuple[int, int]  # (H, W)
    path: Path

    def __len__(self) -> int:
        return len(self.names)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """uint8 (stop - start, 3, H, W)."""
        raise NotImplementedError

    def images_per_batch(self, batch_size: int) -> int:
        """`batch_size`, or fewer where that many images would exceed PIXELS_PER_BATCH (at least one)."""
        height, width = self.image_size
        return max(1, min(batch_size, PIXELS_PER_BATCH // (height * width)))

    def batches(self, batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(names, uint8 (B, 3, H, W)) in order, B at most `images_per_batch(batch_size)`."""
        step = self.images_per_batch(batch_size)
        for start in range(0, len(self), step):
            stop = min(start + step, len(self))
            yield self.names[start:stop], self.read(start, stop)


class FolderImages(ImageSet):
    """Every image (IMAGE_EXTENSIONS) under a folder (recursively), sorted by relative path, as RGB (to_rgb)."""

    def __init__(self, folder: Path):
        self.path = folder
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower()[1:] in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
        self.files = files
        self.names = [p.relative_to(folder).with_suffix("").as_posix() for p in files]
        duplicates = len(self.names) - len(set(self.names))
        if duplicates:
            raise DataError(f"{folder} holds {duplicates} images whose names differ only in the suffix; "
                            f"names must be unique to pair images")
        self.image_size = self._load(files[0]).shape[1:]

    def _load(self, file: Path) -> torch.Tensor:
        try:
            with Image.open(file) as image:
                array = np.asarray(to_rgb(image))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read the image {file}: {error}") from error
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W) uint8

    def read(self, start: int, stop: int) -> torch.Tensor:
        images = []
        for file in self.files[start:stop]:
            image = self._load(file)
            if tuple(image.shape[1:]) != tuple(self.image_size):
                raise DataError(f"{file} is {tuple(image.shape[1:])} but the first image of {self.path} is "
                                f"{tuple(self.image_size)}; all images of a set must have one size")
            images.append(image)
        return torch.stack(images)


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npz_member_header(member) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy member, leaving the stream at the first data byte."""
    version = np.lib.format.read_magic(member)
    if version not in _HEADER_READERS:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran_order, dtype = _HEADER_READERS[version](member)
    if fortran_order:
        raise ValueError("Fortran-ordered arrays are not supported")
    return shape, dtype


class NpzImages(ImageSet):
    """`arr_0` of an .npz (uint8 N x H x W x 3, ADM's sample and reference batches), read in slices from the zip."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive, archive.open(NPZ_IMAGES) as member:
                shape, dtype = _npz_member_header(member)
                self._data_offset = member.tell()
                stored = archive.getinfo(NPZ_IMAGES).file_size - self._data_offset
        except KeyError as error:
            raise DataError(f"{path} has no arr_0: expected images as uint8 N x H x W x 3 (ADM layout)") from error
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DataError(f"cannot read {path} as an .npz of images: {error}") from error
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or 0 in shape[1:]:
            raise DataError(f"{path}: arr_0 is {dtype} {shape}, expected uint8 N x H x W x 3 (ADM layout)")
        if math.prod(shape) != stored:  # before anything is allocated by its header's word
            raise DataError(f"{path}: arr_0's header declares {shape} ({math.prod(shape)} bytes) but it holds {stored} "
                            f"bytes: the file is truncated or not what its header says")
        count, height, width, _ = shape
        self.image_size = (height, width)
        width_digits = max(6, len(str(count - 1)))
        self.names = [f"{i:0{width_digits}d}" for i in range(count)]
        self._image_bytes = height * width * 3

    def read(self, start: int, stop: int) -> torch.Tensor:
        with zipfile.ZipFile(self.path) as archive, archive.open(NPZ_IMAGES) as member:
            member.seek(self._data_offset + start * self._image_bytes)
            return self._decode(member.read((stop - start) * self._image_bytes), stop - start)

    def _decode(self, data: bytes, count: int) -> torch.Tensor:
        if len(data) != count * self._image_bytes:
            raise DataError(f"{self.path} is truncated: arr_0 ends before image {len(self)}")
        array = np.frombuffer(data, np.uint8).reshape(count, *self.image_size, 3)
        return torch.from_numpy(array.copy()).permute(0, 3, 1, 2)

    def batches(self, batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
        # One sequential pass over the member: also cheap for compressed archives, where seeking restarts decoding.
        step = self.images_per_batch(batch_size)
        with zipfile.ZipFile(self.path) as archive, archive.open(NPZ_IMAGES) as member:
            member.seek(self._data_offset)
            for start in range(0, len(self), step):
                count = min(step, len(self) - start)
                yield self.names[start:start + count], self._decode(member.read(count * self._image_bytes), count)


def open_images(path: str | Path) -> ImageSet:
    """A folder of PNG/JPEG images or an ADM-layout .npz; DataError naming the path otherwise."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if path.is_file() and path.suffix == ".npz":
        return NpzImages(path)
    if path.exists():
        raise DataError(f"{path} is neither a folder of images nor an .npz of uint8 N x H x W x 3 images")
    raise DataError(f"image folder or .npz not found: {path}")


def _to_uint8_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] or uint8 (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        images = quantize_to_uint8(images)
    return images.permute(0, 2, 3, 1).cpu().numpy()


class NpzWriter:
    """Streams images into an ADM-layout .npz (`arr_0` uint8 N x H x W x 3, optional `arr_1` int64 labels).

    The count is fixed up front (it is in the .npy header); the file appears under its name only once complete
    (shared.files.atomic_file), and not at all when the block raises or the count falls short.
        with NpzWriter(path, num_images=50000, height=256, width=256) as writer:
            writer.write(images_in_minus1_1, labels)
    """

    def __init__(self, path: str | Path, num_images: int, height: int, width: int):
        self.path = Path(path)
        self.shape = (num_images, height, width, 3)
        self.written = 0
        self.labels: list[np.ndarray] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = ExitStack()  # holds the atomic file: closing it without an error puts it under self.path
        self._archive = zipfile.ZipFile(self._file.enter_context(atomic_file(self.path)), "w", allowZip64=True)
        self._member = self._archive.open(NPZ_IMAGES, "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._member, header)

    def write(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None) -> None:
        """images: float (B, 3, H, W) in [-1, 1] or uint8 (B, 3, H, W); labels: (B,) or None."""
        array = _to_uint8_nhwc(images)
        if array.shape[1:] != self.shape[1:] or self.written + len(array) > self.shape[0]:
            raise ValueError(f"cannot add images {array.shape} to {self.path}: declared {self.shape}, "
                             f"{self.written} written")
        self._member.write(np.ascontiguousarray(array).tobytes())
        self.written += len(array)
        if labels is not None:
            self.labels.append(np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64))

    def close(self) -> Path:
        if self.written != self.shape[0]:
            error = ValueError(f"{self.path}: {self.written} images written but {self.shape[0]} declared")
            self._abandon(error)
            raise error
        self._member.close()
        if self.labels:
            with self._archive.open(NPZ_LABELS, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.concatenate(self.labels))
        self._archive.close()
        self._file.close()
        return self.path

    def _abandon(self, error: BaseException) -> None:
        """Close everything and leave no file behind: the atomic file sees `error` and removes its temporary."""
        self._member.close()
        self._archive.close()
        self._file.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> "NpzWriter":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        else:
            self._abandon(error)


def write_npz(path: str | Path, images: torch.Tensor | np.ndarray,
              labels: torch.Tensor | np.ndarray | None = None) -> Path:
    """All of `images` (float (N, 3, H, W) in [-1, 1] or uint8) as one ADM-layout .npz."""
    with NpzWriter(path, len(images), *images.shape[-2:]) as writer:
        writer.write(images, labels)
    return Path(path)


def save_images(images: torch.Tensor, folder: str | Path, names: Sequence[str]) -> list[Path]:
    """One PNG per image (float (B, 3, H, W) in [-1, 1] or uint8) as folder/<name>.png."""
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    folder = Path(folder)
    paths = []
    for array, name in zip(_to_uint8_nhwc(images), names):
        path = folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8,
                    row_labels: Sequence[str] | None = None) -> Path:
    """A PNG grid of float (B, 3, H, W) images in [-1, 1] (or uint8), `nrow` images per row, 2 px black gaps;
    with `row_labels`, one text per row, written in a column left of the grid."""
    images = torch.as_tensor(images)
    pixels = images if images.dtype == torch.uint8 else quantize_to_uint8(images)
    picture = Image.fromarray(tiled(pixels.cpu(), nrow))
    if row_labels is not None:
        picture = _with_row_labels(picture, row_labels, row_height=images.shape[-2] + 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def tiled(pixels: torch.Tensor, columns: int, gap: int = 2) -> np.ndarray:
    """(B, C, H, W) uint8 images -> (H', W', C): rows of `columns` images, `gap` black pixels around each."""
    count, channels, height, width = pixels.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = torch.zeros(channels, gap + rows * (height + gap), gap + columns * (width + gap), dtype=pixels.dtype)
    for index, image in enumerate(pixels):
        top, left = gap + (index // columns) * (height + gap), gap + (index % columns) * (width + gap)
        grid[:, top:top + height, left:left + width] = image
    return grid.permute(1, 2, 0).numpy()


def _with_row_labels(grid: Image.Image, labels: Sequence[str], row_height: int) -> Image.Image:
    """`grid` behind a column holding labels[r] beside row r (rows `row_height` px apart after the 2 px top gap),
    white on black in PIL's default font."""
    font = ImageFont.load_default()
    boxes = [ImageDraw.Draw(grid).textbbox((0, 0), label, font=font) for label in labels]  # (left, top, right, bottom)
    margin = 4
    width = max(right for _, _, right, _ in boxes) + 2 * margin
    canvas = Image.new("RGB", (width + grid.width, grid.height))
    canvas.paste(grid, (width, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (label, (_, top, _, bottom)) in enumerate(zip(labels, boxes)):
        centre = 2 + row * row_height + (row_height - 2) // 2
        draw.text((margin, centre - (top + bottom) // 2), label, fill="white", font=font)
    return canvas


def save_comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | Path,
                         columns: int = 8) -> Path:
    """Originals and their reconstructions, (B, 3, H, W) each: every row of originals sits above its
    reconstructions, `columns` images per row."""
    columns = min(columns, len(originals))
    rows = []
    for start in range(0, len(originals), columns):
        rows += [originals[start : start + columns], reconstructions[start : start + columns]]
    if len(rows[-1]) < columns:  # pad the last pair of rows so each image stays above its reconstruction
        pad = columns - len(rows[-1])
        rows[-2] = torch.cat([rows[-2], torch.full_like(rows[-2][:1], -1).expand(pad, -1, -1, -1)])
        rows[-1] = torch.cat([rows[-1], torch.full_like(rows[-1][:1], -1).expand(pad, -1, -1, -1)])
    return save_image_grid(torch.cat(rows), path, nrow=columns)
